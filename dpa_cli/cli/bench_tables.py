"""Tables of `dpa bench infer`, `dpa bench flops` and `dpa bench all`: rich for the terminal, Markdown for
docs/performance.md, built from the same rows."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from dpa_cli.cli.inspect_cmd import human_bytes

INFER_COLUMNS = (
    "model",
    "prefill s / image",
    "decode tokens/s",
    "end-to-end tokens/s",
    "peak memory",
    "GFLOPs / image",
)
PAPER_COLUMNS = (
    "target",
    "tokens in the LLM",
    "original TFLOPs / image",
    "DPA TFLOPs / image",
    "prefill FLOP ratio",
    "ratio, perceiver sees the prompt",
    "generate FLOP ratio",
)
ALL_COLUMNS = ("bench", "ratio", "best / median", "target")


def _pair(figure: dict[str, float], digits: int = 3) -> str:
    return f"{figure['best']:.{digits}f} / {figure['median']:.{digits}f}"


def infer_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name, m in result["models"].items():
        memory = human_bytes(m["peak_memory_bytes"]) if m["peak_memory_bytes"] is not None else "n/a"
        rows.append(
            (
                name,
                _pair(m["prefill_s_per_image"]),
                _pair(m["decode_tokens_per_s"], 1),
                _pair(m["e2e_tokens_per_s"], 1),
                memory,
                f"{m['flops_per_image'] / 1e9:.2f}",
            )
        )
    r = result["ratios"]
    memory = f"{r['peak_memory_bytes']:.3f}" if r["peak_memory_bytes"] is not None else "n/a"
    rows.append(
        (
            "dpa / original",
            _pair(r["prefill_s_per_image"]),
            _pair(r["decode_tokens_per_s"]),
            _pair(r["e2e_tokens_per_s"]),
            memory,
            f"{r['flops_per_image']:.3f}",
        )
    )
    return rows


def paper_rows(paper: dict[str, Any]) -> list[tuple[str, ...]]:
    return [
        (
            name,
            f"{p['prompt_tokens']} text + {p['image_features']} image",
            f"{p['prefill_flops']['original'] / 1e12:.2f}",
            f"{p['prefill_flops']['dpa'] / 1e12:.2f}",
            f"{p['prefill_ratio']:.3f}",
            f"{p['prefill_ratio_perceiver_sees_prompt']:.3f}",
            f"{p['generate_ratio']:.3f} ({p['new_tokens']} new tokens)",
        )
        for name, p in paper.items()
    ]


def all_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(row["bench"], row["ratio"], row["value"], row["target"]) for row in result["summary"]]


def rich_table(columns: tuple[str, ...], rows: list[tuple[str, ...]], title: str) -> Table:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def infer_title(result: dict[str, Any]) -> str:
    return (
        f"dpa bench infer on {result['device']}: {len(result['prompts'])} prompts x 1 image, "
        f"{result['max_new_tokens']} new tokens, {result['repeats']} repeats (best / median)"
    )


def paper_title(paper: dict[str, Any]) -> str:
    return "Analytic FLOPs per image at the paper's sizes (Qwen2.5-VL-3B ViT, Qwen3-0.6B perceiver, from configs)"


def infer_markdown(result: dict[str, Any]) -> str:
    calls = result["perceiver_calls_per_prompt"]
    return (
        f"{infer_title(result)}; the perceiver ran {calls:g} time(s) per prompt.\n\n"
        + markdown_table(INFER_COLUMNS, infer_rows(result))
        + "\n\n"
        + paper_title(result["paper"])
        + ":\n\n"
        + markdown_table(PAPER_COLUMNS, paper_rows(result["paper"]))
    )


PACK_COLUMNS = (
    "mode",
    "steps",
    "tokens (real / with padding)",
    "effective tokens/s (best / median)",
    "effective tokens / CPU s (best / median)",
    "loss per token",
)


def pack_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """`dpa bench train --pack`: padded and packed passes, then packed / padded."""
    rows = []
    for mode in ("padded", "packed"):
        r = result[mode]
        rows.append(
            (
                mode,
                str(r["steps"]),
                f"{r['tokens']} / {r['tokens_with_padding']}",
                f"{r['tokens_per_s']['best']:.0f} / {r['tokens_per_s']['median']:.0f}",
                f"{r['tokens_per_cpu_s']['best']:.0f} / {r['tokens_per_cpu_s']['median']:.0f}",
                f"{r['loss_per_token']:.6f}",
            )
        )
    rows.append(
        (
            "packed / padded",
            "",
            "",
            _pair(result["ratio"], 2),
            _pair(result["ratio_cpu_time"], 2),
            f"|diff| {result['loss_per_token_difference']:.1e}",
        )
    )
    return rows


def pack_title(result: dict[str, Any]) -> str:
    mix = result["mix"]
    kinds = ", ".join(f"{n} {kind}" for kind, n in mix["by_kind"].items())
    return (
        f"dpa bench train --pack: {mix['samples']} samples ({kinds}; lengths {mix['lengths']['min']} to "
        f"{mix['lengths']['max']}, median {mix['lengths']['median']:g}), max_length {result['max_length']}, "
        f"padded {result['batch']} samples / step, packed {result['rows_per_step']} row(s) / step, "
        f"{result['repeats']} pass(es) per mode"
    )
