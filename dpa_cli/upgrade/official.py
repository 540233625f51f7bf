"""An official DPA checkpoint (`forward_visual_tokens_llava_arch`: DPA-4B-init, DPA-4B) as the sources of an upgrade.

Nothing is composed or initialised. The checkpoint is read as three views of the same files, each naming its
tensors as dpa's DPA model holds them, so the usual plan copies every tensor unchanged:
- the target: the thinker, a stock Qwen3ForCausalLM built from `thinker_name_or_path`'s config (FVT:120-121),
  with the tokenizer of `t_tokenizer_name_or_path` (FVT:124-126);
- the perceiver: the `llava_baseline` skeleton (FVT:112), with the Qwen2.5-VL processor the folder ships or
  `p_processor_name_or_path` names (FVT:115-118);
- phi: `linear_align_dim`, Linear -> ReLU -> Linear with bias (FVT:128-136), dpa's `mlp2x_relu`.
A tied thinker head may be stored as an equal copy under either alias name (`lm_head.weight`, the same module as
`model.thinker.lm_head.weight`, FVT:537) or not at all; a copy that differs is refused, never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from dpa_cli.checkpoint import LazyTensorReader
from dpa_cli.errors import BadInputError, CheckpointError
from dpa_cli.families import get_family, located, native_config
from dpa_cli.families.base import Renames, rename_keys
from dpa_cli.families.official import THINKER, VIT_PATH, thinker_config
from dpa_cli.hub import resolve_model
from dpa_cli.upgrade.sources import Checkpoint, Sources

THINKER_NAMES: Renames = (
    (re.compile(r"^model\.thinker\.model\."), "model."),
    (re.compile(r"^(?:model\.thinker\.)?lm_head\.weight$"), "lm_head.weight"),
)
PERCEIVER_NAMES: Renames = ((re.compile(r"^model\.perceiver\.model\.vlm\.(visual|language_model)\."), r"model.\1."),)
PHI_NAMES: Renames = (
    (re.compile(r"^model\.linear_align_dim\.0\."), "model.multi_modal_projector.linear_1."),
    (re.compile(r"^model\.linear_align_dim\.2\."), "model.multi_modal_projector.linear_2."),
)
HEADS = ("lm_head.weight", "model.thinker.lm_head.weight")
EMBEDDING = "model.thinker.model.embed_tokens.weight"
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer_config.json")


def _files(config: dict[str, Any], key: str, default: str, where: str) -> Path:
    repo_id = config.get(key, default)
    try:
        return resolve_model(repo_id, aliases={}).path
    except BadInputError as err:
        raise type(err)(f"{where}: {key} {repo_id!r}: {err.message}", hint=err.hint) from None


def official_sources(checkpoint: Checkpoint) -> Sources:
    """The target, perceiver and phi views of an official DPA checkpoint (see the module docstring)."""
    config, where = checkpoint.disk_config, str(checkpoint.path / "config.json")
    perceiver_config = config.get("perceiver_config")
    if not isinstance(perceiver_config, dict):
        raise CheckpointError(f"{where}: perceiver_config is missing", hint="restore config.json or re-download it")
    baseline = get_family("llava_baseline")
    thinker = located(where, thinker_config, config)
    thinker = {k: v for k, v in thinker.items() if k not in ("architectures", "auto_map")}
    skeleton = located(where, native_config, baseline, perceiver_config, "config.json", within="perceiver_config")
    disk = (config, checkpoint.family)
    own_processor = all((checkpoint.path / name).is_file() for name in PROCESSOR_FILES)
    processor = checkpoint.path if own_processor else _files(config, "p_processor_name_or_path", VIT_PATH, where)
    view = dict(resolved=checkpoint.resolved, index=checkpoint.index, disk=disk)
    target = Checkpoint(
        "target",
        config=thinker,
        family=get_family("causal_lm"),
        **view,
        files=_files(config, "t_tokenizer_name_or_path", THINKER, where),
    )
    perceiver = Checkpoint("perceiver", config=skeleton, family=get_family("qwen2_5_vl_qwen3"), files=processor, **view)
    phi = Checkpoint("phi", config={}, family=checkpoint.family, **view)
    keys = list(checkpoint.index.tensors)
    for part, renames in ((target, THINKER_NAMES), (perceiver, PERCEIVER_NAMES), (phi, PHI_NAMES)):
        part._names = rename_keys(keys, renames)
    check_heads(checkpoint, bool(thinker.get("tie_word_embeddings")))
    return Sources(target, perceiver=perceiver, phi=phi)


def check_heads(checkpoint: Checkpoint, tied: bool) -> None:
    """Every stored copy of the thinker's head must be the head: the embedding when tied, one tensor when not."""
    heads = [name for name in HEADS if name in checkpoint.index.tensors]
    hint = "re-save the checkpoint from the official model, or re-download it"
    if not tied and not heads:
        what = "the thinker does not tie its LM head, but no lm_head.weight is stored"
        raise CheckpointError(f"{checkpoint.path}: {what}", hint=hint)
    with LazyTensorReader(checkpoint.index) as reader:
        reference_name = EMBEDDING if tied else heads[0]
        reference = reader.get(reference_name)
        for name in heads:
            if name != reference_name and not reader.get(name).equal(reference):
                why = "the thinker ties it to its input embedding" if tied else f"{reference_name} is the head"
                raise CheckpointError(f"{checkpoint.path}: {name} differs from {reference_name}, but {why}", hint=hint)


def conversion_options(options: Any) -> Any:
    """The official forward and text: phi `mlp2x_relu`, features from `<|vision_start|>` to `<|vision_end|>`
    inclusive (FVT:474; N+2 per image) in the start, pad and end slots, and unless --encoding says otherwise the
    `paper` encoding (the text the checkpoint was trained on). Options that would change what is copied are
    refused, not ignored."""
    if options.perceiver_layers is not None:
        raise BadInputError("--perceiver-layers does not apply to an official DPA checkpoint: it is copied as trained")
    if options.projector != "mlp2x_relu":
        raise BadInputError(f"--projector {options.projector}: an official DPA checkpoint's phi is mlp2x_relu (copied)")
    if options.feature_span not in (None, "image+markers"):
        raise BadInputError(
            f"--feature-span {options.feature_span}: an official DPA checkpoint feeds its thinker the N+2 perceiver "
            "states <|vision_start|>..<|vision_end|> (image+markers)",
            hint="drop --feature-span",
        )
    return replace(options, feature_span="image+markers", encoding=options.encoding or "paper")
