"""The non-weight files of an upgraded checkpoint: config with `auto_map`, remote code, generation config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import dpa_cli.model
from dpa_cli.jsonio import read_json
from dpa_cli.upgrade.plan import UpgradePlan

# The paper skeleton's files travel too: configuration_dpa / modeling_dpa import them for a paper perceiver.
MODEL_CODE = (
    "configuration_dpa.py", "modeling_dpa.py", "processing_dpa.py", "configuration_paper_dpa.py", "modeling_paper_dpa.py",
)  # fmt: skip
AUTO_MAP = {
    "AutoConfig": "configuration_dpa.DPAConfig",
    "AutoModel": "modeling_dpa.DPAModel",
    "AutoModelForImageTextToText": "modeling_dpa.DPAForConditionalGeneration",
}
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def copy_model_code(folder: Path) -> None:
    """The remote-code files, so plain transformers loads the folder with trust_remote_code=True."""
    source = Path(dpa_cli.model.__file__).parent
    for name in MODEL_CODE:
        shutil.copyfile(source / name, Path(folder) / name)


def write_config(plan: UpgradePlan, folder: Path) -> None:
    config: dict[str, Any] = plan.config.to_diff_dict()
    config.update(
        architectures=["DPAForConditionalGeneration"],
        auto_map=AUTO_MAP,
        dtype=str(plan.tensors[0].dtype).removeprefix("torch."),
    )
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_generation_config(plan: UpgradePlan, folder: Path) -> None:
    """The target's own generation_config.json when it has one, else one from its config; either way with the
    target tokenizer's stop tokens (see `with_stop_tokens`)."""
    target = plan.sources.target.files_path / "generation_config.json"
    if target.is_file():
        generation = read_json(target, hint="fix or remove the target's generation_config.json")
    else:
        text = plan.config.text_config
        values = {key: getattr(text, key, None) for key in GENERATION_KEYS}
        generation = {key: value for key, value in values.items() if value is not None}
    generation = with_stop_tokens(generation, plan.sources.target.files_path)
    (Path(folder) / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


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
    from transformers import AutoTokenizer

    if not any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError):  # an unusual tokenizer: the stop tokens stay as the config says
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


def write_model_files(plan: UpgradePlan, folder: Path) -> None:
    copy_model_code(folder)
    write_config(plan, folder)
    write_generation_config(plan, folder)
