"""`describe_model`: what a checkpoint folder holds, from config.json and safetensors headers alone.

Tensor data is never read, so this is instant on a 60 GB model and still answers on a partial download
(which it reports as a warning). The result is a plain JSON-ready dict: `dpa inspect --json` prints it.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dpa_cli.checkpoint import CheckpointIndex, TensorInfo, find_truncated_files, read_checkpoint_index
from dpa_cli.errors import CheckpointError, ModelNotFoundError
from dpa_cli.families import (
    Component,
    Family,
    KeySplit,
    Role,
    check_config,
    count_layers,
    detect_family,
    located,
    native_config,
)
from dpa_cli.families.auto_names import auto_names
from dpa_cli.families.paper import OWN_CLASSES
from dpa_cli.jsonio import PARSE_ERRORS, parse_json, read_json

DTYPE_NAMES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "BOOL": "bool",
}
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CONFIGS_WITH_TEMPLATES = ("tokenizer_config.json", "processor_config.json")
Tensors = Mapping[str, TensorInfo]


def describe_model(folder: Path) -> dict[str, Any]:
    """Family, role, parts (widths, depths, parameter counts), files and warnings of a checkpoint folder.

    Raises a `BadInputError` subclass naming the file when the folder is not a usable checkpoint.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise ModelNotFoundError(f"{what}: {folder}", hint="pass a checkpoint folder")
    config = read_config(folder)
    where = str(folder / "config.json")
    family = detect_family(config, where=where)
    native_config(family, config, where)  # the hub configs it names (official formats), or an error naming one
    index = read_checkpoint_index(folder, pickled=family.pickled_weights)
    warnings = _file_warnings(index)
    parts = located(where, describe_parts, family, config, index.tensors, warnings)
    return {
        "path": str(folder),
        "family": family.name,
        "model_type": config.get("model_type"),
        "architecture": _architecture(config),
        "role": [role.value for role in Role if role in family.roles],
        **parts,
        "dtype": _dtype(index.tensors.values()),
        "shards": [path.name for path in index.files],
        "num_shards": len(index.files),
        "total_bytes": index.total_bytes,
        "total_params": _params(index.tensors.values()),
        "chat_template": has_chat_template(folder, warnings),
        "warnings": warnings,
    }


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict whose fields dpa reads have usable types (`check_config`); a
    missing, malformed or mistyped file is a `CheckpointError` naming the file and the key."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json", hint="pass a Hugging Face model folder (config.json + *.safetensors)"
        )
    config = read_json(path, hint="re-download or re-save the model", error=CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object", hint="re-download or re-save the model")
    return check_config(config, str(path))


# Parsed by the tokenizers library (Rust, its own depth limit), and the largest file by far: not read twice.
_RUST_PARSED = ("tokenizer.json",)
# Files every loader reads as a JSON object (`.get` on the parsed value): a list or a string there would be an
# AttributeError from deep inside transformers, peft or dpa's side-file code.
_OBJECT_SUFFIXES = ("config.json", "index.json")
_OBJECT_NAMES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "trainer_state.json")


def _must_be_object(name: str) -> bool:
    return name.endswith(_OBJECT_SUFFIXES) or name in _OBJECT_NAMES


_RESTORE = "restore the file, or re-download / re-save the model"


def _json_kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def check_json_files(folder: Path) -> None:
    """Read every JSON file of a model folder (and its subfolders) the way dpa reads user files, before
    transformers or peft parse them: a damaged or 100k-deep tokenizer_config.json, processor_config.json or
    adapter_config.json is then one line naming the file, not a RecursionError from inside a loader; a config
    file that is a list or a string instead of an object is named too."""
    for path in sorted(Path(folder).rglob("*.json")):
        if path.name not in _RUST_PARSED and path.is_file():
            # NaN may stand in files transformers reads leniently (a trainer_state.json loss): only the shape matters
            value = read_json(path, hint=_RESTORE, allow_nan=True, error=CheckpointError)
            if _must_be_object(path.name) and not isinstance(value, dict):
                raise CheckpointError(f"{path}: not a JSON object ({_json_kind(value)})", hint=_RESTORE)


