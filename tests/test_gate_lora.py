"""Gate: a LoRA stage saves and resumes everything it trains, and loads with plain PEFT (issue 14).

1. Killed by a real SIGKILL after checkpoint K, `--resume` reproduces the uninterrupted run within 1e-5 for every
   trained tensor (LoRA A/B, phi, and phi_p set to full); under ZeRO-3 with two processes too (resumed from
   the state such a kill leaves, made from the uninterrupted run: two launches instead of three).
2. The stage's adapter names the base that holds the trained phi, and no dpa_cli module: a fresh interpreter
   loads it with `PeftModel.from_pretrained` and `AutoPeftModel.from_pretrained` and gets dpa's own logits
   (`load_as_trained`) and the merged export's.
3. `dpa export --keep-adapter`: the printed load line and the model card's load code apply the adapter.
4. `--resume` from a checkpoint that cannot give back what this run trains in full is refused by class (the file
   missing, empty, cut, garbled, a folder; a tensor missing, extra or reshaped; other flags; the other kind of
   run): exit 2, one `error:` line, nothing changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.train.lora_state import TRAINED_IN_FULL
from tests.test_bad_inputs import tree_hash
from tests.test_train import changed_parts, weights
from tests.trained_workspace import add_stage1, upgraded

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
# LoRA on the LLM, phi and phi_p (a perceiver part) trained in full, the rest frozen (the recipe adapts every part:
# these runs keep parts in full beside the adapter); one sample per device, two per step, in file order; one high
# rate for every part so phi moves far more than the tolerance.
LORA = [
    "--lora",
    "--set",
    "trainable.phi_p=full",
    "--set",
    "trainable.phi=full",
    "--set",
    "trainable.vit=frozen",
    "--set",
    "trainable.perceiver_lm=frozen",
    "--set",
    "learning_rates={}",
    "--set",
    "lora_r=4",
    "--set",
    "lora_alpha=8",
    "--set",
    "global_batch_size=2",
    "--set",
    "per_device_train_batch_size=1",
    "--set",
    "logging_steps=1",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
    "--set",
    "learning_rate=1e-2",
    "--set",
    "train_sampling_strategy=sequential",
    "--set",
    "save_steps=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    samples = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (48 + 8 * i, 40), rgb).save(root / "images" / f"{name}.png")
        samples.append(
            {
                "id": f"ins-{name}",
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": f"It is {name}."},
                ],
            }
        )
    (root / "instruct.json").write_text(json.dumps(samples * 2))
    return root


@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory) -> Path:
    """An upgrade (LLaVA-NeXT target, composed perceiver) with stage 1 done: stage 2 starts from it."""
    ws = upgraded(tiny_checkpoint, "llava_next", tmp_path_factory.mktemp("base") / "ws")
    add_stage1(ws)
    return ws


def copy_of(ws: Path, dest: Path) -> Path:
    return Path(shutil.copytree(ws, dest, symlinks=True))


def train_args(ws: Path, data: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--stage",
        "2",
        "--workspace",
        str(ws),
        "--data",
        str(data / "instruct.json"),
        "--image-root",
        str(data / "images"),
        *LORA,
        *extra,
    ]


def train(ws: Path, data: Path, *extra: str):
    return runner.invoke(app, [*train_args(ws, data, *extra), "--json"])


def checkpoints(ws: Path) -> list[Path]:
    """Complete checkpoints, wherever the run keeps them (staging folders are not complete ones)."""
    return [
        p
        for p in ws.rglob("checkpoint-*")
        if p.is_dir() and not any(part.startswith(".") for part in p.relative_to(ws).parts)
    ]


def killed_after_a_checkpoint(command: list[str], ws: Path, timeout: float = 300) -> list[Path]:
    """Run `command` (a fresh `python -m dpa_cli`) and SIGKILL its whole process group once a checkpoint exists."""
    log = ws.parent / "killed.log"
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would stall the run before its checkpoint
        proc = subprocess.Popen(command, env=ENV, stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not checkpoints(ws):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (ws / "stage2" / "model").exists(), "the kill came after the run finished"
    return checkpoints(ws)


def trained_tensors(ws: Path) -> dict[str, torch.Tensor]:
    """Everything a LoRA stage holds: the adapter's A/B and the base with the parts trained in full."""
    adapter = {f"adapter:{k}": v for k, v in load_file(ws / "stage2" / "adapter" / "adapter_model.safetensors").items()}
    return {**adapter, **weights(ws / "stage2" / "model")}


