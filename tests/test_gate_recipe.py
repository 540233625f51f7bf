"""Gate 3a (issue 14): every recipe key, from a recipe file or `--set`, is typed and checked before anything is
loaded or written.

The bad values are generated from `transformers.TrainingArguments`' own field table (a wrong-type value and a
non-finite one for every field, by its type hint) plus out-of-range values by meaning and dpa's own fields.
Each must give exit 2, one `error:` line naming the key, no traceback, and byte-identical inputs and
workspace (the standard of tests/test_bad_inputs.py). Valid values must still pass the same gate.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil
import types
import typing
from enum import Enum
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainingArguments

from dpa_cli.cli.app import app
from dpa_cli.errors import BadInputError
from dpa_cli.parts import PARTS
from dpa_cli.train.recipe import MANAGED, RECIPES, load_recipe
from dpa_cli.train.trainer import LossGuard, TrainingStopped, check_weights_finite
from tests.test_bad_inputs import SMALL, Env, runner, train_clean, tree_hash

HINTS = typing.get_type_hints(TrainingArguments)
FIELDS = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init and f.name not in MANAGED}


def _members(hint) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _kinds(hint) -> set[str]:
    """What a type hint accepts, in words: bool, int, float, str, enum, list, dict, null, literal, object."""
    kinds = set()
    for member in _members(hint):
        origin = typing.get_origin(member)
        simple = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}
        if member in simple:
            kinds.add(simple[member])
        elif isinstance(member, type) and issubclass(member, Enum):
            kinds.add("enum")
        elif member is list or origin is list:
            kinds.add("list")
        elif member is dict or origin is dict:
            kinds.add("dict")
        elif origin is typing.Literal:
            kinds.add("literal")
        else:
            kinds.add("object")
    return kinds


def wrong_values(hint, via_set: bool = True) -> list[str]:
    """Spellings of values the hint cannot take: wrong types, non-finite numbers, fractions for ints. A `--set`
    value for a text-only field is taken as typed, so there a list or mapping spelling is text, not wrong."""
    kinds = _kinds(hint)
    text = "str" in kinds and "enum" not in kinds  # an enum's union with str still takes only its names
    bad = [] if via_set and kinds <= {"str", "null"} else ["[[1], [2]]"]  # no field takes a list of lists
    if "dict" not in kinds and bad:
        bad.append("{a: [1]}")
    if not text:
        bad += ["not_a_value_x", "nan", "-inf"]
    if kinds & {"int", "float"} and not text:
        bad.append("inf")
    if "int" in kinds and "float" not in kinds and not text:
        bad.append("2.5")
    if kinds <= {"bool", "null"}:
        bad.append("2")
    return bad


TYPE_VARIANTS = [(name, value) for name in FIELDS for value in wrong_values(HINTS[name])]
# Values of the right type that the meaning forbids (learning rates > 0, betas in [0, 1), seeds < 2**32, ...).
RANGE_VARIANTS = [
    ("learning_rate", "0"),
    ("learning_rate", "-1e-4"),
    ("learning_rate", "1e39"),
    ("num_train_epochs", "0"),
    ("num_train_epochs", "-1"),
    ("max_steps", "0"),
    ("max_steps", "-2"),
    ("warmup_steps", "-1"),
    ("warmup_steps", "-0.5"),
    ("weight_decay", "-0.01"),
    ("adam_beta1", "1"),
    ("adam_beta1", "-0.1"),
    ("adam_beta2", "1.0"),
    ("adam_beta2", "2"),
    ("adam_epsilon", "0"),
    ("adam_epsilon", "-1e-8"),
    ("max_grad_norm", "-1"),
    ("label_smoothing_factor", "1"),
    ("seed", "-1"),
    ("seed", "4294967296"),
    ("data_seed", "-5"),
    ("logging_steps", "0"),
    ("logging_steps", "-1"),
    ("logging_steps", "2.5"),
    ("save_steps", "0"),
    ("save_steps", "-10"),
    ("dataloader_num_workers", "-1"),
    ("per_device_train_batch_size", "0"),
    ("per_device_train_batch_size", "-4"),
    ("save_total_limit", "0"),
    ("dataloader_prefetch_factor", "2"),  # transformers: only with dataloader workers
    ("log_level", "loud"),
    ("ddp_backend", "pigeon"),
    ("optim", "adamw_torh"),
    ("lr_scheduler_type", "cosin"),
    ("lr_scheduler_type", "cosine_with_min_lr"),  # transformers: needs min_lr in lr_scheduler_kwargs
    ("lr_scheduler_kwargs", "{no_such_argument: 1}"),
    ("lr_scheduler_kwargs", "{bad json"),
    ("accelerator_config", "no-such-file.json"),
    ("torch_compile_mode", "fast"),
    ("report_to", "no_such_backend"),
    ("report_to", "[none, no_such_backend]"),
    # Trainer features dpa train does not use, which transformers refuses only once training starts
    ("eval_strategy", "steps"),
    ("do_eval", "true"),
    ("load_best_model_at_end", "true"),
    ("save_strategy", "best"),
    ("push_to_hub", "true"),
    ("fsdp", "full_shard"),
    ("train_sampling_strategy", "batch_rebalance"),
    ("learning_rate", "1" + "0" * 400),
    ("max_steps", "1" + "0" * 30),  # beyond float / 64-bit int
]
MISSING = [name for name in ("wandb", "tensorboard", "mlflow") if importlib.util.find_spec(name) is None]
RANGE_VARIANTS += [("report_to", name) for name in MISSING]
RANGE_VARIANTS += [("use_liger_kernel", "true")] * (importlib.util.find_spec("liger_kernel") is None)
RANGE_VARIANTS += [("optim", "adamw_bnb_8bit")] * (importlib.util.find_spec("bitsandbytes") is None)
RANGE_VARIANTS += [("tf32", "true")] * (not torch.cuda.is_available())
OWN_VARIANTS = [
    *[("global_batch_size", v) for v in ("0", "-2", "2.5", "abc", "inf", "true")],
    *[("max_length", v) for v in ("2.5", "512.7", "1.5", "0", "-1", "nan", "abc", "[512]")],
    *[("lora_r", v) for v in ("0", "-1", "1.5", "abc", "inf")],
    *[("lora_alpha", v) for v in ("0", "-1", "nan", "abc")],
    *[("lora_dropout", v) for v in ("1", "1.5", "-0.1", "nan", "abc")],
    *[("lora_targets", v) for v in ("(", "[a-", "*x", "a{2,1}", "(?P<1>x)")],
    *[("trainable", v) for v in ("5", "[vit, phi]", "frozen")],
    *[("learning_rates", v) for v in ("3", "[1e-5]", "fast")],
    *[("stage", v) for v in ("3", "abc", "1.5", "true")],
    *[(f"learning_rates.{part}", v) for part in PARTS for v in ("nan", "inf", "-inf", "0", "-1e-5", "abc", "1e39")],
    *[(f"trainable.{part}", v) for part in PARTS for v in ("half", "5", "true")],
]
# The reproductions of issue 14, each run through the command line as well.
ISSUE_CASES = [
    ("optim", "foo"),
    ("lr_scheduler_type", "bar"),
    ("seed", "abc"),
    ("seed", "-1"),
    ("warmup_steps", "-3"),
    ("logging_steps", "0"),
    ("dataloader_num_workers", "-1"),
    ("report_to", "wandb"),
    ("trainable", "5"),
    ("learning_rates.vit", "nan"),
    ("learning_rate", "inf"),
    ("lora_targets", "("),
    ("lora_r", "0"),
    ("max_length", "1.5"),
    ("max_length", "512.7"),
]
ISSUE_CASES = [c for c in ISSUE_CASES if c != ("report_to", "wandb") or importlib.util.find_spec("wandb") is None]
VARIANTS = TYPE_VARIANTS + RANGE_VARIANTS + OWN_VARIANTS + ISSUE_CASES
# In a recipe file a text field holds what YAML reads: a list or a mapping is wrong there.
FILE_VARIANTS = [(name, value) for name in FIELDS for value in wrong_values(HINTS[name], via_set=False)][::3]
FILE_VARIANTS += [v for v in RANGE_VARIANTS + OWN_VARIANTS if v[0] != "stage"] + [("lora_targets", "[1, 2]")]
# The command line costs ~0.1 s a run (CLI start, workspace read, tree hashes): every class is run through it,
# every variant through the gate's function directly (the same code path, `load_recipe`).
CLI_VARIANTS = ISSUE_CASES + TYPE_VARIANTS[::12] + RANGE_VARIANTS[::4] + OWN_VARIANTS[::8]
# (not the keys the command line below sets with --set itself: those would win over the file)
CLI_FILE_VARIANTS = [v for v in FILE_VARIANTS if f"{v[0]}=" not in " ".join(SMALL)][::25]


def _ids(variants: list[tuple[str, str]]) -> list[str]:
    return [f"{key}={value}" for key, value in variants]


@pytest.fixture(scope="module")
def shared(tiny_checkpoint, dpa_workspace, data_files, tmp_path_factory) -> Env:
    """A private copy of the session's workspace (hashed around each case) and the session's images."""
    workspace = Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path_factory.mktemp("gate-recipe") / "ws"))
    return Env(tiny_checkpoint, workspace, data_files / "images", Path())


def refused(env: Env, argv: list[str], *needles: str, code: int = 2) -> str:
    """Run argv; assert the refusal standard (exit code, one `error:` line and at most a hint, no traceback,
    nothing written) and that every needle is in the message. Returns stderr."""
    before = tree_hash(env.tmp, env.workspace, env.images.parent)
    result = runner.invoke(app, argv, env=env.vars)
    stderr = result.stderr
    assert "Traceback" not in stderr, stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (stderr, result.exception)
    assert result.exit_code == code, (result.exit_code, stderr[-2000:])
    assert tree_hash(env.tmp, env.workspace, env.images.parent) == before, "an input or the workspace changed"
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error:") and len(lines) <= 2, stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    return stderr


def _env(shared: Env, tmp_path: Path) -> Env:
    return Env(shared.tiny, shared.workspace, shared.images, tmp_path)


def _key_needle(key: str) -> str:
    return "stage" if key == "stage" else key


def _recipe_file(folder: Path, key: str, value: str, base: str = "stage1") -> Path:
    """The packaged recipe with `key` set to `value` (read as YAML) in the file itself."""
    data = yaml.safe_load((RECIPES / f"{base}.yaml").read_text())
    head, _, tail = key.partition(".")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:  # e.g. a regex: written as the text it is
        parsed = value
    if tail:
        data[head] = {**(data.get(head) or {}), tail: parsed}
    else:
        data[key] = parsed
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_gate_refuses(recipe: str, overrides: list[str], key: str) -> None:
    with pytest.raises(BadInputError) as caught:
        load_recipe(recipe, overrides)
    error = caught.value
    assert error.exit_code == 2 and _key_needle(key) in error.message, str(error)
    assert "\n" not in error.message and "\n" not in (error.hint or ""), str(error)


@pytest.mark.parametrize(("key", "value"), VARIANTS, ids=_ids(VARIANTS))
def test_the_gate_refuses_a_bad_set_value_naming_its_key(key, value):
    assert_gate_refuses("stage1", [f"{key}={value}"], key)


@pytest.mark.parametrize(("key", "value"), FILE_VARIANTS, ids=_ids(FILE_VARIANTS))
def test_the_gate_refuses_a_bad_recipe_file_value_naming_its_key(tmp_path, key, value):
    assert_gate_refuses(str(_recipe_file(tmp_path, key, value)), [], key)


@pytest.mark.parametrize(("key", "value"), CLI_VARIANTS, ids=_ids(CLI_VARIANTS))
def test_dpa_train_refuses_a_bad_set_value_and_writes_nothing(shared, tmp_path, key, value):
    env = _env(shared, tmp_path)
    refused(env, train_clean(env, "--set", f"{key}={value}"), _key_needle(key))


@pytest.mark.parametrize(("key", "value"), CLI_FILE_VARIANTS, ids=_ids(CLI_FILE_VARIANTS))
def test_dpa_train_refuses_a_bad_recipe_file_and_writes_nothing(shared, tmp_path, key, value):
    env = _env(shared, tmp_path)
    refused(env, train_clean(env, "--recipe", str(_recipe_file(tmp_path, key, value))), _key_needle(key))


def test_a_recipe_file_value_that_is_not_a_mapping_is_refused_even_when_set_reaches_into_it(shared, tmp_path):
    env = _env(shared, tmp_path)
    path = _recipe_file(tmp_path, "trainable", "[vit, phi]")
    refused(env, train_clean(env, "--recipe", str(path), "--set", "trainable.vit=full"), "trainable")


@pytest.mark.parametrize("targets", ["(", r"model\.language_model\.(q_proj", "*_proj"])
def test_the_lora_targets_flag_is_a_checked_regex(shared, tmp_path, targets):
    env = _env(shared, tmp_path)
    refused(env, train_clean(env, "--lora-targets", targets), "lora_targets", "regular expression")


@pytest.mark.parametrize(
    ("targets", "needle"),
    [
        (r"model\.perceiver\..*_proj", "no linear layer of the target LLM"),
        ("no_such_module", "no linear layer"),
        ("model", "not a linear layer"),
        (r".*\.embed_tokens", "not a linear layer"),
    ],
)
def test_lora_targets_that_match_no_llm_linear_are_refused_before_the_stage_folder(shared, tmp_path, targets, needle):
    env = _env(shared, tmp_path)
    argv = train_clean(env, "--from", "model", "--lora", "--lora-targets", targets, stage="2")
    refused(env, argv, "lora_targets", needle)


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is not None, reason="MPI can set up a one-process group")
@pytest.mark.parametrize("choice", ["zero2", "zero3", "file"])
def test_deepspeed_in_one_process_without_a_launcher_is_refused_up_front(shared, tmp_path, choice):
    env = _env(shared, tmp_path)
    if choice == "file":
        choice = str(RECIPES / "deepspeed" / "zero2.json")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.vars[name] = None  # removed from the command's environment
    refused(env, train_clean(env, "--deepspeed", choice), "--deepspeed", "launcher", "--nproc")


# --- valid values pass the same gate ------------------------------------------------------------------------
VALID = [
    ("learning_rate=2e-5", "learning_rate", 2e-5),
    ("max_length=2.0", "max_length", 2),
    ("global_batch_size=512.0", "global_batch_size", 512),
    ("seed=0", "seed", 0),
    ("seed=4294967295", "seed", 2**32 - 1),
    ("warmup_steps=0.5", "warmup_steps", 0.5),
    ("optim=sgd", "optim", "sgd"),
    ("lr_scheduler_type=constant", "lr_scheduler_type", "constant"),
    ("report_to=none", "report_to", "none"),
    ("report_to=all", "report_to", "all"),
    ("report_to=[]", "report_to", []),
    ("run_name=2024-01-01", "run_name", "2024-01-01"),
    ("run_name=123", "run_name", "123"),
    ("lora_targets=[qk]_proj$", "lora_targets", "[qk]_proj$"),
    ("bf16=false", "bf16", False),
    ("save_strategy=epoch", "save_strategy", "epoch"),
    ("logging_steps=0.5", "logging_steps", 0.5),
    ("max_steps=-1", "max_steps", -1),
    ("dataloader_num_workers=0", "dataloader_num_workers", 0),
    ("adam_beta2=0.98", "adam_beta2", 0.98),
    ("lora_r=1", "lora_r", 1),
    ("lora_dropout=0", "lora_dropout", 0),
    ("lora_alpha=16.5", "lora_alpha", 16.5),
    ("weight_decay=0", "weight_decay", 0),
    ("max_grad_norm=0", "max_grad_norm", 0),
    ("label_names=[labels]", "label_names", ["labels"]),
    ("debug=underflow_overflow", "debug", "underflow_overflow"),
    ("lr_scheduler_kwargs={}", "lr_scheduler_kwargs", {}),
    ("save_total_limit=null", "save_total_limit", None),
    ("torch_compile_mode=max-autotune", "torch_compile_mode", "max-autotune"),
]


@pytest.mark.parametrize(("item", "key", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_values_pass_the_gate_typed(item, key, expected):
    recipe = load_recipe("stage2-lora", [item])
    value = {**recipe.as_dict(), **recipe.training_args}[key]
    assert value == expected and type(value) is type(expected), (value, expected)


def test_valid_per_part_values_and_scheduler_arguments_pass():
    recipe = load_recipe(
        "stage2-full",
        [
            *[f"learning_rates.{part}=1e-6" for part in PARTS],
            "trainable.llm=lora",
            "lr_scheduler_type=cosine_with_min_lr",
            'lr_scheduler_kwargs={"min_lr": 1e-7}',
            "max_length=512.0",
            "seed=7",
        ],
    )
    assert recipe.learning_rates == dict.fromkeys(PARTS, 1e-6) and recipe.uses_lora and recipe.max_length == 512
    assert recipe.training_args["lr_scheduler_kwargs"] == {"min_lr": 1e-7}


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def test_every_training_argument_at_its_default_passes_the_gate(tmp_path):
    """The gate's table is TrainingArguments' own: each field at transformers' default, written in a recipe
    file, passes and keeps its value (an enum default as its name). The base is a recipe whose scheduler takes
    no arguments of its own (stage 1's warmup_stable_decay needs its num_decay_steps)."""
    failed = {}
    for name, field in FIELDS.items():
        default = _default(field)
        default = default.value if isinstance(default, Enum) else default
        try:
            recipe = load_recipe(str(_recipe_file(tmp_path, name, yaml.safe_dump(default), base="stage2-full")))
        except Exception as err:  # noqa: BLE001  (collected, reported together)
            failed[name] = str(err)
            continue
        if recipe.training_args[name] != default:
            failed[name] = f"{recipe.training_args[name]!r} != {default!r}"
    assert not failed, failed


def test_the_packaged_recipes_pass_the_gate():
    for path in RECIPES.glob("*.yaml"):
        assert load_recipe(path.stem).name == path.stem


# --- divergence during training -----------------------------------------------------------------------------
def test_weights_that_stop_being_finite_are_never_recorded_as_a_finished_stage(shared, dpa_workspace, tmp_path):
    """A learning rate the gate cannot refuse (finite, float32) but that overflows the weights in one step:
    the run stops (exit 1) before a checkpoint or the stage result is written, and dpa.yaml is unchanged."""
    env = _env(shared, tmp_path)
    ws = Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path / "ws"))
    manifest = (ws / "dpa.yaml").read_bytes()
    argv = train_clean(
        env, "--set", "learning_rate=1e30", "--set", "warmup_steps=0", "--set", "max_steps=2", workspace=ws
    )
    result = runner.invoke(app, argv)
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "no longer finite" in result.stderr and "learning rate" in result.stderr, result.stderr
    assert (ws / "dpa.yaml").read_bytes() == manifest and not (ws / "stage1").exists()


@pytest.mark.parametrize(
    "logs",
    [
        {"loss": math.nan},
        {"loss": math.inf},
        {"loss": 1.0, "grad_norm": math.nan},
        {"grad_norm": math.inf},
        {"loss": 0.0},
    ],
)
def test_the_loss_guard_stops_on_a_non_finite_loss_or_gradient_norm(logs):
    with pytest.raises(TrainingStopped):
        LossGuard().on_log(None, type("State", (), {"global_step": 3})(), None, logs=logs)


def test_only_trained_weights_are_checked_and_the_bad_one_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    model[0].requires_grad_(False)
    check_weights_finite(model, 1)  # frozen: not ours to judge
    with torch.no_grad():
        model[1].bias[1] = math.inf
    with pytest.raises(TrainingStopped, match=r"1\.bias"):
        check_weights_finite(model, 1)
