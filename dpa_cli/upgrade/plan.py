"""The upgrade plan: every output tensor with its source or its initialisation, made before any data moves.

The expected tensors come from the DPA model itself, built on the meta device from the new config, so the
plan is checked against exactly what `from_pretrained` will ask for: every key, every shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dpa_cli.checkpoint import TensorInfo
from dpa_cli.checkpoint.naming import error_summary, meta_model, meta_state
from dpa_cli.checkpoint.reader import torch_dtype
from dpa_cli.checkpoint.writer import TensorSpec, plan_shards
from dpa_cli.defaults import SHARD_SIZE, Dtype
from dpa_cli.errors import BadInputError, CheckpointError
from dpa_cli.families import Component, detect_family
from dpa_cli.upgrade.chat_template import WorkspaceTemplate, workspace_template
from dpa_cli.upgrade.compose import composed_perceiver_config, composition, dpa_config, pair_encoding, text_config
from dpa_cli.upgrade.encoding import resolve_options, target_markers
from dpa_cli.upgrade.sources import Checkpoint, Sources
from dpa_cli.upgrade.tokens import (
    Placeholder,
    choose_placeholder,
    ensure_pad_token,
    existing_placeholder,
    load_tokenizer,
)

# In-memory name prefix in a source model -> where it goes in the DPA model. Anything else is dropped.
VLM_TARGET = {"model.language_model.": "model.language_model.", "lm_head.": "lm_head."}
TEXT_TARGET = {"model.": "model.language_model.", "lm_head.": "lm_head."}
PERCEIVER = {"model.": "model.perceiver."}
SMALL_LM = {"model.": "model.perceiver.language_model."}
# New tensors: phi always; a composed perceiver's fresh parts (its ViT family's `composition.new`).
PHI = "model.multi_modal_projector."


@dataclass(frozen=True)
class Options:
    projector: str = "mlp2x_relu"
    feature_span: str | None = "image"  # None: the encoding's own (image+markers for paper, else image)
    early_fusion: bool = False
    dtype: str = "auto"
    seed: int = 0
    shard_size: int = SHARD_SIZE
    perceiver_layers: int | None = None  # keep only the perceiver's first N language blocks (0: ViT-only ablation)
    # dpa (the target's chat template) or paper (the official DPA code's encoding); None: the pair's own
    # (paper for the paper's pair, upgrade/compose.pair_encoding), else dpa.
    encoding: str | None = None


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: copied from `source` (`key` on disk), or new with `init`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str  # a checkpoint role ("target", "perceiver", "vit", "lm") or "new"
    key: str | None = None
    init: str | None = None  # "linear" (PyTorch's default nn.Linear init) or "newline" (LLaVA-NeXT's)
    pad_rows: int = 0  # vocabulary rows appended for an added image token

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


@dataclass
class UpgradePlan:
    sources: Sources
    options: Options
    config: Any  # DPAConfig
    tensors: list[TensorPlan]
    dropped: dict[str, dict[str, Any]]
    placeholders: dict[str, Placeholder]
    tokenizers: dict[str, Any]  # "target", "perceiver": tokenizer objects (with any added token)
    notes: list[str] = field(default_factory=list)
    chat_template: WorkspaceTemplate | None = None  # the workspace's (the target's, wrapped when it renders no images)

    @property
    def output_bytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors)

    @property
    def num_shards(self) -> int:
        return len(plan_shards([t.spec for t in self.tensors], self.options.shard_size))

    @property
    def phi_p_untrained(self) -> bool:
        return self.sources.composed is not None


def _rename(name: str, prefixes: dict[str, str]) -> str | None:
    for old, new in prefixes.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def _mapped(checkpoint: Checkpoint, prefixes: dict[str, str], out: dict[str, tuple[Checkpoint, str]]) -> None:
    """Add {DPA name: (checkpoint, disk key)} for every tensor of `checkpoint` the prefixes keep."""
    for key, name in checkpoint.names.items():
        dpa_name = _rename(name, prefixes)
        if dpa_name is not None:
            out[dpa_name] = (checkpoint, key)


def source_tensors(sources: Sources) -> dict[str, tuple[Checkpoint, str]]:
    """Where each kept tensor of the DPA model comes from."""
    out: dict[str, tuple[Checkpoint, str]] = {}
    text_target = sources.target.family.auto_class == "AutoModelForCausalLM"
    _mapped(sources.target, TEXT_TARGET if text_target else VLM_TARGET, out)
    if sources.phi is not None:
        _mapped(sources.phi, {PHI: PHI}, out)
    if sources.perceiver is not None:
        _mapped(sources.perceiver, PERCEIVER, out)
    else:
        _mapped(sources.vit, composition(sources.vit).vit, out)
        _mapped(sources.lm, SMALL_LM, out)
    return out


def _placeholders(sources: Sources) -> tuple[dict[str, Placeholder], dict[str, Any]]:
    """The target's and the perceiver's image tokens, and their tokenizers (a token may be added)."""
    target = sources.target
    tokenizers = {"target": load_tokenizer(target.files_path)}
    configured = target.family.image_token_id(target.config)
    placeholders = {
        "target": existing_placeholder(tokenizers["target"], configured, target.path)
        if configured is not None and configured >= 0  # the original LLaVA code splices -200, not a token
        else choose_placeholder(tokenizers["target"])
    }
    perceiver = sources.perceiver or sources.lm
    tokenizers["perceiver"] = load_tokenizer(perceiver.files_path)
    if sources.perceiver is not None:
        token_id = perceiver.family.image_token_id(perceiver.config)
        if token_id is None:
            raise CheckpointError(f"{perceiver.path}/config.json: names no image token id")
        placeholders["perceiver"] = existing_placeholder(tokenizers["perceiver"], token_id, perceiver.path)
    else:
        placeholders["perceiver"] = choose_placeholder(tokenizers["perceiver"])
    return placeholders, tokenizers


def _config_vocab(checkpoint: Checkpoint) -> int:
    return int(checkpoint.family.text_field(checkpoint.family.text_config(checkpoint.config), "vocab_size"))


def _vocab(checkpoint: Checkpoint, placeholder: Placeholder) -> int:
    return max(_config_vocab(checkpoint), placeholder.id + 1)


def _check_vocab(sources: Sources, tokenizers: dict[str, Any], placeholders: dict[str, Placeholder]) -> None:
    """A tokenizer with more tokens than the embedding has rows would index past it at the first rare token."""
    for role, checkpoint in (("target", sources.target), ("perceiver", sources.perceiver or sources.lm)):
        vocab, tokens = _vocab(checkpoint, placeholders[role]), len(tokenizers[role])
        if tokens > vocab:
            raise CheckpointError(
                f"{checkpoint.path}: its tokenizer has {tokens} tokens, but config.json vocab_size is {vocab}",
                hint="the tokenizer and the config come from different models",
            )


def _keep_blocks(perceiver_config: dict[str, Any], blocks: int) -> dict[str, Any]:
    """The perceiver config with only its first `blocks` language blocks (the text fields may be top-level)."""
    nested = isinstance(perceiver_config.get("text_config"), dict)
    text = dict(perceiver_config["text_config"] if nested else perceiver_config)
    have = text.get("num_hidden_layers")
    if have is None or blocks > have:
        raise BadInputError(f"--perceiver-layers {blocks}: the perceiver has {have} language blocks")
    text["num_hidden_layers"] = blocks
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:blocks]
    return {**perceiver_config, "text_config": text} if nested else {**perceiver_config, **text}


def build_config(
    sources: Sources,
    options: Options,
    placeholders: dict[str, Placeholder],
    tokenizers: dict[str, Any],
    target_markers: list[int] = (),
) -> Any:
    target_text = text_config(sources.target, _vocab(sources.target, placeholders["target"]))
    if sources.perceiver is not None:
        perceiver_config = {k: v for k, v in sources.perceiver.config.items() if k != "architectures"}
        markers = list(sources.perceiver.family.marker_token_ids(sources.perceiver.config))
    else:
        vocab = _vocab(sources.lm, placeholders["perceiver"])
        perceiver_config = composed_perceiver_config(
            sources.vit, sources.lm, placeholders["perceiver"], vocab, tokenizers["perceiver"]
        )
        markers = list(detect_family(perceiver_config).marker_token_ids(perceiver_config))
    if options.perceiver_layers is not None:
        perceiver_config = _keep_blocks(perceiver_config, options.perceiver_layers)
    return dpa_config(
        perceiver_config,
        target_text,
        placeholders["target"],
        placeholders["perceiver"],
        markers,
        options,
        list(target_markers),
    )


def output_dtype(sources: Sources, options: Options) -> torch.dtype:
    """--dtype, or with `auto` the dtype holding most of the target's parameters."""
    if options.dtype != Dtype.AUTO:
        return Dtype(options.dtype).torch()
    counts: dict[str, int] = {}
    for info in sources.target.index.tensors.values():
        counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    dtype = torch_dtype(max(counts, key=counts.get))
    return dtype if dtype.is_floating_point else torch.float32


