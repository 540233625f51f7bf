"""Gate 3b (issue 14): typed validation at the boundaries other than recipes: config.json, dpa.yaml and
dpa_export.json, every JSON / YAML file a user hands dpa, and the command line itself.

Each test is one class of bad input, fed by variants generated here (every field x every wrong spelling,
every command x every option), not by a handful of named cases: each variant must give exit 2, one `error:`
line (plus at most a hint) naming the file / key / flag, no traceback, and leave every input as it was.
A few valid spellings of the same fields are run too, so the gate is seen not to block everything.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from tests.factories import SPECS
from tests.test_bad_inputs import tree_hash

runner = CliRunner()
DEEP = 100_000  # levels of [[[...]]]: far past Python's recursion limit


@pytest.fixture(scope="module", autouse=True)
def _command_built_once():
    """CliRunner turns the Typer app into its click command on every call (80 ms of signature reading); the
    command is the same each time, so the hundreds of variants here build it once."""
    import typer.testing

    built = typer.main.get_command(app)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            typer.testing,
            "_get_command",
            lambda typer_app: built if typer_app is app else typer.main.get_command(typer_app),
        )
        yield


# --- the standard every refusal meets ------------------------------------------------------------------------
def refusal_problem(
    argv: list[str], needles: tuple[str, ...], watched: tuple[Path, ...], env: dict | None = None, code: int = 2
) -> str | None:
    """Run `dpa ARGV`; None when it is refused the standard way, else what went wrong (for a failure list)."""
    before = tree_hash(*watched)
    result = runner.invoke(app, argv, env=env)
    stderr = result.stderr
    lines = stderr.strip().splitlines()
    problems = [
        "traceback"
        if "Traceback" in stderr or not (result.exception is None or isinstance(result.exception, SystemExit))
        else "",
        f"exit {result.exit_code}" if result.exit_code != code else "",
        "not one error line" if not (lines and lines[0].startswith("error:") and len(lines) <= 2) else "",
        *(f"no {needle!r}" for needle in needles if needle not in (lines[0] if lines else "")),
        "an input changed" if tree_hash(*watched) != before else "",
    ]
    found = [p for p in problems if p]
    return (
        f"{' '.join(argv)[-160:]}: {', '.join(found)} | {stderr.strip()[:300]!r} {result.exception!r}"
        if found
        else None
    )


def assert_all_refused(failures: list[str | None], count: int) -> None:
    failures = [f for f in failures if f]
    assert count > 0
    assert not failures, f"{len(failures)} of {count} variants were not refused cleanly:\n" + "\n".join(failures[:15])


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """A private copy of every tiny checkpoint family (config.json is edited in place, then restored)."""
    root = tmp_path_factory.mktemp("gate-ckpt")
    return {name: Path(shutil.copytree(tiny_checkpoint(name), root / name)) for name in SPECS}


@pytest.fixture(scope="module")
def workspace(dpa_workspace, tmp_path_factory) -> Path:
    """A private copy of a real upgraded workspace (dpa.yaml is edited in place, then restored)."""
    return Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path_factory.mktemp("gate-ws") / "ws"))


def edited(path: Path, variants: Iterator[tuple[str, Any]], dump: Callable[[Any], str]) -> Iterator[tuple[str, Any]]:
    """Write each variant's document into `path` while the caller runs it (which must leave it as written); the
    original bytes come back after."""
    original = path.read_bytes()
    try:
        for label, document in variants:
            text = document if isinstance(document, str) else dump(document)
            path.write_text(text)
            yield label, document
            assert path.read_text() == text, f"{path.name} was changed by the run of {label}"
    finally:
        path.write_bytes(original)


# --- config.json ---------------------------------------------------------------------------------------------
# Fields dpa itself reads (null is wrong too), shape fields transformers builds from (null means "default"),
# and token ids dpa looks up. A layer count may be 0 (the ViT-only ablation), no other size.
DPA_READS = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "image_size",
    "patch_size",
    "depth",
    "embed_dim",
    "mm_hidden_size",
    "n_embd",
    "n_layer",
    "d_model",
    "num_layers",
)
BUILD_SIZES = (
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_heads",
    "out_hidden_size",
    "max_position_embeddings",
    "projection_dim",
)
TOKEN_IDS = (
    "image_token_id",
    "image_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
    "video_token_id",
    "perceiver_image_token_id",
)
LAYER_COUNTS = ("num_hidden_layers", "depth", "n_layer", "num_layers")
SUB_CONFIGS = ("text_config", "vision_config", "perceiver_config")
WRONG_SIZES = {
    "string": "big",
    "negative": -8,
    "zero": 0,
    "float": 1.5,
    "integral float": 64.0,
    "null": None,
    "bool": True,
    "list": [4],
}
WRONG_TOKENS = {"string": "7", "negative": -1, "float": 1.5, "bool": False, "list": [3]}
WRONG_SUBS = {"null": None, "string": "x", "list": [], "number": 3, "bool": True}


def _fields(config: dict, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(key path, key, value) of every field at the top and in every sub-config, recursively."""
    for key, value in config.items():
        where = f"{path}.{key}" if path else key
        yield where, key, value
        if key in SUB_CONFIGS and isinstance(value, dict):
            yield from _fields(value, where)


