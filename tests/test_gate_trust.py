"""Gate 2 of issue 14: no model code but dpa's own runs without --trust-remote-code, whatever folder a command
loads and wherever in it a config points transformers at code.

Foreign code is planted as `evil.py` (or as an altered copy of one of dpa's own model files) whose import
writes a sentinel file. It is named from every config transformers reads (config, tokenizer, processor, a
processor's nested sub-processor, the `perceiver_tokenizer/` sub-folder, a relative import of dpa's own
files), in every form of `auto_map` (string, slow/fast list, `repo--module.Class`), and read by every
command that loads a folder (workspace `model/`, a stage, an export, a `--baseline`). The command either
works with dpa's installed classes or refuses in one `error:` line; the sentinel never appears. With
--trust-remote-code the planted code does run, so a gate that blocked everything would be noticed.
"""

from __future__ import annotations

import ast
import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.errors import DpaError
from tests.test_bad_inputs import tree_hash

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parents[1] / "dpa_cli"
ROOT = PACKAGE.parent
EVIL = "evil"


# --- planting ------------------------------------------------------------------------------------------------
def evil_code(sentinel: Path) -> str:
    """A module that marks its import; its names alias LLaVA-NeXT's classes, so a load that runs it also works.
    (For `model_type: dpa` transformers prefers the class dpa registers to any folder's code.)"""
    return (
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import LlavaNextConfig as Evil, LlavaNextForConditionalGeneration as EvilModel\n"
    )


# The forms an `auto_map` entry takes; `module` is the Python file it names (without .py).
FORMS: dict[str, Callable[[str], object]] = {
    "string": lambda module: f"{module}.Evil",
    "slow-list": lambda module: [f"{module}.Evil", None],
    "fast-list": lambda module: [None, f"{module}.Evil"],
    "repo": lambda module: f"someone/elsewhere--{module}.Evil",
}
STRING_FORMS = ("string", "repo")  # what transformers accepts outside tokenizer_config.json


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _auto_map(path: Path, key: str, ref: object, **extra: object) -> None:
    edit_json(path, lambda c: c.update(auto_map={**(c.get("auto_map") or {}), key: ref}, **extra))


@dataclass(frozen=True)
class Plant:
    """Where in a model folder foreign code is named. `plant(folder, ref, code)` edits the folder; `dpa_only`:
    the place exists in DPA folders only; `lists`: the config takes the list forms (tokenizers); `config`: the
    file a refusal names; `refused`: the code is needed (no installed class can stand in), so loads refuse."""

    id: str
    plant: Callable[[Path, object, str], None]
    dpa_only: bool = False
    lists: bool = False
    refused: bool = False
    config: str = ""
    workspace: bool = True  # also planted in a workspace (whose dpa.yaml fixes the model type: checked first)
    carried: bool = True  # a copy of the folder carries it on (not an altered copy of dpa's file, which dpa rewrites)


def _config(folder: Path, ref: object, code: str) -> None:
    (folder / "evil.py").write_text(code)
    model = json.loads(json.dumps(ref).replace(".Evil", ".EvilModel"))
    edit_json(
        folder / "config.json",
        lambda c: c.update(
            auto_map={**(c.get("auto_map") or {}), "AutoConfig": ref, "AutoModelForImageTextToText": model}
        ),
    )


def _tokenizer(folder: Path, ref: object, code: str) -> None:
    (folder / "evil.py").write_text(code)
    _auto_map(folder / "tokenizer_config.json", "AutoTokenizer", ref)


def _processor(folder: Path, ref: object, code: str) -> None:
    (folder / "evil.py").write_text(code)
    _auto_map(folder / "processor_config.json", "AutoProcessor", ref)


def _nested(folder: Path, ref: object, code: str) -> None:
    """processor_config.json's sub-processor dict with an auto_map of its own."""
    (folder / "evil.py").write_text(code)
    edit_json(
        folder / "processor_config.json", lambda c: c["image_processor"].update(auto_map={"AutoImageProcessor": ref})
    )


def _sub_folder(folder: Path, ref: object, code: str) -> None:
    for where in (folder, folder / "perceiver_tokenizer"):
        (where / "evil.py").write_text(code)
    _auto_map(folder / "perceiver_tokenizer" / "tokenizer_config.json", "AutoTokenizer", ref)