def _plan_copy(name: str, meta: torch.Tensor, checkpoint: Checkpoint, key: str, dtype: torch.dtype) -> TensorPlan:
    info: TensorInfo = checkpoint.index.tensors[key]
    want, have = tuple(meta.shape), info.shape
    source_dtype = torch_dtype(info.dtype)
    out_dtype = dtype if source_dtype.is_floating_point else source_dtype
    if want == have:
        return TensorPlan(name, out_dtype, want, checkpoint.role, key)
    grows_vocab = (
        name.endswith(("embed_tokens.weight", "lm_head.weight")) and want[1:] == have[1:] and want[0] > have[0]
    )
    if grows_vocab and have[0] == _config_vocab(checkpoint):  # rows for an image token added to the tokenizer
        return TensorPlan(name, out_dtype, want, checkpoint.role, key, pad_rows=want[0] - have[0])
    if grows_vocab:
        raise BadInputError(
            f"{checkpoint.path}: tensor {key!r} has {have[0]} rows, but config.json says vocab_size "
            f"{_config_vocab(checkpoint)}",
            hint="the checkpoint's config.json and its weights disagree: re-download or re-save it",
        )
    raise BadInputError(
        f"{checkpoint.path}: tensor {key!r} has shape {list(have)}, but the DPA model needs {list(want)} for {name}",
        hint="the checkpoint's config.json and its weights disagree (or the widths do not match)",
    )