def assert_same_run(straight: Path, resumed: Path) -> None:
    a, b = trained_tensors(straight), trained_tensors(resumed)
    assert a.keys() == b.keys()
    worst = max((float((a[k] - b[k]).abs().max()), k) for k in a)
    assert worst[0] <= TOLERANCE, f"resumed run differs from the uninterrupted one: {worst}"


# --- 1. exact resume --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(base, data, tmp_path_factory) -> Path:
    ws = copy_of(base, tmp_path_factory.mktemp("straight") / "ws")
    result = train(ws, data, "--max-steps", "6")
    assert result.exit_code == 0, result.stderr
    return ws


@pytest.fixture(scope="module")
def interrupted(base, data, tmp_path_factory) -> Path:
    """The same run, SIGKILLed once its first checkpoint is complete (never changed: tests copy it)."""
    ws = copy_of(base, tmp_path_factory.mktemp("interrupted") / "ws")
    found = killed_after_a_checkpoint([sys.executable, "-m", "dpa_cli", *train_args(ws, data, "--max-steps", "6")], ws)
    assert found and all(int(p.name.split("-")[1]) < 6 for p in found)
    return ws


def test_lora_resume_after_sigkill_reproduces_every_trained_tensor(straight, interrupted, data, tmp_path):
    # What makes the comparison bite: phi and phi_p move (a resume that restarted them would differ by far more).
    assert changed_parts(straight / "stage1" / "model", straight / "stage2" / "model") == {"phi", "phi_p"}
    moved = weights(straight / "stage2" / "model")["model.multi_modal_projector.linear_1.weight"]
    start = weights(straight / "stage1" / "model")["model.multi_modal_projector.linear_1.weight"]
    assert float((moved - start).abs().max()) > 1e-3
    checkpoint = max(checkpoints(interrupted), key=lambda p: int(p.name.split("-")[1]))
    kept = load_file(checkpoint / TRAINED_IN_FULL)
    assert any(".multi_modal_projector." in k for k in kept) and any(".perceiver." in k for k in kept)

    resumed = copy_of(interrupted, tmp_path / "ws")
    result = train(resumed, data, "--max-steps", "6", "--resume")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 6
    assert_same_run(straight, resumed)


def as_killed_after(ws: Path, step: int, manifest: bytes) -> None:
    """Leave `ws` as a run killed just after writing checkpoint-`step` leaves it: no stage result, no later
    checkpoint, dpa.yaml as before the run (the kill itself is real in the test above and in
    test_distributed_faults.py; here the point is what DeepSpeed's checkpoint gives back)."""
    for path in (ws / "stage2" / "model", ws / "stage2" / "adapter", *checkpoints(ws)):
        if path.name.startswith("checkpoint-") and int(path.name.split("-")[1]) <= step:
            continue
        shutil.rmtree(path)
    (ws / "dpa.yaml").write_bytes(manifest)