def describe_parts(family: Family, config: Mapping[str, Any], tensors: Tensors, warnings: list[str]) -> dict:
    """Each component of `family` in this checkpoint; appends what looks wrong to `warnings`."""
    split = family.split_keys(tensors)
    text = family.text_config(config)
    tokens = native_config(family, config, "config.json")  # official formats: the ids of the configs they name
    parts: dict[str, Any] = {
        "layout": split.layout.name,
        "image_token_id": family.image_token_id(tokens),
        "marker_token_ids": list(family.marker_token_ids(tokens)),
    }
    if family.perceiver_config_key:
        parts["perceiver"] = _perceiver(family, config, split, tensors, warnings)
    parts["vision"] = _vision(family, config, split, tensors, warnings)
    parts["projector"] = _projector(family, config, split, tensors)
    lm_keys = split.keys(Component.LANGUAGE_MODEL)
    parts["language_model"] = _language_model(family, config, text, lm_keys, tensors, warnings)
    parts["lm_head"] = _lm_head(split.keys(Component.LM_HEAD), tensors)
    parts["extra"] = _shapes(split.keys(Component.EXTRA), tensors)
    parts["unmapped_keys"] = [tensors[key].name for key in split.unmapped]
    if family.weights_check is not None and (problem := family.weights_check(config, tensors)):
        warnings.append(problem)
    if split.unmapped:
        warnings.append(
            f"{len(split.unmapped)} weights fit no part of a {family.name} checkpoint "
            f"(layout {split.layout.name}), e.g. {tensors[split.unmapped[0]].name!r}"
        )
    return parts


def _vision(
    family: Family, config: Mapping[str, Any], split: KeySplit, tensors: Tensors, warnings: list[str]
) -> dict[str, Any] | None:
    keys = split.keys(Component.VISION)
    vision = family.vision_config(config)
    if vision is not None:
        model_type = vision.get("model_type")
        layers = family.vision_field(vision, "num_layers")
        return {
            "class": family.vision_class or model_class(model_type),
            "model_type": model_type,
            "hidden_size": family.vision_field(vision, "hidden_size"),
            "num_layers": layers if layers is not None else count_layers(keys) or None,
            "image_size": family.vision_field(vision, "image_size"),
            "patch_size": family.vision_field(vision, "patch_size"),
            "params": _params(tensors[k] for k in keys),
            "external": False,
        }
    if family.external_vision_key is None:
        return None
    return _external_vision(family, config, split, tensors, warnings)


def _external_vision(
    family: Family, config: Mapping[str, Any], split: KeySplit, tensors: Tensors, warnings: list[str]
) -> dict[str, Any]:
    """Original LLaVA: the ViT config is only a hub id; its width comes from the config or the projector."""
    keys = split.keys(Component.VISION)
    source = config.get(family.external_vision_key)
    width = config.get(family.vision_width_key) if family.vision_width_key else None
    if width is None:
        weights = [tensors[k] for k in sorted(split.keys(Component.PROJECTOR)) if len(tensors[k].shape) == 2]
        width = weights[0].shape[1] if weights else None
    if not keys:
        warnings.append(f"the vision tower's weights are not in the checkpoint; LLaVA loads them from {source}")
    return {
        "class": None,
        "model_type": None,
        "source": source,
        "hidden_size": width,
        "num_layers": count_layers(keys) or None,
        "image_size": None,
        "patch_size": None,
        "params": _params(tensors[k] for k in keys),
        "external": True,
    }


def _projector(family: Family, config: Mapping[str, Any], split: KeySplit, tensors: Tensors) -> dict[str, Any]:
    keys = split.keys(Component.PROJECTOR)
    return {
        "type": config.get(family.projector_type_key) if family.projector_type_key else None,
        "params": _params(tensors[k] for k in keys),
        "tensors": _shapes(keys, tensors),
    }


def _language_model(
    family: Family,
    config: Mapping[str, Any],
    text: Mapping[str, Any],
    keys: list[str],
    tensors: Tensors,
    warnings: list[str],
) -> dict[str, Any]:
    layers = family.text_field(text, "num_layers")
    vocab = family.text_field(text, "vocab_size")
    stored_layers = count_layers(keys)
    if layers is not None and stored_layers and layers != stored_layers:
        warnings.append(f"config says {layers} language-model layers but the weights hold {stored_layers}")
    embeddings = [tensors[k] for k in keys if k.endswith("embed_tokens.weight")]
    if vocab is not None and embeddings and embeddings[0].shape[0] != vocab:
        warnings.append(f"config says vocab_size {vocab} but the embedding has {embeddings[0].shape[0]} rows")
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    return {
        "class": model_class(text.get("model_type")),
        "model_type": text.get("model_type"),
        "hidden_size": family.text_field(text, "hidden_size"),
        "num_layers": layers if layers is not None else stored_layers or None,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "params": _params(tensors[k] for k in keys),
    }