def _new_allowed(name: str, sources: Sources) -> bool:
    if sources.converted:  # an official DPA checkpoint: every tensor is copied, none made up
        return False
    return name.startswith(PHI) or (sources.composed is not None and name.startswith(composition(sources.vit).new))


def _fresh(mapped: dict[str, tuple[Checkpoint, str]], expected: dict[str, torch.Tensor], sources: Sources) -> set[str]:
    """A composed part the ViT source holds at another width starts fresh as a whole: the paper's merger MLP is
    rebuilt when the small LM's width differs (LB:559-570). Any other shape difference is an error (`_plan_copy`)."""
    if sources.composed is None:
        return set()
    fresh: set[str] = set()
    for prefix in composition(sources.vit).new:
        names = [name for name in expected if name.startswith(prefix)]
        shapes = {name: mapped[name][0].index.tensors[mapped[name][1]].shape for name in names if name in mapped}
        if any(shape != tuple(expected[name].shape) for name, shape in shapes.items()):
            fresh.update(names)
    return fresh


def _cut_blocks(sources: Sources, blocks: int | None):
    """Whether an output name is a perceiver language block that `--perceiver-layers` leaves out."""
    if blocks is None:
        return lambda name: False
    family = (sources.perceiver or sources.vit).family
    roots = [p.removeprefix("model.") for p in family.layout("v5").prefixes(Component.LANGUAGE_MODEL)]
    pattern = re.compile(rf"^model\.perceiver\.(?:{'|'.join(map(re.escape, roots))})\.layers\.(\d+)\.")
    return lambda name: bool((match := pattern.match(name)) and int(match.group(1)) >= blocks)


def plan_tensors(
    sources: Sources, expected: dict[str, torch.Tensor], dtype: torch.dtype, blocks: int | None = None
) -> list[TensorPlan]:
    """Every expected tensor, copied or new; anything a source has that the model does not want is an error
    (except perceiver language blocks that --perceiver-layers leaves out)."""
    mapped = source_tensors(sources)
    tied_head = "lm_head.weight" not in expected  # the target ties it to the embeddings
    cut = _cut_blocks(sources, blocks)
    mapped = {name: source for name, source in mapped.items() if not cut(name)}
    for name, (checkpoint, key) in mapped.items():
        if name not in expected and not (tied_head and name == "lm_head.weight"):
            raise BadInputError(
                f"{checkpoint.path}: tensor {key!r} has no place in the DPA model (as {name})",
                hint="its config.json describes fewer layers or parts than the weights hold",
            )
    copies, new = [], []
    fresh = _fresh(mapped, expected, sources)
    for name, meta in expected.items():
        if name in mapped and name not in fresh:
            copies.append(_plan_copy(name, meta, *mapped[name], dtype))
        elif _new_allowed(name, sources):
            init = "newline" if name.endswith("image_newline") else "linear"
            new.append(TensorPlan(name, dtype, tuple(meta.shape), "new", init=init))
        else:
            raise BadInputError(f"the DPA model needs {name}, but no source checkpoint holds it")
    # Read sources in storage order: one shard open at a time, each read front to back.
    order = {role: i for i, role in enumerate(("target", "perceiver", "vit", "lm", "phi"))}
    copies.sort(key=lambda t: (order[t.source], _position(sources, t)))
    return copies + new