def _set(config: dict, path: str, value: Any) -> dict:
    copy = json.loads(json.dumps(config))
    node = copy
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return copy


def config_variants(config: dict) -> Iterator[tuple[str, dict]]:
    """Every numeric field dpa reads x every wrong spelling, every sub-config x every non-object; the shape
    fields only transformers reads get one wrong spelling each, in turn."""
    turn = 0
    for path, key, _ in _fields(config):
        if key in DPA_READS:
            for label, wrong in WRONG_SIZES.items():
                if label != "zero" or key not in LAYER_COUNTS:  # 0 layers: the ViT-only ablation
                    yield path, _set(config, path, wrong)
        elif key in BUILD_SIZES:
            wrongs = [w for label, w in WRONG_SIZES.items() if label != "null"]  # null: transformers' default
            turn += 1
            yield path, _set(config, path, wrongs[turn % len(wrongs)])
        elif key in TOKEN_IDS:
            for wrong in WRONG_TOKENS.values():
                yield path, _set(config, path, wrong)
        elif key in SUB_CONFIGS:
            for wrong in WRONG_SUBS.values():
                yield path, _set(config, path, wrong)


ONE_PER_FAMILY = list({spec.family: name for name, spec in reversed(SPECS.items())}.values())


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_config_json_fields_of_the_wrong_type_are_named_by_inspect(checkpoints, name):
    folder = checkpoints[name]
    config = json.loads((folder / "config.json").read_text())
    variants = list(config_variants(config))
    before = tree_hash(folder)
    failures = [
        refusal_problem(["inspect", str(folder)], (f"{folder}/config.json: {path} ",), ())
        for path, _ in edited(folder / "config.json", iter(variants), json.dumps)
    ]
    assert_all_refused(failures, len(variants))
    assert tree_hash(folder) == before


VALID_SPELLINGS = [
    ("text_config.head_dim", None),
    ("text_config.num_key_value_heads", None),
    ("image_token_index", None),
    ("text_config.rope_parameters", None),
]


def test_valid_spellings_of_the_same_fields_still_pass(checkpoints, tmp_path):
    folder = checkpoints["llava_next"]
    config = json.loads((folder / "config.json").read_text())
    for path, value in edited(
        folder / "config.json", iter([(p, _set(config, p, v)) for p, v in VALID_SPELLINGS]), json.dumps
    ):
        result = runner.invoke(app, ["inspect", str(folder), "--json"])
        assert result.exit_code == 0, (path, result.stderr)


# Fields transformers' own config classes validate (dpa does not read them): refused by `dpa upgrade` before the
# tokenizer or the plan meet them, named by key path.
TRANSFORMERS_FIELDS = {
    "tie_word_embeddings": [None, "yes", 1],
    "text_config.tie_word_embeddings": ["no"],
    "vision_feature_layer": ["last", 1.5, None],
    "vision_feature_select_strategy": [3, None, ["full"]],
    "image_grid_pinpoints": ["big", 3],
    "text_config.rope_parameters": ["x", 3, [1]],
    "text_config.layer_types": ["full_attention", [1, 2]],
}