def _append_mark(path: Path, code: str) -> None:
    """The sentinel lines of `code` appended to a copy of dpa's own file: one change makes it someone else's."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n" + "\n".join(code.splitlines()[:2]) + "\n")


def _altered_own(folder: Path, ref: object, code: str) -> None:
    """dpa's own modeling file with code appended: the existing auto_map still names it."""
    _append_mark(folder / "modeling_dpa.py", code)


def _altered_import(folder: Path, ref: object, code: str) -> None:
    """dpa's configuration file altered and no auto_map naming it: modeling_dpa.py imports it relatively."""
    _append_mark(folder / "configuration_dpa.py", code)
    edit_json(folder / "config.json", lambda c: c["auto_map"].pop("AutoConfig"))


# Where no installed class can stand in for the foreign code: the same places, with a class transformers lacks.
def _unknown_model_type(folder: Path, ref: object, code: str) -> None:
    _config(folder, ref, code)
    edit_json(folder / "config.json", lambda c: c.update(model_type="evil_vlm"))


def _unknown_processor(folder: Path, ref: object, code: str) -> None:
    _processor(folder, ref, code)
    edit_json(folder / "processor_config.json", lambda c: c.update(processor_class="EvilProcessor"))


def _unknown_image_processor(folder: Path, ref: object, code: str) -> None:
    _nested(folder, ref, code)
    edit_json(
        folder / "processor_config.json",
        lambda c: c["image_processor"].update(image_processor_type="EvilImageProcessor"),
    )


def _unknown_perceiver_tokenizer(folder: Path, ref: object, code: str) -> None:
    _sub_folder(folder, ref, code)
    edit_json(folder / "perceiver_tokenizer" / "tokenizer_config.json", lambda c: c.update(tokenizer_class="EvilTok"))


PLANTS = (
    Plant("config", _config, config="config.json"),
    Plant("tokenizer_config", _tokenizer, lists=True, config="tokenizer_config.json"),
    Plant("processor_config", _processor, config="processor_config.json"),
    Plant("processor_config-nested", _nested, config="processor_config.json"),
    Plant(
        "perceiver_tokenizer",
        _sub_folder,
        dpa_only=True,
        lists=True,
        config="perceiver_tokenizer/tokenizer_config.json",
    ),
    Plant("altered-modeling_dpa", _altered_own, dpa_only=True, carried=False),
    Plant("altered-relative-import", _altered_import, dpa_only=True, carried=False),
    Plant("unknown-model_type", _unknown_model_type, refused=True, config="config.json", workspace=False),
    Plant("unknown-processor_class", _unknown_processor, refused=True, config="processor_config.json"),
    Plant("unknown-image_processor_type", _unknown_image_processor, refused=True, config="processor_config.json"),
    Plant(
        "unknown-perceiver-tokenizer_class",
        _unknown_perceiver_tokenizer,
        dpa_only=True,
        lists=True,
        refused=True,
        config="perceiver_tokenizer/tokenizer_config.json",
    ),
)
PLANT = {plant.id: plant for plant in PLANTS}


def forms_of(plant: Plant) -> tuple[str, ...]:
    return tuple(FORMS) if plant.lists else STRING_FORMS


def plant_into(folder: Path, plant: Plant, form: str, sentinel: Path) -> Path:
    plant.plant(folder, FORMS[form](EVIL), evil_code(sentinel))
    return folder


# --- what the commands read ----------------------------------------------------------------------------------
@dataclass
class Shared:
    workspace: Path  # an upgraded workspace (dpa's own code in model/)
    export: Path  # its export (--no-verify)
    baseline: Path  # the LLaVA-NeXT target it was upgraded from
    image: Path
    data: Path  # one LLaVA sample, for data check / train / analyze
    items: Path  # one VQA item, for eval