def _position(sources: Sources, plan: TensorPlan) -> tuple[str, int]:
    checkpoint = next(c for c in sources.all() if c.role == plan.source)
    info = checkpoint.index.tensors[plan.key]
    return str(info.file), info.data_offsets[0]


def _check_perceiver_depth(config: Any, options: Options) -> None:
    if not config.perceiver_config.get_text_config().num_hidden_layers and options.perceiver_layers != 0:
        raise BadInputError(
            "the perceiver has no language blocks: DPA feeds the target the states of a small VLM's LM blocks",
            hint="pick a perceiver with pretrained language layers; --perceiver-layers 0 runs the ViT-only ablation",
        )


def dropped_parts(sources: Sources, plan: list[TensorPlan]) -> dict[str, dict[str, Any]]:
    """What each source loses, by component: e.g. the target's ViT and projector, the perceiver's LM head.
    A folder several roles read (an official DPA checkpoint) is counted once, under `checkpoint`."""
    used = {(t.source, t.key) for t in plan if t.key is not None}
    roles: dict[Path, list[Checkpoint]] = {}
    for checkpoint in sources.all():
        roles.setdefault(checkpoint.path, []).append(checkpoint)
    dropped: dict[str, dict[str, Any]] = {}
    for views in roles.values():
        first = views[0]
        label = first.role if len(views) == 1 else "checkpoint"
        split = first.disk_family.split_keys(first.index.tensors)
        for component, keys in split.components.items():
            lost = [k for k in keys if not any((view.role, k) in used for view in views)]
            if lost:
                params = sum(first.index.tensors[k].numel for k in lost)
                dropped[f"{label} {component.value}"] = {"tensors": len(lost), "params": params}
    return dropped


def _composed_note(tensors: list[TensorPlan]) -> str:
    fresh = sorted({t.name.rsplit(".", 1)[0] for t in tensors if t.source == "new" and not t.name.startswith(PHI)})
    if fresh:
        return f"phi_p is freshly initialised ({', '.join(fresh)}): stage 1 trains it together with phi"
    return "phi_p is the ViT source's merger at the same width, trained for another LM: stage 1 trains it with phi"


def build_plan(sources: Sources, options: Options) -> UpgradePlan:
    """Check that the upgrade can work and decide every output tensor; reads configs and headers only."""
    if sources.converted:
        from dpa_cli.upgrade.official import conversion_options

        options = conversion_options(options)
    chosen = options.encoding is None and pair_encoding(sources) == "paper"
    if options.encoding is None:
        options = replace(options, encoding=pair_encoding(sources))
    options = resolve_options(options)
    placeholders, tokenizers = _placeholders(sources)
    _check_vocab(sources, tokenizers, placeholders)
    markers = target_markers(sources, tokenizers, options, placeholders["target"].id)
    try:
        config = build_config(sources, options, placeholders, tokenizers, markers)
        _check_perceiver_depth(config, options)
        expected = meta_state(meta_model("AutoModelForImageTextToText", config))
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as err:  # e.g. 0 ** -x of 0 heads
        raise BadInputError(
            f"these checkpoints do not make a valid DPA model: {error_summary(err)}",
            hint="check both configs with `dpa inspect`",
        ) from None
    tensors = plan_tensors(sources, expected, output_dtype(sources, options), options.perceiver_layers)
    notes = []
    if sources.composed is not None:
        notes.append(_composed_note(tensors))
    if sources.converted:
        notes.append(f"an official DPA checkpoint, renamed: all {len(tensors)} tensors copied unchanged, none new")
    if chosen:
        notes.append("the paper's pair: --encoding paper, the official DPA text (pass --encoding dpa for the target's)")
    if options.perceiver_layers == 0:
        notes.append("ablation: the perceiver keeps no language blocks (ViT only), the paper's weakest variant")
    chat_template = workspace_template(tokenizers["target"], placeholders["target"].token)
    notes += [chat_template.note()] if chat_template.note() else []
    for role, placeholder in placeholders.items():
        if placeholder.added:
            notes.append(f"the {role} tokenizer had no image token: {placeholder.token} added as id {placeholder.id}")
        if (pad := ensure_pad_token(tokenizers[role])) is not None:
            notes.append(f"the {role} tokenizer had no pad token: {pad} pads batches")
    dropped = dropped_parts(sources, tensors)
    return UpgradePlan(sources, options, config, tensors, dropped, placeholders, tokenizers, notes, chat_template)
