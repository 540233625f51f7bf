"""transformers' Auto class-name tables (model_type -> class name), read without importing torch.

The tables are literal `OrderedDict([...])` assignments in `modeling_auto.py`; importing that module pulls
in torch (seconds), while parsing it takes milliseconds. If the file ever stops being literal, we import.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from pathlib import Path

_MODULE = "transformers.models.auto.modeling_auto"


@functools.cache
def _literal_tables() -> dict[str, dict[str, object]]:
    # find_spec of the submodule would import its parent packages; locating the file through the
    # top-level package's spec imports nothing.
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return {}
    source = Path(spec.submodule_search_locations[0], "models", "auto", "modeling_auto.py")
    if not source.is_file():
        return {}
    tree = ast.parse(source.read_text(encoding="utf-8"))
    tables: dict[str, dict[str, object]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id.endswith("_MAPPING_NAMES"):
            try:
                tables[target.id] = dict(ast.literal_eval(node.value.args[0]))
            except ValueError:  # not a literal: leave it to the import fallback
                continue
    return tables


@functools.cache
def auto_names(table: str) -> dict[str, object]:
    """The table `table` (e.g. `MODEL_MAPPING_NAMES`) as a dict."""
    tables = _literal_tables()
    if table in tables:
        return tables[table]
    return dict(getattr(importlib.import_module(_MODULE), table))
