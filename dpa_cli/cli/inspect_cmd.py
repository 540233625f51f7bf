"""`dpa inspect MODEL`: a checkpoint's family, parts and role, from its config and safetensors headers."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from dpa_cli.cli.options import JsonFlag, ModelArg
from dpa_cli.cli.render import err, out, print_json
from dpa_cli.describe import describe_model
from dpa_cli.hub import resolve_model


def inspect(model: ModelArg, json_: JsonFlag = False) -> None:
    """Show what a checkpoint holds and which role it can play, without loading its weights.

    Reads only config.json and the safetensors headers: instant at any size, safe on a partial download.

    Lists the vision tower, projector, language model and LM head with widths, depths and parameter counts.

    Examples:
      dpa inspect ./llava-next-qwen3-4b
      dpa inspect Qwen/Qwen2.5-VL-3B-Instruct --json
      dpa inspect ./model --json | jq .language_model.hidden_size
    """
    report = describe_model(resolve_model(model).path)
    if json_:
        print_json(report)
        return
    render_report(report)


def render_report(report: dict[str, Any]) -> None:
    """The summary lines and the parts table on stdout, warnings on stderr."""
    role = ", ".join(report["role"]) or "none (already upgraded)"
    out.print(f"[bold]{report['path']}[/]")
    out.print(f"family [cyan]{report['family']}[/] ({report['architecture'] or report['model_type']}), role: {role}")
    shards = f"{report['num_shards']} shard" + ("s" if report["num_shards"] != 1 else "")
    out.print(
        f"{human_count(report['total_params'])} parameters, {report['dtype']}, {shards}, "
        f"{human_bytes(report['total_bytes'])}; image token id {report['image_token_id']}, "
        f"chat template {'yes' if report['chat_template'] else 'no'}"
    )
    out.print(parts_table(report))
    for message in report["warnings"]:
        err.print(f"[yellow]warning:[/] {message}", highlight=False)


def parts_table(report: dict[str, Any]) -> Table:
    table = Table("part", "class", "model type", "width", "layers", "params", title_justify="left")
    perceiver = report.get("perceiver")
    if perceiver:
        params = human_count(perceiver["params"])
        table.add_row("perceiver", perceiver["family"], perceiver["model_type"], "", "", params)
        _add_parts(table, perceiver, indent="  ")
    _add_parts(table, report, indent="")
    return table


def _add_parts(table: Table, parts: dict[str, Any], indent: str) -> None:
    vision = parts.get("vision")
    if vision:
        name = vision["class"] or (f"external: {vision.get('source')}" if vision["external"] else "")
        table.add_row(
            f"{indent}vision",
            name,
            vision["model_type"] or "",
            _str(vision["hidden_size"]),
            _str(vision["num_layers"]),
            human_count(vision["params"]),
        )
    projector = parts["projector"]
    if projector["tensors"]:
        table.add_row(f"{indent}projector", projector["type"] or "", "", "", "", human_count(projector["params"]))
    lm = parts["language_model"]
    table.add_row(
        f"{indent}language model",
        lm["class"] or "",
        lm["model_type"] or "",
        _str(lm["hidden_size"]),
        _str(lm["num_layers"]),
        human_count(lm["params"]),
    )
    head = parts["lm_head"]
    head_name = "tied to the input embedding" if head["tied"] else "x".join(map(str, head["shape"] or []))
    table.add_row(f"{indent}lm head", head_name, "", "", "", human_count(head["params"]))
    for name, shape in parts["extra"].items():
        table.add_row(f"{indent}extra", name, "", "x".join(map(str, shape)), "", "")
    if parts["unmapped_keys"]:
        table.add_row(f"{indent}[red]unmapped[/]", f"{len(parts['unmapped_keys'])} keys", "", "", "", "")


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def human_count(n: int) -> str:
    """1234 -> 1.2K, 4_022_000_000 -> 4.02B: parameter counts as people quote them."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """Decimal units, as `--shard-size 5GB` reads them (5GB prints as 5.0 GB, not 4.7)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