@pytest.fixture(scope="module")
def shared(dpa_workspace, tiny_checkpoint, tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("trust")
    workspace = Path(shutil.copytree(dpa_workspace("next_qwen"), root / "ws"))
    result = runner.invoke(app, ["export", "-w", str(workspace), "-o", str(root / "export"), "--no-verify"])
    assert result.exit_code == 0, result.output
    image = root / "red.png"
    Image.new("RGB", (40, 32), (220, 30, 30)).save(image)
    sample = {
        "id": "s",
        "image": image.name,
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red."}],
    }
    data = root / "data.json"
    data.write_text(json.dumps([sample, {**sample, "id": "t"}]))
    items = root / "items.jsonl"
    items.write_text(json.dumps({"id": "q", "image": image.name, "question": "Colour?", "answer": "red"}) + "\n")
    return Shared(workspace, root / "export", tiny_checkpoint("llava_next"), image, data, items)


@dataclass(frozen=True)
class Command:
    """A command and the folder kind it loads: `workspace` (its model/), `stage` (stage1/model of a workspace),
    `export`, or `baseline` (the original LLaVA model, handed as --baseline). `cases`: how many places it is
    tried with; `costly` ones (a training step, a benchmark) only with places whose load is refused, before
    the work; `refuses_foreign`: the command refuses foreign code it would carry on (an export ships it)."""

    id: str
    reads: str
    argv: Callable[[Shared, Path, Path], list[str]]  # (shared, the folder handed to dpa, tmp) -> argv
    stdin: str | None = None
    cases: int = 2
    costly: bool = False
    refuses_foreign: bool = False


SMALL_TRAIN = [
    "--max-steps",
    "1",
    "--set",
    "global_batch_size=2",
    "--set",
    "per_device_train_batch_size=2",
    "--set",
    "gradient_checkpointing=false",
    "--set",
    "save_steps=1000",
]


def _generate(s: Shared, model: Path, tmp: Path) -> list[str]:
    return ["generate", str(model), "--image", str(s.image), "--prompt", "Colour?", "--max-new-tokens", "1"]


COMMANDS = (
    Command("generate-workspace", "workspace", _generate, cases=1),
    Command("generate-stage", "stage", _generate, cases=1),
    Command("generate-export", "export", _generate),
    Command("chat-export", "export", lambda s, m, t: ["chat", str(m), "--max-new-tokens", "1"], stdin="Hello\n"),
    Command(
        "eval-workspace",
        "workspace",
        lambda s, m, t: ["eval", str(m), "--data", str(s.items), "--max-new-tokens", "1", "-o", str(t / "pred.jsonl")],
        cases=1,
    ),
    Command(
        "eval-baseline",
        "baseline",
        lambda s, m, t: [
            "eval",
            str(s.export),
            "--baseline",
            str(m),
            "--data",
            str(s.items),
            "--max-new-tokens",
            "1",
            "-o",
            str(t / "pred.jsonl"),
        ],
        cases=1,
    ),
    Command(
        "analyze-baseline",
        "baseline",
        lambda s, m, t: [
            "analyze",
            "modality-gap",
            str(s.export),
            "--baseline",
            str(m),
            "--data",
            str(s.data),
            "--limit",
            "1",
            "-o",
            str(t / "gap"),
        ],
        cases=1,
        costly=True,
    ),
    Command(
        "bench-infer-baseline",
        "baseline",
        lambda s, m, t: [
            "bench",
            "infer",
            str(s.export),
            "--baseline",
            str(m),
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--prompts",
            "1",
            "--max-new-tokens",
            "2",
        ],
        cases=1,
        costly=True,
    ),
    Command(
        "data-check-workspace",
        "workspace",
        lambda s, m, t: ["data", "check", str(s.data), "--image-root", str(s.image.parent), "-w", str(m)],
        cases=3,
    ),
    Command(
        "train-workspace",
        "workspace",
        lambda s, m, t: [
            "train",
            "--stage",
            "1",
            "-w",
            str(m),
            "--data",
            str(s.data),
            "--image-root",
            str(s.image.parent),
            *SMALL_TRAIN,
        ],
        cases=1,
        costly=True,
    ),
    Command(
        "export-stage",
        "stage",
        lambda s, m, t: ["export", "-w", str(m), "-o", str(t / "out")],
        cases=3,
        refuses_foreign=True,
    ),
)


def _stage_workspace(shared: Shared, tmp: Path) -> tuple[Path, Path]:
    """A private workspace whose stage 1 is a copy of its upgraded model (as training records it)."""
    from tests.trained_workspace import add_stage1

    workspace = Path(shutil.copytree(shared.workspace, tmp / "ws"))
    return workspace, add_stage1(workspace)


def handed(command: Command, shared: Shared, tmp: Path) -> tuple[Path, Path]:
    """(the folder handed to the command, the model folder in it that gets planted), private copies."""
    if command.reads == "workspace":
        workspace = Path(shutil.copytree(shared.workspace, tmp / "ws"))
        return workspace, workspace / "model"
    if command.reads == "stage":
        return _stage_workspace(shared, tmp)
    source = shared.export if command.reads == "export" else shared.baseline
    folder = Path(shutil.copytree(source, tmp / command.reads))
    return folder, folder


def usable(plant: Plant, command: Command) -> bool:
    if plant.dpa_only and command.reads == "baseline":
        return False
    if not plant.workspace and command.reads in ("workspace", "stage"):
        return False
    if command.refuses_foreign:  # refused before any work; an export of dpa's rewritten files has its own test
        return plant.carried
    return plant.refused or not command.costly


def _matrix() -> list[tuple[Command, Plant, str]]:
    """Each command with `cases` places its folder kind has, taken in turn from PLANTS so that consecutive
    commands get different ones; the auto_map form cycles through the forms the place takes."""
    cases: list[tuple[Command, Plant, str]] = []
    for command in COMMANDS:
        plants = [plant for plant in PLANTS if usable(plant, command)]
        for _ in range(command.cases):
            plant = plants[len(cases) % len(plants)]
            cases.append((command, plant, forms_of(plant)[len(cases) % len(forms_of(plant))]))
    return cases


MATRIX = _matrix()


def run_planted(shared: Shared, tmp: Path, command: Command, plant: Plant, form: str) -> tuple[object, Path, bool]:
    """Plant, run the command; check the code never ran and the planted folder is unchanged. Returns the
    result, the planted folder and whether everything the command was handed (and its tmp) stayed as it was."""
    sentinel = tmp / "sentinel"
    folder, model = handed(command, shared, tmp)
    plant_into(model, plant, form, sentinel)
    before, everything = tree_hash(model), tree_hash(tmp)
    result = runner.invoke(app, command.argv(shared, folder, tmp), input=command.stdin)
    assert not sentinel.exists(), f"{command.id}: the code planted in {plant.id} ran"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (result.stderr, result.exception)
    assert tree_hash(model) == before, "the planted folder changed"
    return result, model, tree_hash(tmp) == everything


def assert_outcome(run: tuple[object, Path, bool], plant: Plant, command: Command, log: str) -> None:
    """Works with dpa's installed classes (said in a warning), or refused in one line naming file and flag,
    having written nothing."""
    result, model, untouched = run
    if not (plant.refused or command.refuses_foreign and plant.carried):
        assert result.exit_code == 0, (result.exit_code, result.stderr[-2000:])
        assert "not dpa's own: not run" in log and "--trust-remote-code" in log, log
        return
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and lines[0].startswith("error:") and len(lines) <= 2, result.stderr
    assert untouched, "a refused command wrote something"
    assert str(model) in lines[0] and "--trust-remote-code" in result.stderr, result.stderr
    assert f"{plant.config} (" in lines[0] and "evil.py)" in lines[0], lines[0]


@pytest.mark.parametrize(("command", "plant", "form"), MATRIX, ids=[f"{c.id}-{p.id}-{f}" for c, p, f in MATRIX])
def test_planted_code_never_runs_and_the_command_works_or_refuses_in_one_line(
    shared, tmp_path, caplog, command, plant, form
):
    # The warning goes to stderr through logging; under pytest, its log capture takes it.
    assert_outcome(run_planted(shared, tmp_path, command, plant, form), plant, command, caplog.text)


GENERATE = COMMANDS[2]  # generate on an export: the model, its processor and every part of it
EVERY_PLACE = [(plant, forms_of(plant)[i % len(forms_of(plant))]) for i, plant in enumerate(PLANTS)]


@pytest.mark.parametrize(("plant", "form"), EVERY_PLACE, ids=[f"{p.id}-{f}" for p, f in EVERY_PLACE])
def test_every_place_is_gated_on_one_load_of_model_and_processor(shared, tmp_path, caplog, plant, form):
    """Each place once, through real loads; every auto_map form in every config is checked by the verdict
    tests below, without loading."""
    assert_outcome(run_planted(shared, tmp_path, GENERATE, plant, form), plant, GENERATE, caplog.text)


# --- the verdict on generated variants (no model is loaded) --------------------------------------------------
CONFIG_NAMES = (
    "config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
SUB_FOLDERS = ("", "perceiver_tokenizer", "perceiver_processor", "a/b")
KEYS = ("AutoConfig", "AutoTokenizer", "AutoProcessor", "AutoImageProcessor", "AutoModelForImageTextToText")
MODULES = ("evil", "modeling_dpa_v2", "../modeling_dpa", "sub.modeling_dpa")


def _verdict_variants() -> list[tuple[str, str, str, str, str]]:
    """Sub-folder x config file x form, each with a key and a foreign module name cycled through."""
    combos = itertools.product(SUB_FOLDERS, CONFIG_NAMES, FORMS)
    return [
        (sub, name, form, KEYS[i % len(KEYS)], MODULES[i % len(MODULES)]) for i, (sub, name, form) in enumerate(combos)
    ]


VARIANTS = _verdict_variants()


@pytest.fixture(scope="module")
def code_folder(shared, tmp_path_factory) -> Path:
    """The export's configs and code without its weights: all the verdict reads."""
    folder = tmp_path_factory.mktemp("code") / "model"
    shutil.copytree(shared.export, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("sub", "name", "form", "key", "module"), VARIANTS, ids=["-".join(v).replace("/", "_") or "root" for v in VARIANTS]
)
def test_every_auto_map_in_every_config_of_every_sub_folder_is_foreign(
    code_folder, tmp_path, sub, name, form, key, module
):
    from dpa_cli.loading import may_run_code
    from dpa_cli.trust import examine

    folder = Path(shutil.copytree(code_folder, tmp_path / "model"))
    config = folder / sub / name
    config.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(config.read_text()) if config.is_file() else {}
    nest = name == "processor_config.json" and sub == "" and form == "string"  # also the nested form
    entry = {"auto_map": {key: FORMS[form](module)}}
    config.write_text(json.dumps({**existing, "image_processor": entry} if nest else {**existing, **entry}))
    verdict = examine(folder)
    assert [(ref.config, ref.module_file) for ref in verdict.foreign] == [(config, f"{module.split('--')[-1]}.py")]
    assert not may_run_code(folder) and may_run_code(folder, allow_code=True)


@pytest.mark.parametrize("where", ["root", "perceiver_tokenizer", "both"])
@pytest.mark.parametrize("module", ["modeling_dpa", "configuration_dpa", "processing_dpa"])
def test_dpa_own_files_count_only_byte_for_byte_wherever_transformers_may_find_them(
    code_folder, tmp_path, where, module
):
    from dpa_cli.loading import may_run_code

    folder = Path(shutil.copytree(code_folder, tmp_path / "model"))
    assert may_run_code(folder)  # as dpa wrote it
    sub = folder / "perceiver_tokenizer"
    shutil.copy(folder / f"{module}.py", sub / f"{module}.py")  # an identical copy changes nothing
    _auto_map(sub / "tokenizer_config.json", "AutoTokenizer", [f"{module}.Evil", None])
    assert may_run_code(folder)
    for place in {"root": [folder], "perceiver_tokenizer": [sub], "both": [folder, sub]}[where]:
        with open(place / f"{module}.py", "a", encoding="utf-8") as handle:
            handle.write("\n# one byte more is someone else's code\n")
    assert not may_run_code(folder)


UNREADABLE = {
    "not-json": b'{"auto_map": ',
    "not-utf8": b"\xff\xfe{}",
    "too-deep": b"[" * 100_000 + b"]" * 100_000,
    "too-large": b'{"auto_map": {}}',
}


@pytest.mark.parametrize("where", ["config.json", "perceiver_tokenizer/tokenizer_config.json", "extra/config.json"])
@pytest.mark.parametrize("kind", UNREADABLE)
def test_a_config_the_gate_cannot_read_counts_as_foreign_code(code_folder, tmp_path, monkeypatch, where, kind):
    """What an unreadable config names is unknown: the gate fails closed (transformers may read it after all)."""
    import dpa_cli.trust
    from dpa_cli.loading import may_run_code

    folder = Path(shutil.copytree(code_folder, tmp_path / "model"))
    (folder / where).parent.mkdir(exist_ok=True)
    (folder / where).write_bytes(UNREADABLE[kind])
    if kind == "too-large":
        monkeypatch.setattr(dpa_cli.trust, "MAX_CONFIG_BYTES", 8)
    assert not may_run_code(folder) and may_run_code(folder, allow_code=True)


def test_a_module_that_only_dpa_own_code_imports_is_checked_too(code_folder, tmp_path):
    from dpa_cli.loading import may_run_code

    folder = Path(shutil.copytree(code_folder, tmp_path / "model"))
    plant_into(folder, PLANT["altered-relative-import"], "string", tmp_path / "sentinel")
    assert "AutoConfig" not in json.loads((folder / "config.json").read_text())["auto_map"]
    assert not may_run_code(folder)


# --- the verification child, the positive control, the flag and the one code path ----------------------------
def test_an_export_replaces_altered_copies_of_dpa_files_with_its_own(shared, tmp_path):
    """A stage whose copy of dpa's model file differs (made by another dpa version, or edited) exports: dpa's
    installed classes run it, and the export holds dpa's installed files, not the altered ones."""
    workspace, stage = _stage_workspace(shared, tmp_path)
    plant_into(stage, PLANT["altered-modeling_dpa"], "string", tmp_path / "sentinel")
    result = runner.invoke(app, ["export", "-w", str(workspace), "-o", str(tmp_path / "out"), "--no-verify"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "modeling_dpa.py").read_bytes() == (PACKAGE / "model" / "modeling_dpa.py").read_bytes()
    assert not (tmp_path / "sentinel").exists()


def test_the_export_verification_child_obeys_the_decision(shared, tmp_path):
    """Handed an export whose code is not dpa's, the child loads without it: it fails, and nothing ran."""
    import torch
    from safetensors.torch import save_file

    from dpa_cli.export.verify import run_check

    sentinel = tmp_path / "sentinel"
    export = Path(shutil.copytree(shared.export, tmp_path / "export"))
    folder = plant_into(export, PLANT["processor_config"], "string", sentinel)
    (tmp_path / "work").mkdir()
    probe = tmp_path / "work" / "probe.safetensors"
    save_file({"logits": torch.zeros(1)}, probe)  # read first: the child gets as far as loading the export
    with pytest.raises(DpaError, match="plain transformers cannot load.*trust_remote_code"):
        run_check(folder, probe, None, allow_code=False)
    assert not sentinel.exists()


def test_with_trust_remote_code_the_planted_code_does_run(shared, tmp_path):
    sentinel = tmp_path / "sentinel"
    llava = Path(shutil.copytree(shared.baseline, tmp_path / "llava"))
    folder = plant_into(llava, PLANT["config"], "string", sentinel)
    assert runner.invoke(app, _generate(shared, folder, tmp_path)).exit_code == 0 and not sentinel.exists()
    result = runner.invoke(app, [*_generate(shared, folder, tmp_path), "--trust-remote-code"])
    assert result.exit_code == 0, result.stderr
    assert sentinel.read_text() == "ran"


@pytest.mark.parametrize(
    "path",
    [("generate",), ("chat",), ("eval",), ("analyze", "modality-gap"), ("bench", "infer"), ("export",)],
    ids=" ".join,
)
def test_every_command_that_loads_a_users_folder_takes_trust_remote_code(path):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--trust-remote-code" in result.stdout


def _trust_values(tree: ast.AST) -> list[str]:
    """How each call in `tree` sets trust_remote_code (a keyword or a `{"trust_remote_code": ...}` dict entry)."""
    values = [
        ast.unparse(k.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for k in node.keywords
        if k.arg == "trust_remote_code"
    ]
    return values + [
        ast.unparse(v)
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for k, v in zip(node.keys, node.values)
        if isinstance(k, ast.Constant) and k.value == "trust_remote_code"
    ]


def test_only_the_loading_module_chooses_trust_remote_code():
    """`from_pretrained` is called in dpa_cli.loading only, but for the verification child (plain transformers,
    the parent's decision) and the shipped model files (whose sub-loads never run code). Everywhere else
    `trust_remote_code` is False. (Text shown to users, card.py and export_cmd.py, is not code.)"""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        loads = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained"
        ]
        trust = _trust_values(tree)
        if path.name == "loading.py":
            assert trust == ["trust"], trust
        elif path.name == "probe_check.py":
            assert trust == ["trusted()", "trusted()"] and len(loads) == 3, trust  # model, processor, peft adapter
        else:
            assert set(trust) <= {"False"}, f"{path}: trust_remote_code={trust}"
            assert not loads or path.parent.name == "model", f"{path} loads with from_pretrained: use dpa_cli.loading"


def test_the_gate_messages_are_documented():
    troubleshooting = (ROOT / "docs" / "troubleshooting.md").read_text()
    for stem in (
        "is not dpa's own, and transformers has no installed",
        "is not dpa's own; an export would ship it",
        "is not dpa's own: not run;",
    ):
        assert stem in troubleshooting, stem
    assert "## Gate: one trust gate for every load" in (ROOT / "docs" / "reliability.md").read_text()
