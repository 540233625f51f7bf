"""The modality-gap results on disk: a CSV with one row per layer per model and a line plot (matplotlib, Agg)."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from dpa_cli.checkpoint.atomic import fsync_path, write_text_atomic
from dpa_cli.errors import BadInputError

CSV_NAME = "modality_gap.csv"
PNG_NAME = "modality_gap.png"
COLUMNS = (
    "role",
    "model_type",
    "path",
    "layer",
    "centroid_gap",
    "cka",
    "cosine",
    "image_tokens",
    "text_tokens",
    "samples",
)
PANELS = (
    ("centroid_gap", "centroid distance / spread (lower = closer)"),
    ("cka", "linear CKA, pooled image vs text (higher = more alike)"),
    ("cosine", "mean cosine, image vs text tokens"),
)


def output_paths(out_dir: Path) -> tuple[Path, Path]:
    return Path(out_dir) / CSV_NAME, Path(out_dir) / PNG_NAME


def check_outputs(out_dir: Path, force: bool) -> None:
    """Refuse, before any work, to overwrite earlier results without --force, or to write into a file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"-o {out_dir}: a file, not a folder", hint="pass a folder for the CSV and the plot")
    existing = [path for path in output_paths(out_dir) if path.exists()]
    if existing and not force:
        raise BadInputError(f"{existing[0]} exists", hint="pass --force to replace it, or another -o DIR")


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _cell(row[key]) for key in COLUMNS} for row in rows)
    write_text_atomic(path, buffer.getvalue())


def _label(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    name = "DPA" if first["model_type"] == "dpa" else first["model_type"]
    return f"{first['role']}: {name} ({Path(first['path']).name})"


def write_plot(rows: list[dict[str, Any]], path: Path, samples: int) -> None:
    """Three panels (gap, CKA, cosine) against the layer index, one line per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never one opened
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    roles = list(dict.fromkeys(row["role"] for row in rows))
    figure, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.2))
    for axis, (key, title) in zip(axes, PANELS):
        for role in roles:
            mine = [row for row in rows if row["role"] == role]
            axis.plot([r["layer"] for r in mine], [r[key] for r in mine], marker="o", markersize=3, label=_label(mine))
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("layer of the target LLM (0 = input embeddings)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Modality gap per layer, {samples} image-text samples")
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = output_paths(out_dir)
    write_csv(result["rows"], csv_path)
    write_plot(result["rows"], png_path, result["samples"])
    return {"csv": str(csv_path), "png": str(png_path)}
