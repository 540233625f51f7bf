"""Evaluation harnesses on an export: the lmms-eval model `dpa` (dpa_cli.evaluation.lmms_eval_model) answers
lmms-eval-shaped requests as plain transformers does, its entry point is declared, lmms-eval itself runs it on
a tiny local task when installed; `AutoModel` gives the export's generating model."""

from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

from dpa_cli.evaluation.lmms_eval_model import DPA
from tests.tiny_processors import example_image

ROOT = Path(__file__).resolve().parents[1]
TASK = "tiny"
DOCS = [
    {"question": "What colour is it?", "images": [example_image(40, 30)], "answer": "red"},
    {"question": "How many shapes?", "images": [example_image(23, 61), example_image(52, 44)], "answer": "2"},
    {"question": "Say hello.", "images": [], "answer": "hello"},
]


@dataclass
class Request:
    """lmms-eval's Instance as a model sees it: only `.args` is read."""

    args: tuple


def visuals(doc: dict) -> list:
    return doc["images"]


@pytest.fixture(scope="module")
def harness(tiny_export: Path) -> DPA:
    model = DPA(pretrained=str(tiny_export), device="cpu", max_new_tokens=5)
    model.task_dict = {TASK: {"test": DOCS}}
    return model


@pytest.fixture(scope="module")
def reference(tiny_export: Path) -> Any:
    """The export in plain transformers, loaded the documented way."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_export, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(tiny_export, trust_remote_code=True)


def _inputs(processor: Any, doc: dict) -> Any:
    content = [
        *({"type": "image", "image": image} for image in doc["images"]),
        {"type": "text", "text": doc["question"]},
    ]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def greedy(reference: Any, doc: dict, max_new_tokens: int) -> tuple[str, list[int]]:
    model, processor = reference
    inputs = _inputs(processor, doc)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :]
    return processor.decode(new, skip_special_tokens=True), new.tolist()


def logprob(reference: Any, doc: dict, continuation: str) -> float:
    model, processor = reference
    inputs = _inputs(processor, doc)
    answer = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(**{**inputs, "input_ids": ids, "attention_mask": mask}).logits[0].float()
    start = inputs["input_ids"].shape[1]
    return sum(torch.log_softmax(logits[start - 1 + i], -1)[token].item() for i, token in enumerate(answer))


# (doc, gen_kwargs, tokens generated): lmms-eval tasks spell their settings many ways.
GEN_KWARGS = {
    "defaults": (0, {}, 5),
    "two-images": (1, {"max_new_tokens": 3}, 3),
    "text-only": (2, {"max_new_tokens": 3}, 3),
    "greedy-explicit": (0, {"temperature": 0, "do_sample": False, "max_new_tokens": 4}, 4),
    "until-list": (0, {"until": ["<stop>"], "max_new_tokens": 2}, 2),
    "until-str": (2, {"until": "<stop>", "max_new_tokens": 2}, 2),
    "until-empty": (0, {"until": [], "max_new_tokens": 2}, 2),
}


@pytest.mark.parametrize("case", GEN_KWARGS)
def test_generate_until_answers_as_plain_transformers(harness, reference, case):
    doc_id, gen_kwargs, tokens = GEN_KWARGS[case]
    expected, _ = greedy(reference, DOCS[doc_id], tokens)
    [answer] = harness.generate_until([Request((DOCS[doc_id]["question"], gen_kwargs, visuals, doc_id, TASK, "test"))])
    assert answer == expected


def test_generate_until_cuts_at_the_first_stop_string(harness, reference):
    """`until` ends the answer where the first stop string starts (stop strings from the answer itself)."""
    full, _ = greedy(reference, DOCS[0], 5)
    assert len(full) >= 3, full
    for until in ([full[1:3]], [full[2:], full[1:2]], full[1:2]):
        [answer] = harness.generate_until([Request((DOCS[0]["question"], {"until": until}, visuals, 0, TASK, "test"))])
        stops = [until] if isinstance(until, str) else until
        assert answer == full[: min(full.index(s) for s in stops)]


def test_requests_without_visuals_are_text_only(harness, reference):
    """A task with no images gives doc_to_visual None or an empty list: the prompt is the context alone."""
    expected, _ = greedy(reference, DOCS[2], 5)
    for to_visual in (None, lambda doc: [], lambda doc: None):
        [answer] = harness.generate_until([Request((DOCS[2]["question"], {}, to_visual, 2, TASK, "test"))])
        assert answer == expected


@pytest.mark.parametrize("doc_id", [0, 2], ids=["one-image", "text-only"])
def test_loglikelihood_is_the_continuations_log_probability(harness, reference, doc_id):
    """(sum of the continuation's token log-probabilities, whether greedy decoding gives it), for a given string
    and for doc_to_target as a function of the doc; the model's own greedy answer is greedy, a word it did not
    say is not."""
    doc = DOCS[doc_id]
    _, ids = greedy(reference, doc, 3)
    own = reference[1].tokenizer.decode(ids)
    requests = [
        Request((doc["question"], target, visuals, doc_id, TASK, "test"))
        for target in (own, " zebra crossing", lambda d: d["answer"])
    ]
    results = harness.loglikelihood(requests)
    for (score, _), continuation in zip(results, (own, " zebra crossing", doc["answer"])):
        assert score == pytest.approx(logprob(reference, doc, continuation), abs=1e-4) and score < 0
    if reference[1].tokenizer(own, add_special_tokens=False)["input_ids"] == ids:  # the decode re-encodes alike
        assert results[0][1] is True
    assert results[1][1] is False


@pytest.mark.parametrize(
    "visual", ["clip.mp4", {"array": [0.0], "sampling_rate": 16000}, b"\x00\x01"], ids=["video-path", "audio", "bytes"]
)
def test_visuals_other_than_images_are_refused_by_name(harness, visual):
    request = Request(("Describe.", {}, lambda doc: [visual], 0, TASK, "test"))
    with pytest.raises(ValueError, match=f"task '{TASK}' doc 0 gives .* visuals; DPA reads images only"):
        harness.generate_until([request])
    with pytest.raises(ValueError, match="DPA reads images only"):
        harness.loglikelihood([Request(("Describe.", " a", lambda doc: [visual], 0, TASK, "test"))])


def test_automodel_loads_the_export_as_the_model_that_generates(tiny_export, reference):
    """Generic loaders (lmms-eval's `huggingface` model) fall back to AutoModel for a model type transformers does
    not know: the export's AutoModel is the generating class, with the same answers. The config is the export's
    own remote class, as in a process without dpa (dpa registers its installed DPAConfig, whose AutoModel is the
    base DPAModel, and transformers prefers registered code), so AutoModel follows the export's `auto_map`."""
    from transformers import AutoModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config_class = get_class_from_dynamic_module("configuration_dpa.DPAConfig", str(tiny_export))
    config = config_class.from_pretrained(tiny_export)
    assert config_class.__module__.startswith("transformers_modules")
    model = AutoModel.from_pretrained(tiny_export, config=config, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__name__ == "DPAForConditionalGeneration" and hasattr(model, "generate")
    assert type(model).__module__.startswith("transformers_modules")
    inputs = _inputs(reference[1], DOCS[0])
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output[0, inputs["input_ids"].shape[1] :].tolist() == greedy(reference, DOCS[0], 4)[1]


def _entry_point() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"]["lmms_eval.models"]["dpa"]


def test_the_lmms_eval_entry_point_names_the_plugin():
    module, _, name = _entry_point().partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert DPA.is_simple is True  # lmms-eval resolves a simple_class_path only for a simple model


def _task_folder(root: Path) -> Path:
    """A generate_until task over three local docs (images written as files), and its functions."""
    tasks, rows = root / "tasks", []
    tasks.mkdir()
    for doc_id, doc in enumerate(DOCS[:2]):
        paths = []
        for i, image in enumerate(doc["images"]):
            image.save(root / f"{doc_id}-{i}.png")
            paths.append(str(root / f"{doc_id}-{i}.png"))
        rows.append({"question": doc["question"], "images": paths, "answer": doc["answer"]})
    (root / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / "utils.py").write_text(
        textwrap.dedent("""
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(path).convert("RGB") for path in doc["images"]]

        def doc_to_text(doc):
            return doc["question"]

        def process_results(doc, results):
            return {"exact": float(results[0].strip().lower() == doc["answer"])}
    """)
    )
    (tasks / "dpa_tiny_vqa.yaml").write_text(
        textwrap.dedent(f"""
        task: dpa_tiny_vqa
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / "docs.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact
            aggregation: mean
            higher_is_better: true
    """)
    )
    return tasks


@pytest.mark.optional  # needs lmms-eval, no dependency of dpa (docs/evaluation.md)
def test_lmms_eval_runs_the_plugin_on_a_local_task(harness, tiny_export, tmp_path):
    """`python -m lmms_eval eval --model dpa ...` as docs/evaluation.md shows it; the plugin is found through
    the entry point pyproject.toml declares (written here as an installed distribution's, so a source checkout
    tests its own declaration), and lmms-eval's logged answers are the plugin's own."""
    tasks = _task_folder(tmp_path)
    info = tmp_path / "site" / "dpa_lmms_entry_point-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dpa-lmms-entry-point\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\ndpa = {_entry_point()}\n")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(info.parent)]),
    }
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "eval",
        "--model",
        "dpa",
        "--model_args",
        f"pretrained={tiny_export},max_new_tokens=4",
        "--device",
        "cpu",
        "--tasks",
        "dpa_tiny_vqa",
        "--include_path",
        str(tasks),
        "--batch_size",
        "1",
        "--log_samples",
        "--output_path",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [samples] = glob.glob(str(tmp_path / "out" / "**" / "*samples_dpa_tiny_vqa.jsonl"), recursive=True)
    logged = {row["doc_id"]: row["filtered_resps"] for row in map(json.loads, Path(samples).read_text().splitlines())}
    requests = [Request((DOCS[i]["question"], {"max_new_tokens": 4}, visuals, i, TASK, "test")) for i in range(2)]
    assert logged == {i: answer.strip() for i, answer in enumerate(harness.generate_until(requests))}
    assert any(logged.values())
