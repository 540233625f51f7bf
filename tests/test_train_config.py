"""`dpa train CONFIG.yaml` / `--config FILE`: the two files docs/training.md shows, run as written (flags on the
command line shrink the run and must win over the file), `--report-to` (TensorBoard events under the stage
folder by default), the config-file gate (unknown keys, keys dpa sets, option values of the wrong type, files
that are no mapping: exit 2, one line naming the key and the file, nothing written), and shell completion."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.demo.run import _inside as inside  # run in a folder: config paths are relative to it, like flags
from tests.test_bad_inputs import tree_hash

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
# Flags that make the documented stage-1 file a one-step run on the tiny models (each overrides a file value).
SHRINK = [
    "--max-steps",
    "1",
    "--set",
    "global_batch_size=2",
    "--set",
    "per_device_train_batch_size=1",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
    "--set",
    "save_steps=1000",
]


def documented(name: str) -> str:
    """The ```yaml block of docs/training.md whose first line is `# NAME`."""
    blocks = re.findall(r"^```yaml\n(# (\S+)\n.*?)^```", DOCS.read_text(), re.S | re.M)
    found = [text for text, title in blocks if title == name]
    assert len(found) == 1, f"docs/training.md shows no `# {name}` YAML block"
    return found[0]


@pytest.fixture(scope="module")
def project(dpa_workspace, stage_data, tmp_path_factory) -> Path:
    """A folder as docs/training.md assumes it: ws/, captions.json, instruct.json, images/ and both config
    files; stage 1 trained by `dpa train stage1.yaml` plus the shrinking flags."""
    folder = tmp_path_factory.mktemp("project")
    shutil.copytree(dpa_workspace("next_qwen"), folder / "ws")
    shutil.copytree(stage_data / "images", folder / "images")
    shutil.copy(stage_data / "captions.json", folder / "captions.json")
    shutil.copy(stage_data / "with_text.json", folder / "instruct.json")
    for name in ("stage1.yaml", "stage2.yaml"):
        (folder / name).write_text(documented(name))
    with inside(folder):
        result = runner.invoke(app, ["train", "stage1.yaml", *SHRINK, "--json"])
    assert result.exit_code == 0, result.stderr[-3000:]
    return folder


def test_the_documented_stage1_file_trains_with_flags_winning_and_tensorboard_events(project):
    recipe = yaml.safe_load((project / "ws" / "dpa.yaml").read_text())["stages"]["stage1"]["recipe"]
    written = yaml.safe_load(documented("stage1.yaml"))
    assert recipe["learning_rate"] == written["learning_rate"] and recipe["num_train_epochs"] == 1  # the file's
    assert (recipe["global_batch_size"], recipe["max_steps"], recipe["max_length"]) == (2, 1, 512)  # the flags'
    events = list((project / "ws" / "stage1" / "runs").glob("*/events.out.tfevents.*"))  # default: tensorboard
    assert events and any(b"train/loss" in path.read_bytes() for path in events), events


