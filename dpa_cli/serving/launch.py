"""`dpa serve EXPORT`: vLLM's OpenAI-compatible server on a DPA model folder, when vLLM is installed.

The folder is checked first (a user mistake is named before anything starts); then vLLM must be importable.
vLLM is no dependency of dpa: it pins its own torch and needs a GPU, so without it the refusal says how to
install it and that `transformers serve` serves the same folder with what dpa already installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from dpa_cli.errors import BadInputError
from dpa_cli.jsonio import read_json

FOLDER_HINT = "pass the folder `dpa export` wrote (e.g. ws/export)"


def check_model(path: str) -> Path:
    """The DPA model folder `path` (an export, or any folder holding a DPA config.json)."""
    folder = Path(path).expanduser()
    if path.startswith("-") and not folder.is_dir():  # vLLM's options are passed through, so they must follow
        raise BadInputError(
            f"{path} came where the export folder goes",
            hint="put the export first: dpa serve EXPORT [--host H] [--port N] [vLLM options]",
        )
    if not folder.is_dir():
        raise BadInputError(f"{path}: no such model folder", hint=FOLDER_HINT)
    config = folder / "config.json"
    if not config.is_file():
        raise BadInputError(f"{path}: no config.json, so it is no model folder", hint=FOLDER_HINT)
    data = read_json(config, hint=FOLDER_HINT)
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type != "dpa":
        raise BadInputError(
            f"{config}: model_type {model_type!r} is not a DPA model",
            hint="`dpa serve` serves DPA exports; serve other models with `vllm serve` itself",
        )
    from dpa_cli.serving.vllm_spec import UnservableError, check_servable

    try:
        check_servable(data)
    except UnservableError as err:
        raise BadInputError(
            f"{config}: {err}", hint=f"serve it with transformers: transformers serve {path} --trust-remote-code"
        ) from None
    return folder


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def serve_command(folder: Path, host: str, port: int, extra: list[str]) -> list[str]:
    """vLLM's own CLI (`vllm serve`), run by this Python so the plugin installed beside dpa is the one found."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        str(folder),
        "--host",
        host,
        "--port",
        str(port),
        *extra,
    ]


def serve(path: str, host: str, port: int, extra: list[str]) -> int:
    folder = check_model(path)
    if not vllm_installed():
        raise BadInputError(
            "vLLM is not installed here; `dpa serve` runs vLLM's OpenAI-compatible server",
            hint=f"pip install vllm (a GPU machine; it brings its own torch), or serve without it: "
            f"transformers serve {path} --trust-remote-code",
        )
    return subprocess.call(serve_command(folder, host, port, extra))