def _lm_head(keys: list[str], tensors: Tensors) -> dict[str, Any]:
    """No head weight on disk means the head is the input embedding (transformers drops the tied copy)."""
    weights = [tensors[k] for k in keys if k.endswith("weight")]
    return {
        "tied": not keys,
        "shape": list(weights[0].shape) if weights else None,
        "params": _params(tensors[k] for k in keys),
    }


def _perceiver(
    family: Family, config: Mapping[str, Any], split: KeySplit, tensors: Tensors, warnings: list[str]
) -> dict[str, Any]:
    """An upgraded checkpoint's perceiver is a whole VLM of a known family: describe it the same way.

    It is stored as its base model (`visual.*`, `language_model.*`), which is the family's v5 layout
    without the leading `model.`; the naming that classifies more keys wins.
    """
    sub_config = config.get(family.perceiver_config_key) or {}
    perceiver = detect_family(sub_config, where=f"config.json {family.perceiver_config_key}")
    prefixes = tuple(f"{p}." for p in split.layout.prefixes(Component.PERCEIVER))
    stripped: dict[str, TensorInfo] = {}
    for key in split.keys(Component.PERCEIVER):
        prefix = next((p for p in prefixes if key.startswith(p)), "")
        stripped[key[len(prefix) :]] = tensors[key]
    candidates = [stripped, {f"model.{k}": v for k, v in stripped.items()}]
    best = max(candidates, key=lambda c: len(c) - len(perceiver.split_keys(c).unmapped))
    own: list[str] = []
    parts = located("config.json", describe_parts, perceiver, sub_config, best, own, within=family.perceiver_config_key)
    warnings.extend(f"perceiver: {message}" for message in own)
    return {
        "family": perceiver.name,
        "model_type": sub_config.get("model_type"),
        "architecture": _architecture(sub_config),
        "params": _params(stripped.values()),
        **parts,
    }


def has_chat_template(folder: Path, warnings: list[str]) -> bool:
    """Whether the tokenizer or processor files carry a chat template (own file or a config key)."""
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    extra = folder / "additional_chat_templates"
    if extra.is_dir() and any(extra.glob("*.jinja")):
        return True
    for name in CONFIGS_WITH_TEMPLATES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = parse_json(path.read_bytes())
        except (OSError, *PARSE_ERRORS):
            warnings.append(f"{name} is not valid JSON; its chat template (if any) cannot be read")
            continue
        if isinstance(data, dict) and data.get("chat_template"):
            return True
    return False


def _file_warnings(index: CheckpointIndex) -> list[str]:
    """Files whose size disagrees with their header: interrupted downloads, mostly."""
    messages = []
    for path, expected, actual in find_truncated_files(index):
        if actual < expected:
            messages.append(f"{path.name} is truncated: {actual} of {expected} bytes on disk; re-download it")
        else:
            messages.append(f"{path.name} has {actual - expected} bytes after its last tensor; re-download it")
    return messages


@functools.cache
def model_class(model_type: str | None) -> str | None:
    """transformers' base-model class for a model_type."""
    if not model_type:
        return None
    name = auto_names("MODEL_MAPPING_NAMES").get(model_type) or OWN_CLASSES.get(model_type)
    return name[0] if isinstance(name, (list, tuple)) else name


def _architecture(config: Mapping[str, Any]) -> str | None:
    architectures = config.get("architectures") or [None]
    return architectures[0]


def _params(infos: Iterable[TensorInfo]) -> int:
    return sum(info.numel for info in infos)


def _shapes(keys: Iterable[str], tensors: Tensors) -> dict[str, list[int]]:
    return {tensors[k].name: list(tensors[k].shape) for k in sorted(keys)}


def _dtype(infos: Iterable[TensorInfo]) -> str | None:
    """The dtype holding most parameters (norms are sometimes kept in float32 beside bf16 weights)."""
    counts: Counter[str] = Counter()
    for info in infos:
        counts[info.dtype] += info.numel
    if not counts:
        return None
    dtype = counts.most_common(1)[0][0]
    return DTYPE_NAMES.get(dtype, dtype.lower())