def test_lora_zero3_resume_reproduces_every_trained_tensor(base, data, tmp_path):
    def command(ws: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dpa_cli",
            *train_args(ws, data, "--max-steps", "4", *extra),
            "--nproc",
            "2",
            "--deepspeed",
            "zero3",
        ]

    straight = copy_of(base, tmp_path / "straight")
    done = subprocess.run(command(straight), capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert changed_parts(straight / "stage1" / "model", straight / "stage2" / "model") == {"phi", "phi_p"}
    resumed = copy_of(straight, tmp_path / "resumed")
    as_killed_after(resumed, 2, (base / "dpa.yaml").read_bytes())
    assert [p.name for p in checkpoints(resumed)] == ["checkpoint-2"]
    assert (resumed / "stage2" / "checkpoint-2" / TRAINED_IN_FULL).is_file()
    done = subprocess.run(command(resumed, "--resume"), capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {resumed / 'stage2' / 'checkpoint-2'}" in done.stdout.replace("\n", "")
    assert_same_run(straight, resumed)


# --- 2 and 3. plain transformers + peft, in a fresh interpreter --------------------------------------------------
# Runs each snippet (which must bind `model`) in its own namespace, the probe through it, and saves the logits.
FRESH = """
import json, sys, torch
from safetensors.torch import load_file, save_file
snippets, probe, out = json.loads(sys.argv[1]), load_file(sys.argv[2]), sys.argv[3]
logits = {}
for name, code in snippets.items():
    scope = {}
    exec(code, scope)
    with torch.no_grad():
        logits[name] = scope["model"].float().eval()(**probe).logits.contiguous()
save_file(logits, out)
print(json.dumps({"dpa_cli_imported": any(m.split(".")[0] == "dpa_cli" for m in sys.modules)}))
"""


def fresh_logits(snippets: dict[str, str], probe: Path, work: Path) -> tuple[dict[str, torch.Tensor], dict]:
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(work / "modules")
    done = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(snippets), str(probe), str(work / "logits.st")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(work / "logits.st"), json.loads(done.stdout.strip().splitlines()[-1])


def card_load_code(readme: str) -> str:
    """The model card's code, from its imports through the line that loads the model."""
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    return code.split("\nprocessor = ", 1)[0]


@pytest.fixture(scope="module")
def loaded(straight, tmp_path_factory) -> dict:
    """The LoRA stage loaded every way: dpa's own, the merged export, and plain peft in one fresh interpreter."""
    from dpa_cli.export.probe_check import probe_inputs
    from dpa_cli.loading import load_as_trained, load_processor
    from dpa_cli.workspace.results import stage_result

    work = tmp_path_factory.mktemp("loaded")
    merged, kept = work / "merged", work / "kept"
    result = runner.invoke(app, ["export", "-w", str(straight), "-o", str(merged), "--merge-lora", "--no-verify"])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["export", "-w", str(straight), "-o", str(kept), "--keep-adapter", "--no-verify"])
    assert result.exit_code == 0, result.stderr
    printed = re.search(r"^load it: (.+)$", result.stdout, re.MULTILINE)
    assert printed, result.stdout

    stage = stage_result(straight)
    inputs = probe_inputs(load_processor(stage.model_dir))
    save_file({k: v.contiguous() for k, v in inputs.items()}, work / "probe.st")
    with torch.no_grad():
        dpa = load_as_trained(stage, dtype=torch.float32)(**inputs).logits
    adapter = str(straight / "stage2" / "adapter")
    snippets = {
        "peft": "from peft import PeftConfig, PeftModel\nfrom transformers import AutoModelForImageTextToText\n"
        f"adapter = {adapter!r}\nbase = PeftConfig.from_pretrained(adapter).base_model_name_or_path\n"
        "model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, "
        "trust_remote_code=True), adapter)",
        "auto_peft": f"from peft import AutoPeftModel\nmodel = AutoPeftModel.from_pretrained({adapter!r}, "
        "trust_remote_code=True)",
        "merged": "from transformers import AutoModelForImageTextToText\n"
        f"model = AutoModelForImageTextToText.from_pretrained({str(merged)!r}, trust_remote_code=True)",
        "kept_weights_alone": "from transformers import AutoModelForImageTextToText\n"
        f"model = AutoModelForImageTextToText.from_pretrained({str(kept)!r}, "
        "trust_remote_code=True)",
        "printed": printed.group(1),
        "card": card_load_code((kept / "README.md").read_text()),
    }
    logits, report = fresh_logits(snippets, work / "probe.st", work)
    return {"dpa": dpa, "logits": logits, "report": report, "printed": printed.group(1)}


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_the_stage_adapter_loads_with_plain_peft_on_the_base_that_holds_phi(straight, loaded):
    config = json.loads((straight / "stage2" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((straight / "stage2" / "model").resolve())
    plain = {"base_model_class": "AutoModelForImageTextToText", "parent_library": "transformers"}
    assert config["auto_mapping"] == plain
    assert "dpa_cli" not in json.dumps(config)
    logits, dpa = loaded["logits"], loaded["dpa"]
    assert not loaded["report"]["dpa_cli_imported"]
    for way in ("peft", "auto_peft"):
        assert diff(logits[way], dpa) <= TOLERANCE, way
        assert diff(logits[way], logits["merged"]) <= TOLERANCE, way


def test_keep_adapter_prints_and_documents_a_load_that_applies_the_adapter(loaded):
    logits = loaded["logits"]
    assert "adapter" in loaded["printed"]
    for way in ("printed", "card"):
        assert diff(logits[way], logits["merged"]) <= TOLERANCE, way
    assert diff(logits["kept_weights_alone"], logits["merged"]) > 1e-3  # the adapter matters on this probe


# --- 4. the refusal gate ----------------------------------------------------------------------------------------
def _rewrite(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(file: Path) -> None:
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file)

    return damage


def _drop_phi(tensors: dict) -> None:
    tensors.pop(next(k for k in sorted(tensors) if ".multi_modal_projector." in k))


def _drop_all_perceiver(tensors: dict) -> None:
    for key in [k for k in tensors if ".perceiver." in k]:
        tensors.pop(key)


def _reshape_phi(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if ".multi_modal_projector." in k and k.endswith("weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])


def _transpose_projector(tensors: dict) -> None:
    """A projector weight that is not square (phi's or phi_p's) stored the other way round."""
    key = next(
        k
        for k, v in sorted(tensors.items())
        if ".multi_modal_projector." in k and v.ndim == 2 and v.shape[0] != v.shape[1]
    )
    tensors[key] = tensors[key].t().contiguous()


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda file: file.write_bytes(data)


def _cut(count: int) -> Callable[[Path], None]:
    return lambda file: file.write_bytes(file.read_bytes()[:-count])


def _folder(file: Path) -> None:
    file.unlink()
    file.mkdir()


RESTART = ("--restart",)
FLAGS = ("recipe and flags of the interrupted run", *RESTART)
# (id, what is done to trained_in_full.safetensors or None, extra flags, needles)
CASES = [
    ("file-missing", Path.unlink, (), ("holds no trained_in_full.safetensors", "phi, phi_p", *RESTART)),
    ("file-a-folder", _folder, (), ("holds no trained_in_full.safetensors", *RESTART)),
    ("file-empty", _write(b""), (), ("trained_in_full.safetensors", "too short", *RESTART)),
    ("file-cut-short", _cut(64), (), ("trained_in_full.safetensors", *RESTART)),
    ("file-one-byte-short", _cut(1), (), ("trained_in_full.safetensors", *RESTART)),
    ("header-garbled", _write(b"\xff" * 64), (), ("trained_in_full.safetensors", *RESTART)),
    (
        "header-not-json",
        lambda f: f.write_bytes((12).to_bytes(8, "little") + b"not json at all"),
        (),
        ("trained_in_full.safetensors", "not UTF-8 JSON"),
    ),
    ("phi-tensor-missing", _rewrite(_drop_phi), (), ("lacks the phi weights", *FLAGS)),
    ("perceiver-tensors-missing", _rewrite(_drop_all_perceiver), (), ("lacks the phi_p weights", *FLAGS)),
    (
        "extra-llm-tensor",
        _rewrite(lambda t: t.update({"model.language_model.norm.weight": torch.ones(8)})),
        (),
        ("holds llm weights this run does not train", *FLAGS),
    ),
    ("phi-reshaped", _rewrite(_reshape_phi), (), ("the model's is", *FLAGS)),
    ("projector-transposed", _rewrite(_transpose_projector), (), ("the model's is", *FLAGS)),
    ("phi_p-now-frozen", None, ("--set", "trainable.phi_p=frozen"), ("holds phi_p weights this run does not train",)),
    ("phi-now-frozen", None, ("--set", "trainable.phi=frozen"), ("holds phi weights this run does not train",)),
    ("vit-now-full", None, ("--set", "trainable.vit=full"), ("lacks the vit weights", *FLAGS)),
    (
        "now-full-training",
        None,
        ("--set", "trainable.llm=full"),
        ("holds a LoRA adapter, but this run trains the LLM in full", *FLAGS),
    ),
    (
        "adapter-config-gone",
        lambda f: (f.parent / "adapter_config.json").unlink(),
        (),
        ("holds no LoRA adapter, but this run trains with LoRA",),
    ),
]


@pytest.mark.parametrize(("damage", "flags", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_resume_from_a_checkpoint_that_cannot_give_back_what_this_run_trains_is_refused(
    interrupted, data, tmp_path, damage, flags, needles
):
    ws = copy_of(interrupted, tmp_path / "ws")
    checkpoint = max(checkpoints(ws), key=lambda p: int(p.name.split("-")[1]))
    if damage is not None:
        damage(checkpoint / TRAINED_IN_FULL)
    before = tree_hash(ws, data)
    result = runner.invoke(app, [*train_args(ws, data, "--max-steps", "6", "--resume", *flags)])
    stderr = result.stderr
    assert "Traceback" not in stderr and result.exit_code == 2, (result.exit_code, stderr, result.exception)
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error:") and len(lines) <= 2, stderr
    assert checkpoint.name in lines[0], stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    assert result.stdout == ""
    assert tree_hash(ws, data) == before, "the workspace or the data changed"