@pytest.mark.parametrize(
    "role,name",
    [
        ("target", "llava"),
        ("target", "llava_next"),
        ("target", "causal_lm_llama"),
        ("perceiver", "qwen2_5_vl"),
        ("perceiver", "idefics3"),
    ],
)
def test_config_json_fields_transformers_refuses_are_named_by_upgrade(
    checkpoints, tiny_checkpoint, tmp_path, role, name
):
    folder = checkpoints[name]
    config = json.loads((folder / "config.json").read_text())
    prefix = "" if "text_config" in config else "text_config."
    variants = [
        (p.removeprefix(prefix) if not prefix or p.startswith(prefix) else p, v)
        for p, values in TRANSFORMERS_FIELDS.items()
        for v in values
    ]
    variants = [(p, _set(config, p, v)) for p, v in variants if _has(config, p)]
    other = tiny_checkpoint("qwen2_5_vl" if role == "target" else "llava")
    pair = (folder, other) if role == "target" else (other, folder)
    argv = ["upgrade", str(pair[0]), "--perceiver", str(pair[1]), "-o", str(tmp_path / "out"), "--dry-run"]
    failures = [
        refusal_problem(argv, (f"{folder}/config.json: {path}",), (folder, tmp_path))
        for path, _ in edited(folder / "config.json", iter(variants), json.dumps)
    ]
    assert_all_refused(failures, len(variants))


def _without(config: dict, path: str) -> dict:
    copy = json.loads(json.dumps(config))
    node = copy
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    del node[last]
    return copy


@pytest.mark.parametrize("name", ["llava", "llava_onevision", "causal_lm_qwen3", "llava_original_llama"])
def test_config_json_without_the_widths_the_surgery_reads_is_named_by_upgrade(
    checkpoints, tiny_checkpoint, tmp_path, name
):
    """transformers would fill a missing vocab_size or hidden_size with its default (32000, 4096)."""
    folder = checkpoints[name]
    config = json.loads((folder / "config.json").read_text())
    paths = (
        ["text_config", "text_config.vocab_size", "text_config.hidden_size"]
        if "text_config" in config
        else ["vocab_size", "hidden_size"]
    )
    argv = ["upgrade", str(folder), "--perceiver", str(tiny_checkpoint("qwen2_5_vl")), "-o", str(tmp_path / "o")]
    variants = [(p, _without(config, p)) for p in paths]
    failures = [
        refusal_problem(argv, (f"config.json: {path} is missing",), (folder, tmp_path))
        for path, _ in edited(folder / "config.json", iter(variants), json.dumps)
    ]
    assert_all_refused(failures, len(variants))


def _has(config: dict, path: str) -> bool:
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _encoders() -> list[str]:
    """Model types transformers maps to a *ForCausalLM although they are encoders or encoder-decoders."""
    from transformers.models.auto import modeling_auto as auto

    causal = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    encoders = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    return sorted(causal & encoders)


def test_encoder_folders_are_refused_not_taken_for_causal_lms(tmp_path):
    folder = tmp_path / "encoder"
    folder.mkdir()
    failures, kinds = [], _encoders()
    assert {"bert", "roberta", "bart"} <= set(kinds)
    for kind in kinds:
        (folder / "config.json").write_text(json.dumps({"model_type": kind, "hidden_size": 32, "vocab_size": 99}))
        failures.append(
            refusal_problem(["inspect", str(folder)], (f"model_type {kind!r}", "not a decoder-only"), (folder,))
        )
    assert_all_refused(failures, len(kinds))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 32, "vocab_size": 99}))
    decoder = runner.invoke(app, ["inspect", str(folder)])
    assert "not a decoder-only" not in decoder.stderr and "no *.safetensors" in decoder.stderr  # detected, then read


# --- dpa.yaml -----------------------------------------------------------------------------------------------
def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(key path, value) of every key of a parsed YAML document, containers included (depth first)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key), item
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*path, index), item
            yield from _leaves(item, (*path, index))