def plan(project: Path, *argv: str) -> dict:
    with inside(project):
        result = runner.invoke(app, ["train", *argv, "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_the_documented_stage2_file_plans_with_flags_winning(project):
    """`--config stage2.yaml --full --set learning_rate=3e-5`: the flags win over `lora: true` and the file's
    rate; the rest (nested trainable, `set:`, deepspeed, nproc, report_to) comes from the file."""
    found = plan(project, "--config", "stage2.yaml", "--full", "--set", "learning_rate=3e-5")
    recipe = found["recipe"]
    assert recipe["trainable"]["llm"] == "full" and recipe["trainable"]["vit"] == "frozen"
    assert recipe["learning_rate"] == 3e-5 and recipe["lr_scheduler_type"] == "cosine"
    assert (found["world_size"], found["deepspeed"], found["report_to"]) == (8, "zero3", ["tensorboard"])
    found = plan(project, "stage2.yaml", "--report-to", "none", "--nproc", "2", "--set", "global_batch_size=256")
    assert found["recipe"]["trainable"]["llm"] == "lora" and found["world_size"] == 2
    assert found["report_to"] == ["none"]


# --- the config-file gate ------------------------------------------------------------------------------------
KEYS = [
    "learning_rate",
    "image_root",
    "global_batch_size",
    "freeze_perceiver",
    "per_device_train_batch_size",
    "num_train_epochs",
    "lora_targets",
    "on_bad_sample",
    "data",
    "stage",
    "workspace",
    "warmup_steps",
]


def _misspelled() -> list[str]:
    """Spellings of real keys that are no key: a letter dropped or doubled, dashes, capitals, a plural."""
    from dpa_cli.train.config_file import OPTIONS
    from dpa_cli.train.recipe import NESTED, OWN_FIELDS
    from dpa_cli.train.validate import training_fields

    known = set(OPTIONS) | set(OWN_FIELDS) | set(training_fields()) | set(NESTED) | {"set"}
    variants = []
    for i, key in enumerate(KEYS):  # three of the seven spellings per key, a different three for each key
        spellings = [key[:-1], key[1:], key.upper(), key.title(), key.replace("_", "-"), key + "s", key[:3] + key[2:]]
        variants += [v for v in (spellings * 2)[i % 7 : i % 7 + 3] if v not in known]
    return sorted(set(variants))


# Other tools' spellings of the same ideas (LLaMA-Factory, ms-swift), parts that do not exist.
FOREIGN = [
    "dataset",
    "dataset_dir",
    "finetuning_type",
    "lora_rank",
    "template",
    "model_name_or_path",
    "cutoff_len",
    "trainable.projector",
    "learning_rates.vision",
    "train_type",
    "dataset_num_proc",
]
MANAGED = ["output_dir", "gradient_accumulation_steps", "local_rank", "resume_from_checkpoint", "remove_unused_columns"]
BAD_OPTIONS = [
    ("stage", "two"),
    ("stage", 1.5),
    ("lora", "maybe"),
    ("full", 2),
    ("nproc", "many"),
    ("nproc", 0),
    ("nproc", -3),
    ("data", 5),
    ("data", ["a.json", "b.json"]),
    ("workspace", {"a": 1}),
    ("resume", "yes please"),
    ("max_steps", "ten"),
    ("freeze_perceiver", [True]),
]
CASES = (
    [pytest.param({key: 1}, (repr(key), "unknown"), id=f"unknown-{key}") for key in _misspelled() + FOREIGN]
    + [pytest.param({"set": {key: 1}}, (repr(key),), id=f"under-set-{key}") for key in ("lerning_rate", "dataset")]
    + [
        pytest.param({"set": [f"{key}=1"]}, (repr(key),), id=f"set-list-{key}")
        for key in ("lerning_rate", "cutoff_len")
    ]
    + [pytest.param({key: "x"}, (repr(key), "set by dpa itself"), id=f"managed-{key}") for key in MANAGED]
    + [pytest.param({key: value}, (f"{key}={value!r}",), id=f"option-{key}-{value}") for key, value in BAD_OPTIONS]
)


@pytest.fixture(scope="module")
def shared(dpa_workspace, tmp_path_factory) -> Path:
    return Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path_factory.mktemp("gate") / "ws"))


def refused(argv: list[str], watched: list[Path], needles: tuple[str, ...]) -> str:
    """The standard of tests/test_bad_inputs.py: exit 2, one `error:` line (+ a hint), no traceback, the trees
    of inputs and outputs unchanged, every needle in the message (the stderr is returned)."""
    before = tree_hash(*watched)
    result = runner.invoke(app, argv)
    assert "Traceback" not in result.stderr and result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error:") and len(lines) <= 2, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert tree_hash(*watched) == before, "an input or output changed"
    return result.stderr


@pytest.mark.parametrize("content, needles", CASES)
def test_a_bad_config_key_is_refused_by_name_and_file(shared, tmp_path, content, needles):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"stage": 1, "data": "captions.json", **content}))
    positional = len(json.dumps(content, default=str)) % 2  # both spellings, spread over the cases
    argv = ["train", str(config)] if positional else ["train", "--config", str(config)]
    refused([*argv, "-w", str(shared)], [tmp_path, shared], (*needles, str(config)))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- stage: 1\n", "the top level must be a mapping"),
        ("just text\n", "the top level must be a mapping"),
        ("stage: [1\n", "run.yaml"),
        ("set: 5\n", "set=5"),
        ("set: [1, 2]\n", "set=[1, 2]"),
    ],
)
def test_a_config_file_that_is_no_mapping_of_keys_is_refused(shared, tmp_path, text, needle):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    refused(["train", str(config), "-w", str(shared)], [tmp_path, shared], (needle, "run.yaml"))


def test_missing_or_two_config_files_and_missing_stage_are_refused(shared, tmp_path):
    (tmp_path / "a.yaml").write_text("stage: 1\n")
    watched = [tmp_path, shared]
    refused(["train", str(tmp_path / "nope.yaml")], watched, ("nope.yaml", "no such file"))
    refused(["train", str(tmp_path)], watched, (str(tmp_path), "a folder, not a YAML file"))
    refused(["train", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml")], watched, ("two config files",))
    refused(["train", str(tmp_path / "a.yaml"), "-w", str(shared)], watched, ("missing option --data",))


def test_shell_completion_is_on_and_completes_train_options():
    shown = runner.invoke(app, ["--show-completion", "bash"], prog_name="dpa")
    assert shown.exit_code == 0 and "_DPA_COMPLETE=complete_bash" in shown.stdout
    env = {"_DPA_COMPLETE": "complete_bash", "COMP_WORDS": "dpa train --rep", "COMP_CWORD": "2"}
    completed = runner.invoke(app, [], prog_name="dpa", env=env)
    assert completed.exit_code == 0 and completed.stdout.split() == ["--report-to"]
