"""`dpa catalog`: the aliases dpa accepts for targets and perceivers."""

from __future__ import annotations

from rich.table import Table

from dpa_cli.catalog import load_catalog
from dpa_cli.cli.options import JsonFlag
from dpa_cli.cli.render import out, print_json


def catalog(json_: JsonFlag = False) -> None:
    """List the known aliases of targets and perceivers and what each one resolves to.

    Add your own (or point the paper's setups at your checkpoints) in a YAML file named by $DPA_CATALOG,
    in the same format as the built-in dpa_cli/catalog.yaml.

    Examples:
      dpa catalog
      dpa catalog --json
      DPA_CATALOG=~/my-catalog.yaml dpa upgrade llava-next-qwen3-4b --perceiver qwen3-0.6b-vl
    """
    aliases = load_catalog().values()
    if json_:
        print_json(
            [
                {
                    "name": a.name,
                    "kind": a.kind,
                    "source": a.source,
                    "description": a.description,
                    "catalog": str(a.origin),
                }
                for a in aliases
            ]
        )
        return
    table = Table("alias", "kind", "source", "description")
    for alias in aliases:
        table.add_row(alias.name, alias.kind, alias.source or "[dim](not published)[/]", alias.description)
    out.print(table)
