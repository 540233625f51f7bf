"""The files that travel with a DPA checkpoint besides its weights, and the one rule that copies them.

Upgrade, training and export all write model folders that must load on their own with plain transformers:
the config naming dpa's remote code (`auto_map`), that code, the tokenizers, processor and chat template,
and a generation config with the target's stop tokens. Weights are always written afresh and pickles never
travel (`training_args.bin`, `.bin` weights), so the copy leaves them out.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dpa_cli.errors import CheckpointError
from dpa_cli.jsonio import read_json
from dpa_cli.workspace.layout import ADAPTER_CONFIG, ADAPTER_DIR, EXPORT_RECORD

# The paper skeleton's files travel too: configuration_dpa / modeling_dpa import them for a paper perceiver.
MODEL_CODE = (
    "configuration_dpa.py",
    "modeling_dpa.py",
    "processing_dpa.py",
    "configuration_paper_dpa.py",
    "modeling_paper_dpa.py",
)
ARCHITECTURE = "DPAForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_dpa.DPAConfig",
    "AutoModel": "modeling_dpa.DPAModel",
    "AutoModelForImageTextToText": "modeling_dpa.DPAForConditionalGeneration",
    # `transformers serve` loads VLMs with this class (see configuration_dpa._list_with_transformers_serve).
    "AutoModelForMultimodalLM": "modeling_dpa.DPAForConditionalGeneration",
}
# Generic loaders (lmms-eval's `huggingface` model, scripts written for any checkpoint) fall back to AutoModel for
# a model type transformers does not know: in an export it gives the model that generates. Workspaces keep
# AutoModel -> DPAModel (the base, as for transformers' own VLMs) for code that wants the hidden states.
EXPORT_AUTO_MAP = {**AUTO_MAP, "AutoModel": AUTO_MAP["AutoModelForImageTextToText"]}
GENERATION_CONFIG = "generation_config.json"
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What peft's AutoPeftModel builds the base with: transformers' own auto class, which then runs the DPA code
# shipped in the base folder (trust_remote_code=True). peft would otherwise record dpa_cli's class here.
PLAIN_AUTO_MAPPING = {"base_model_class": "AutoModelForImageTextToText", "parent_library": "transformers"}
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl")
_SKIP_NAMES = {"model.safetensors.index.json", "README.md", EXPORT_RECORD, ADAPTER_DIR}


def copy_model_code(folder: Path) -> None:
    """dpa's installed model code, so plain transformers loads the folder with trust_remote_code=True."""
    import dpa_cli.model

    source = Path(dpa_cli.model.__file__).parent
    for name in MODEL_CODE:
        shutil.copyfile(source / name, Path(folder) / name)


def remote_code_config(
    config: dict[str, Any], dtype: str | None = None, auto_map: Mapping[str, str] = AUTO_MAP
) -> dict[str, Any]:
    """`config` naming dpa's remote code (`auto_map`: AUTO_MAP, or EXPORT_AUTO_MAP for an export), with the dtype
    the weights are written in."""
    config = {**config, "architectures": [ARCHITECTURE], "auto_map": dict(auto_map)}
    if dtype is not None:
        config["dtype"] = dtype
    return config


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def copy_side_files(source: Path, dest: Path) -> None:
    """Processor, tokenizers (with the chat template), config, code and their subfolders; weights, pickles, the
    weights index, the card, dpa's export record and an adapter folder are left out."""
    for item in sorted(Path(source).iterdir()):
        if item.name.startswith(".") or item.name in _SKIP_NAMES:
            continue
        if item.is_file() and not item.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(item, Path(dest) / item.name)
        elif item.is_dir() and not any(p.name.endswith(_SKIP_SUFFIXES) for p in item.rglob("*")):
            shutil.copytree(item, Path(dest) / item.name, dirs_exist_ok=True)


def write_generation_config(
    dest: Path, sources: Iterable[Path], text_config: Mapping[str, Any], tokenizer_folder: Path | None = None
) -> None:
    """`dest`'s generation config, else the first of `sources`' (the target's), else one made from the text
    config's special tokens; completed with the stop tokens of the tokenizer in `tokenizer_folder` (end of text,
    end of turn) and a pad token, so replies stop even where the target shipped none."""
    found = [Path(f) / GENERATION_CONFIG for f in (dest, *sources) if (Path(f) / GENERATION_CONFIG).is_file()]
    if found:
        generation = read_json(found[0], hint="fix or remove that generation_config.json", error=CheckpointError)
    else:
        generation = {key: text_config[key] for key in GENERATION_KEYS if text_config.get(key) is not None}
    if tokenizer_folder is not None:
        generation = with_stop_tokens(generation, tokenizer_folder)
    write_json(Path(dest) / GENERATION_CONFIG, generation)


def with_stop_tokens(generation: dict[str, Any], tokenizer_folder: Path) -> dict[str, Any]:
    """`generation` whose `eos_token_id` also holds the tokenizer's end-of-text and the chat template's end of
    turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), and with a pad token: without them a chat reply runs on
    to max_new_tokens. Values already there are kept first. A folder without a tokenizer changes nothing."""
    tokenizer = _tokenizer(tokenizer_folder)
    if tokenizer is None:
        return generation
    given = generation.get("eos_token_id")
    stops = list(given) if isinstance(given, list) else [] if given is None else [given]
    for token in (tokenizer.eos_token, _turn_end(tokenizer)):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in stops:
            stops.append(token_id)
    result = dict(generation)
    if stops:
        result["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if result.get("pad_token_id") is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
        if pad is not None:
            result["pad_token_id"] = pad
    return result


def _tokenizer(folder: Path) -> Any:
    from dpa_cli import loading
    from dpa_cli.errors import DpaError

    if not any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return loading.load_tokenizer(folder, local_files_only=True)
    except (OSError, ValueError, DpaError):  # an unusual tokenizer: the stop tokens stay as the config says
        return None


def _turn_end(tokenizer: Any) -> str | None:
    """The special token the chat template closes an assistant turn with: rendered once, read after the answer."""
    answer = "dpa-answer-7f3c"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - no template, or one that wants other input: no turn token to add
        return None
    after = text.split(answer, 1)[-1] if answer in text else ""
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((token for token in specials if token and after.startswith(token)), None)


def point_adapter_at(adapter: Path, base: Path) -> None:
    """Make `adapter` load with plain peft on `base`, through `PeftModel` on a loaded base or through
    `AutoPeftModel` from the adapter alone (which builds the base itself), with no dpa_cli import anywhere.

    The path is absolute because peft reads a relative one from the current folder, not the adapter's.
    """
    path = Path(adapter) / ADAPTER_CONFIG
    config = read_json(path, hint="restore the adapter folder, or train the stage again", error=CheckpointError)
    config.update(base_model_name_or_path=str(Path(base).resolve()), auto_mapping=PLAIN_AUTO_MAPPING)
    write_json(path, config)