def _shown(path: tuple) -> str:
    """The key path as the error names it: `plan.kept['target vision'].tensors`, `plan.notes[0]`."""
    out = ""
    for key in path:
        plain = isinstance(key, str) and key.replace("_", "a").replace("-", "a").isalnum() and not key[0].isdigit()
        out += (f".{key}" if out else key) if plain else f"[{key!r}]"
    return out


def _replaced(document: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    copy = deepcopy(document)
    node = copy
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return copy


def _wrong(value: Any) -> Any:
    """A value of another type than the one dpa writes there."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, str):
        return [value]
    if value is None:
        return {"a": 1}
    return "x"


STAGE1 = {
    "recipe": {"name": "stage1", "trainable": {"phi": "full"}},
    "source": "model",
    "data": {"path": "captions.json", "fingerprint": "0" * 64},
    "steps": 3,
    "final_loss": 1.25,
    "train_loss": 1.5,
    "seconds": 2.0,
    "tokens_seen": 1000,
    "skipped_samples": {"count": 1, "by_kind": {"x": 1}},
    "lora": False,
    "deepspeed": None,
    "world_size": 1,
    "notes": ["a note"],
    "text_only_batches": [0],
}
# Keys read back as paths (hashed by `dpa verify`): these must stay inside the workspace.
OUTSIDE = (
    "../outside.txt",
    "/etc/hostname",
    "model/../../outside.txt",
    "~/outside.txt",
    "model/./../../x",
    "..",
    "C:/x",
    "model\\..\\..\\x",
    "",
)


@pytest.fixture(scope="module")
def manifest(workspace) -> dict:
    document = yaml.safe_load((workspace / "dpa.yaml").read_text())
    document["stages"] = {"stage1": STAGE1}  # the stage record `dpa train` writes, to vary as well
    return document


def _kind_of(path: tuple) -> tuple:
    """The key path with file names, part labels and list positions folded: one variant stands for its kind
    (every entry of `checksums:` follows the rule of the first)."""
    return tuple("*" if not isinstance(key, str) or not _shown((key,)).isidentifier() else key for key in path)


def manifest_variants(document: dict) -> Iterator[tuple[str, Any]]:
    """Every key of the manifest with a value of the wrong type; `needle`: the key path the error names."""
    seen = set()
    for path, value in _leaves(document):
        if path[0] == "dpa_workspace" or path[:3] == ("stages", "stage1", "recipe") and len(path) > 3:
            continue  # the format marker has its own message; recipe values are the Trainer's (gate 3a)
        if _kind_of(path) not in seen:
            seen.add(_kind_of(path))
            yield _shown(path), _replaced(document, path, _wrong(value))


# Keys `dpa upgrade` always writes: a dpa.yaml without one was edited by hand.
REQUIRED = {
    ("created",),
    ("versions",),
    ("options",),
    ("plan",),
    ("upgrade",),
    ("stages",),
    ("checksums",),
    ("plan", "target"),
    ("plan", "perceiver"),
    ("plan", "dimensions"),
    ("plan", "dimensions", "target_width"),
    ("plan", "target", "path"),
    ("plan", "perceiver", "kind"),
    ("options", "shard_size"),
    ("upgrade", "written"),
    ("plan", "config", "image_token"),
}


def test_every_dpa_yaml_key_of_the_wrong_type_is_named(workspace, manifest):
    """`dpa verify` reads every key path (it is the fastest reader); the other commands share the check."""
    variants = list(manifest_variants(manifest))
    before = tree_hash(workspace)
    failures = [
        refusal_problem(["verify", str(workspace)], (f"dpa.yaml: {needle} ",), ())
        for needle, _ in edited(workspace / "dpa.yaml", iter(variants), yaml.safe_dump)
    ]
    assert_all_refused(failures, len(variants))
    assert tree_hash(workspace) == before


def test_dpa_yaml_keys_missing(workspace, manifest):
    """Required keys missing are refused by name; optional ones (a stage record's keys) may be left out."""
    required = [(_shown(p), _replaced(manifest, p, None, delete=True)) for p in sorted(REQUIRED)]
    failures = [
        refusal_problem(["verify", str(workspace)], (f"dpa.yaml: {needle} is missing",), (workspace,))
        for needle, _ in edited(workspace / "dpa.yaml", iter(required), yaml.safe_dump)
    ]
    assert_all_refused(failures, len(required))
    optional = [(key, _replaced(manifest, ("stages", "stage1", key), None, delete=True)) for key in STAGE1]
    for key, _ in edited(workspace / "dpa.yaml", iter(optional), yaml.safe_dump):
        result = runner.invoke(app, ["verify", str(workspace)])
        assert result.exit_code == 0, (key, result.stderr)


def _with_checksum(document: dict, key: str) -> dict:
    copy = deepcopy(document)
    copy["checksums"][key] = "0" * 64
    return copy


@pytest.fixture
def spy_hashes(monkeypatch) -> list[Path]:
    """Every file `dpa verify` hashes (the real hashing runs; the list only records what it read)."""
    from dpa_cli import checksums

    seen: list[Path] = []
    real = checksums.file_digest

    def recording(path, *args):
        seen.append(Path(path).resolve())
        return real(path, *args)

    monkeypatch.setattr(checksums, "file_digest", recording)
    return seen


def test_dpa_yaml_paths_that_leave_the_workspace_are_refused_and_nothing_outside_is_read(
    workspace, manifest, spy_hashes
):
    outside = workspace.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("not yours")
    link = workspace / "link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        keys = [*OUTSIDE, "link/secret.txt"]
        variants = [(repr(key), _with_checksum(manifest, key)) for key in keys]
        failures = [
            refusal_problem(["verify", str(workspace)], ("dpa.yaml: checksums key", needle), (workspace, outside))
            for needle, _ in edited(workspace / "dpa.yaml", iter(variants), yaml.safe_dump)
        ]
        assert_all_refused(failures, len(variants))
    finally:
        link.unlink()
    assert all(workspace.resolve() in path.parents for path in spy_hashes)


def test_symlinks_on_disk_that_lead_out_are_refused_by_name_before_hashing(workspace, spy_hashes):
    """Not a key but a file: a link planted in model/ (to a file, to a folder), or model/ itself a link."""
    outside = workspace.parent / "outside-disk"
    (outside / "model").mkdir(parents=True, exist_ok=True)
    (outside / "secret.txt").write_text("not yours")
    failures = []
    for name, target in (("model/planted.txt", outside / "secret.txt"), ("model/planted-dir", outside)):
        (workspace / name).symlink_to(target)
        try:
            failures.append(refusal_problem(["verify", str(workspace)], (name, "outside"), (workspace, outside)))
        finally:
            (workspace / name).unlink()
    moved = workspace.parent / "model-moved"
    (workspace / "model").rename(moved)
    (workspace / "model").symlink_to(moved, target_is_directory=True)
    try:
        failures.append(refusal_problem(["verify", str(workspace)], ("'model/", "outside"), (workspace,)))
    finally:
        (workspace / "model").unlink()
        moved.rename(workspace / "model")
    assert_all_refused(failures, 3)
    assert not spy_hashes  # refused before one file was hashed
    assert runner.invoke(app, ["verify", str(workspace)]).exit_code == 0


SHAPES = {
    "stages as a string": ("stages", "stage1"),
    "plan a number": ("plan", 5),
    "stages a list": ("stages", []),
    "checksums a list": ("checksums", ["model/config.json"]),
    "target width text": (("plan", "dimensions", "target_width"), "64"),
}


@pytest.mark.parametrize("command", ["train", "export", "generate", "verify", "eval", "bench-infer"])
def test_every_command_that_reads_dpa_yaml_refuses_a_wrong_shape(workspace, manifest, data_files, tmp_path, command):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"question": "What?", "answer": "red"}]))  # train reads it only after dpa.yaml
    argv = {
        "train": ["train", "--stage", "2", "-w", str(workspace), "--data", str(data)],
        "export": ["export", "-w", str(workspace), "-o", str(tmp_path / "exp"), "--no-verify"],
        "generate": ["generate", str(workspace), "-p", "hi"],
        "verify": ["verify", str(workspace)],
        "eval": ["eval", str(workspace), "-d", str(data), "-o", str(tmp_path / "p.jsonl")],
        "bench-infer": ["bench", "infer", str(workspace), "--workdir", str(tmp_path)],
    }[command]
    variants = []
    for path, value in SHAPES.values():
        path = path if isinstance(path, tuple) else (path,)
        variants.append((_shown(path), _replaced(manifest, path, value)))
    failures = [
        refusal_problem(argv, (f"dpa.yaml: {needle} must be",), (workspace, tmp_path))
        for needle, _ in edited(workspace / "dpa.yaml", iter(variants), yaml.safe_dump)
    ]
    assert_all_refused(failures, len(variants))


