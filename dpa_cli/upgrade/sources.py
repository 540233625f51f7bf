"""The inputs of an upgrade: TARGET and PERCEIVER specs resolved to checkpoints read lazily.

A perceiver is an existing small VLM or a composition `vit=<source>,lm=<text model>`, where `vit=target`
takes the target's own vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa_cli import families
from dpa_cli.catalog import expand_alias
from dpa_cli.checkpoint import CheckpointIndex, read_checkpoint_index
from dpa_cli.checkpoint.naming import error_summary, memory_names
from dpa_cli.describe import check_json_files, read_config
from dpa_cli.errors import BadInputError, CheckpointError
from dpa_cli.families import Family, Role, detect_family
from dpa_cli.families.config_check import check_with_transformers
from dpa_cli.hub import ResolvedModel, resolve_model

COMPOSED_KEYS = ("vit", "lm")


@dataclass
class Checkpoint:
    """One input checkpoint: config, family, tensor index (headers only) and in-memory key names.

    `config` and `family` describe the model dpa builds from it. For a format transformers cannot build (the DPA
    paper's official ones) they are its native equivalent, and `disk_config` / `disk_family` the file's own, which
    name its keys.
    """

    role: str  # "target", "perceiver", "vit" or "lm"
    resolved: ResolvedModel
    config: dict[str, Any]
    family: Family
    index: CheckpointIndex
    disk: tuple[dict[str, Any], Family] | None = None  # config.json and family as on disk, when not native
    files: Path | None = None  # where its tokenizer and processor files are, when not beside its weights
    _names: dict[str, str] | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return self.resolved.path

    @property
    def files_path(self) -> Path:
        """The folder holding its tokenizer, image processor and generation config."""
        return self.files or self.path

    @property
    def disk_config(self) -> dict[str, Any]:
        return self.disk[0] if self.disk else self.config

    @property
    def disk_family(self) -> Family:
        return self.disk[1] if self.disk else self.family

    @property
    def names(self) -> dict[str, str]:
        """{disk key: the name transformers holds it under in memory}, computed once."""
        if self._names is None:
            self._names = memory_names(self.disk_family, self.disk_config, self.path, self.index.tensors)
        return self._names

    def describe_source(self) -> dict[str, Any]:
        return {
            "spec": self.resolved.spec,
            "path": str(self.path),
            "repo_id": self.resolved.repo_id,
            "revision": self.resolved.revision,
            "family": self.disk_family.name,
            **({"builds": self.family.name} if self.disk else {}),
        }


def open_checkpoint(spec: str, role: str) -> Checkpoint:
    """Resolve `spec` (alias, folder or cached repo id) and read its config and headers."""
    resolved = resolve_model(spec)
    where = str(resolved.path / "config.json")
    config = read_config(resolved.path)
    family = detect_family(config, where=where)
    check_json_files(resolved.path)
    index = read_checkpoint_index(resolved.path, pickled=family.pickled_weights)
    if family.weights_check is not None and (problem := family.weights_check(config, index.tensors)):
        raise CheckpointError(f"{where}: {problem}", hint="run `dpa inspect` on it to see its parts")
    if family.native_config is None:
        families.located(where, check_with_transformers, config, family, where)  # names a hub id it misses
        return Checkpoint(role, resolved, config, family, index)
    native = _buildable_native(family, config, where)
    disk = (config, family) if native != config else None
    return Checkpoint(role, resolved, native, detect_family(native, where=where), index, disk)


def _buildable_native(family: Family, config: dict[str, Any], where: str) -> dict[str, Any]:
    """The config dpa builds a checkpoint of `family` from, checked by building it (no weights)."""
    native = families.native_config(family, config, where)  # hub ids it names: read from the cache, or named
    from transformers import AutoConfig

    import dpa_cli.model  # noqa: F401  registers the paper skeleton's config class

    try:
        AutoConfig.for_model(**native)
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as err:
        raise CheckpointError(
            f"{where}: this {family.name} config does not describe a buildable {native.get('model_type')} model "
            f"({error_summary(err)})",
            hint="fix the value in config.json (or the configs it names), or re-download the model",
        ) from None
    return native


@dataclass(frozen=True)
class ComposedSpec:
    """`vit=<source>,lm=<text model>`: a perceiver assembled from parts, with a fresh phi_p."""

    vit: str
    lm: str

    def __str__(self) -> str:
        return f"vit={self.vit},lm={self.lm}"


def parse_perceiver_spec(spec: str) -> str | ComposedSpec:
    """An alias is expanded first; `key=value,...` is a composition, anything else names a checkpoint."""
    spec = expand_alias(spec)
    if "=" not in spec:
        return spec
    parts: dict[str, str] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in COMPOSED_KEYS or not value or key in parts:
            raise BadInputError(
                f"bad composed perceiver {spec!r}: {item.strip()!r}",
                hint="write it as vit=<target|folder|repo id>,lm=<text model>, e.g. vit=target,lm=Qwen/Qwen3-0.6B",
            )
        parts[key] = value
    missing = [key for key in COMPOSED_KEYS if key not in parts]
    if missing:
        raise BadInputError(
            f"composed perceiver {spec!r} lacks {' and '.join(missing)}=", hint="give both vit= and lm="
        )
    return ComposedSpec(parts["vit"], parts["lm"])


@dataclass
class Sources:
    """Every checkpoint an upgrade reads from, by role."""

    target: Checkpoint
    perceiver: Checkpoint | None = None  # an existing small VLM
    vit: Checkpoint | None = None  # composed perceivers: where the ViT comes from
    lm: Checkpoint | None = None  # composed perceivers: the small text model
    composed: ComposedSpec | None = None
    phi: Checkpoint | None = None  # an official DPA checkpoint's trained phi (its target and perceiver: views of it)

    @property
    def converted(self) -> bool:
        """An official DPA checkpoint renamed into a workspace: every tensor copied, nothing new."""
        return self.phi is not None

    def all(self) -> list[Checkpoint]:
        seen, out = set(), []
        for checkpoint in (self.target, self.perceiver, self.vit, self.lm, self.phi):
            if checkpoint is not None and id(checkpoint) not in seen:
                seen.add(id(checkpoint))
                out.append(checkpoint)
        return out


def _require_role(checkpoint: Checkpoint, role: Role, what: str) -> None:
    family = checkpoint.disk_family  # the roles its own format declares (an official one builds the skeleton)
    if role not in family.roles:
        able = "none" if not family.roles else ", ".join(r.value for r in family.roles)
        raise BadInputError(
            f"{checkpoint.path}: a {family.name} checkpoint cannot be the {what} (it can be: {able})",
            hint="run `dpa inspect` on it to see what it is",
        )


OFFICIAL_DPA = "forward_visual_tokens_llava_arch"


def open_sources(target_spec: str, perceiver_spec: str | None) -> Sources:
    """Resolve both specs and check each checkpoint can play its role. With no perceiver, the target must be an
    official DPA checkpoint, which becomes a workspace by renaming only (upgrade/official.py)."""
    target = open_checkpoint(target_spec, "target")
    if perceiver_spec is None:
        if target.family.name != OFFICIAL_DPA:
            raise BadInputError(
                f"--perceiver is missing: {target.path} is a {target.disk_family.name} checkpoint, and only an "
                f"official DPA checkpoint ({OFFICIAL_DPA}) upgrades without one",
                hint="pass --perceiver <small VLM | vit=<source>,lm=<text model>>, e.g. --perceiver qwen3-0.6b-vl",
            )
        from dpa_cli.upgrade.official import official_sources

        return official_sources(target)
    if target.family.name == OFFICIAL_DPA:
        raise BadInputError(
            f"{target.path} is an official DPA checkpoint ({OFFICIAL_DPA}): it already has its perceiver",
            hint="drop --perceiver: `dpa upgrade` turns it into a workspace as it is",
        )
    _require_role(target, Role.TARGET, "target")
    parsed = parse_perceiver_spec(perceiver_spec)
    if isinstance(parsed, ComposedSpec):
        vit = target if parsed.vit == "target" else open_checkpoint(parsed.vit, "vit")
        lm = open_checkpoint(parsed.lm, "lm")
        if lm.family.name != "causal_lm":
            raise BadInputError(f"{lm.path}: lm= must be a text causal LM, but it is a {lm.family.name} checkpoint")
        return Sources(target, vit=vit, lm=lm, composed=parsed)
    perceiver = open_checkpoint(parsed, "perceiver")
    if perceiver.path == target.path:
        raise BadInputError(
            f"the perceiver is the target itself ({target.path})", hint="pass a small VLM as --perceiver"
        )
    _require_role(perceiver, Role.PERCEIVER, "perceiver")
    return Sources(target, perceiver=perceiver)