# --- dpa_export.json ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gate-export") / "export"
    result = runner.invoke(app, ["export", "-w", str(workspace), "-o", str(out), "--no-verify", "--json"])
    assert result.exit_code == 0, result.stderr
    return out


def test_dpa_export_json_of_the_wrong_shape_or_leaving_the_export_is_refused(export, spy_hashes):
    record = json.loads((export / "dpa_export.json").read_text())
    variants = [
        (f"{_shown(p)} ", _replaced(record, p, _wrong(v)))
        for p, v in _leaves(record)
        if p[0] not in ("dpa_export", "weights")
    ]
    variants += [
        (f"{_shown(p)} is missing", _replaced(record, p, None, delete=True))
        for p in [("checksums",), ("verified",), ("path",)]
    ]
    variants += [("checksums key", _with_checksum(record, key)) for key in OUTSIDE]
    failures = [
        refusal_problem(["verify", str(export)], (f"dpa_export.json: {needle}",), (export,))
        for needle, _ in edited(export / "dpa_export.json", iter(variants), json.dumps)
    ]
    assert_all_refused(failures, len(variants))
    assert all(export.resolve() in path.parents for path in spy_hashes)


# --- JSON / YAML nested too deeply, and numbers JSON has no room for --------------------------------------------
def _deep(kind: str = "json") -> str:
    return "[" * DEEP + "]" * DEEP if kind == "json" else "a: " + "[" * DEEP + "]" * DEEP + "\n"


NUMBERS = {
    "nested": _deep(),
    "NaN": '{"hidden_size": NaN}',
    "Infinity": '{"x": [Infinity]}',
    "overflowing float": '{"x": 1e999}',
    "5000 digits": '{"x": ' + "7" * 5000 + "}",
}


def test_every_kind_of_json_or_yaml_file_nested_too_deeply_is_one_line(
    checkpoints, workspace, export, tmp_path, data_files, tiny_checkpoint
):
    """One file of each kind a user hands dpa, 100k levels deep (and bad numbers where JSON has them)."""
    images = data_files / "images"
    target, perceiver = checkpoints["llava"], checkpoints["qwen2_5_vl"]
    clean = [
        {
            "id": "a",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Red."}],
        }
    ]
    train = ["train", "--stage", "1", "-w", str(workspace), "--image-root", str(images)]
    cases: list[tuple[Path, str, list[str], tuple[str, ...], dict | None]] = []

    def case(path: Path, text: str, argv: list[str], needle: str | None = None, env: dict | None = None) -> None:
        cases.append((path, text, argv, (needle or path.name,), env))

    for text in NUMBERS.values():
        case(target / "config.json", text, ["inspect", str(target)], "config.json")
    for name in ("tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        case(perceiver / name, _deep(), ["upgrade", str(target), "-p", str(perceiver), "-o", str(tmp_path / "o")])
    case(
        workspace / "model" / "processor_config.json",
        _deep(),
        ["export", "-w", str(workspace), "-o", str(tmp_path / "e"), "--no-verify"],
    )
    case(export / "processor_config.json", _deep(), ["generate", str(export), "-p", "Hi?"])
    data = tmp_path / "clean.json"
    data.write_text(json.dumps(clean))
    case(workspace / "model" / "processor_config.json", _deep(), ["data", "check", str(data), "-w", str(workspace)])
    for text in NUMBERS.values():
        case(
            tmp_path / "data.json",
            text,
            ["data", "check", str(tmp_path / "data.json"), "-w", str(workspace)],
            "data.json",
        )
    case(
        tmp_path / "items.jsonl",
        _deep(),
        ["eval", str(workspace), "-d", str(tmp_path / "items.jsonl"), "-o", str(tmp_path / "p.jsonl")],
    )
    case(
        tmp_path / "recipe.yaml",
        _deep("yaml"),
        [*train, "--data", str(data), "--recipe", str(tmp_path / "recipe.yaml")],
    )
    case(
        tmp_path / "unused",
        "",
        [*train, "--data", str(data), "--set", "warmup_steps=" + "[" * DEEP],
        "nested too deeply",
    )
    case(workspace / "dpa.yaml", _deep("yaml"), ["verify", str(workspace)], "dpa.yaml")
    case(export / "dpa_export.json", _deep(), ["verify", str(export)])
    case(tmp_path / "catalog.yaml", _deep("yaml"), ["catalog"], env={"DPA_CATALOG": str(tmp_path / "catalog.yaml")})
    failures = [_deepspeed_refusal(tmp_path / "ds.json")]
    for path, text, argv, needles, env in cases:
        original = path.read_bytes() if path.exists() else None
        path.write_text(text)
        try:
            failures.append(refusal_problem(argv, needles, (), env=env))
        finally:
            path.write_bytes(original) if original is not None else path.unlink()
    assert_all_refused(failures, len(cases) + 1)


def _deepspeed_refusal(path: Path) -> str | None:
    """--deepspeed FILE is read when the training arguments are made (after gate 3a's own checks of the flag)."""
    from dpa_cli.errors import BadInputError
    from dpa_cli.train.plan import deepspeed_config

    path.write_text(_deep())
    try:
        deepspeed_config(str(path))
    except BadInputError as err:
        return None if "ds.json: nested too deeply" in err.message else err.message
    return "--deepspeed with a 100k-deep file was accepted"


def test_a_deep_jsonl_line_is_a_bad_record_and_a_deep_adapter_config_is_refused(workspace, tmp_path):
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps({"id": "ok", "conversations": []}) + "\n" + _deep() + "\n")
    result = runner.invoke(app, ["data", "check", str(lines), "-w", str(workspace), "--json"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    found = {p["kind"]: p for p in json.loads(result.stdout)["problems"]}
    assert found["bad_record"]["examples"] == ["#1"] and "nested too deeply" in found["bad_record"]["message"]
    ws = Path(shutil.copytree(workspace, tmp_path / "ws", symlinks=True))
    shutil.copytree(ws / "model", ws / "stage2" / "model")
    (ws / "stage2" / "adapter").mkdir()
    (ws / "stage2" / "adapter" / "adapter_config.json").write_text(_deep())
    argv = ["export", "-w", str(ws), "-o", str(tmp_path / "e"), "--no-verify"]
    assert_all_refused([refusal_problem(argv, ("adapter_config.json", "nested too deeply"), (ws,))], 1)


# --- the command line ----------------------------------------------------------------------------------------
def _commands() -> list[tuple[list[str], Any]]:
    """(path, click command) of every leaf command: `inspect`, `bench infer`, `data check`..."""
    found = []

    def walk(command: Any, path: list[str]) -> None:
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            found.append((path, command))

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = _commands()
IDS = [" ".join(path) for path, _ in COMMANDS]


def _options(command: Any) -> list[Any]:
    return [p for p in command.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]


def _annotation(param: Any) -> str:
    descriptor = getattr(param, "type_descriptor", None)
    return str(getattr(descriptor, "annotation", None) or getattr(param, "type", ""))


def _dummy(param: Any) -> str:
    kind = _annotation(param)
    return "1" if "int" in kind else "1.0" if "float" in kind else "x"


def _required(command: Any, skip: Any = None) -> list[str]:
    """Placeholder values for the command's required arguments and options (so parsing gets to the check)."""
    argv: list[str] = []
    for param in command.params:
        if param is skip:
            continue
        if param.required and param.param_type_name == "argument":
            argv.append(_dummy(param))
        elif param.required:
            argv += [param.opts[0], _dummy(param)]
    return argv


def test_the_command_tree_is_the_one_these_variants_cover():
    assert {
        "inspect",
        "upgrade",
        "train",
        "export",
        "demo",
        "bench infer",
        "data check",
        "analyze modality-gap",
    } <= set(IDS)


@pytest.mark.parametrize("path,command", COMMANDS, ids=IDS)
def test_usage_errors_are_one_line_for_every_command(path, command, tmp_path):
    """Unknown options (and misspellings of real ones), and values of the wrong type for typed options. A command
    that hands unknown options to the program it starts (`dpa serve`: vLLM's) is checked on its typed ones."""
    base = [*path, *_required(command)]
    passes_through = command.context_settings.get("ignore_unknown_options", False)
    variants = [
        ([*base, "--no-such-flag"], ("No such option: --no-such-flag",)),
        ([*base, "--jsn"], ("No such option: --jsn",)),
        ([*base, "-Z"], ("-Z",)),
    ][: 0 if passes_through else None]
    for param in _options(command):
        if "int" in _annotation(param) or "float" in _annotation(param):
            variants.append(([*path, *_required(command, skip=param), param.opts[0], "lots"], (f"'{param.opts[0]}'",)))
    failures = [refusal_problem(argv, needles, (tmp_path,)) for argv, needles in variants]
    if variants:
        assert_all_refused(failures, len(variants))
    if not passes_through:
        hint = runner.invoke(app, [*path, "--no-such-flag"]).stderr.strip().splitlines()[-1].strip()
        assert hint == f"see dpa {' '.join(path)} --help"


@pytest.mark.parametrize("path,command", COMMANDS, ids=IDS)
def test_single_valued_options_given_twice_are_refused_for_every_command(path, command, tmp_path):
    variants = []
    for param in _options(command):
        if param.multiple or getattr(param, "count", False) or param.is_eager:
            continue
        flag = max(param.opts, key=len)
        given = [[name] if param.is_flag else [name, _dummy(param)] for name in (param.opts[0], param.opts[-1])]
        if param.secondary_opts:
            given = [[param.opts[0]], [param.secondary_opts[0]]]  # --verify --no-verify: which one?
        argv = [*path, *_required(command, skip=param), *given[0], *given[1]]
        variants.append((argv, (flag, "is given 2 times")))
    failures = [refusal_problem(argv, needles, (tmp_path,)) for argv, needles in variants]
    if variants:
        assert_all_refused(failures, len(variants))
    many = [p for p in _options(command) if p.multiple]
    for param in many:  # options meant to repeat still do
        result = runner.invoke(app, [*path, *_required(command), param.opts[0], "a", param.opts[0], "b"])
        assert "is given 2 times" not in result.stderr


OUTPUT_OPTIONS = ("--output", "--workdir")
WITH_OUTPUT = [
    (path, command) for path, command in COMMANDS if any(set(p.opts) & set(OUTPUT_OPTIONS) for p in _options(command))
]


@pytest.mark.parametrize("path,command", WITH_OUTPUT, ids=[" ".join(p) for p, _ in WITH_OUTPUT])
def test_an_output_below_a_regular_file_names_that_file_for_every_command(path, command, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    variants = []
    for param in _options(command):
        if set(param.opts) & set(OUTPUT_OPTIONS):
            for below in ("ws", "deeper/ws", "x.jsonl"):
                for name in param.opts:
                    argv = [*path, *_required(command), name, str(blocker / below)]
                    variants.append((argv, (f"{blocker} is a file, not a folder",)))
    failures = [refusal_problem(argv, needles, (tmp_path,)) for argv, needles in variants]
    assert_all_refused(failures, len(variants))
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("flag", ["--shard-size"])
@pytest.mark.parametrize("value", ["lots", "5XB", "0", "GB", "1e999GB", "1.5.2MB"])
def test_a_bad_size_names_its_flag(flag, value, tmp_path, tiny_checkpoint):
    for argv in (
        [
            "upgrade",
            str(tiny_checkpoint("llava")),
            "-p",
            str(tiny_checkpoint("qwen2_5_vl")),
            flag,
            value,
            "-o",
            str(tmp_path / "o"),
        ],
        ["export", flag, value],
    ):
        assert_all_refused([refusal_problem(argv, (f"'{flag}'", "bad size"), (tmp_path,))], 1)
