"""Serving an export: `transformers serve` answers OpenAI-style chat requests with images (a real server in a
subprocess, plain transformers, no dpa imported there); the vLLM plugin's CPU parts (config mapping, weight
names, placeholder counts, registration); `dpa serve` without vLLM."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import tomllib
import torch

from tests.tiny_processors import example_image

QUESTION = "What colour is it?"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


@pytest.fixture(scope="module")
def server(tiny_export: Path):
    """`transformers serve EXPORT --trust-remote-code --device cpu` on a free localhost port, as a user starts it
    (the module's own CLI, a fresh process, without dpa on its import path)."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    command = [
        sys.executable,
        "-c",
        "from transformers.cli.transformers import main; main()",
        "serve",
        str(tiny_export),
        "--trust-remote-code",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        command, env=env, cwd=tiny_export.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(
                    f"transformers serve exited {process.returncode}:\n{process.stdout.read().decode()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("transformers serve did not answer /health within 120 s")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _expected(export: Path, image, max_new_tokens: int) -> str:
    """What plain transformers generates greedily for the same message."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _chat_body(export: Path, image, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": QUESTION}]
    return {
        "model": str(export),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "temperature": 0,
        **extra,
    }


@pytest.mark.parametrize("size", [(40, 30), (23, 61)])
def test_transformers_serve_answers_a_chat_request_with_an_image(server, tiny_export, size):
    """The OpenAI chat endpoint answers 200 with the text plain transformers generates; streamed (what
    `transformers chat` asks for) it sends the same text in chunks."""
    image = example_image(*size)
    status, raw = _post(f"{server}/v1/chat/completions", _chat_body(tiny_export, image))
    assert status == 200
    answer = json.loads(raw)
    text = answer["choices"][0]["message"]["content"]
    assert text and text == _expected(tiny_export, image, 4)
    assert 1 <= answer["usage"]["completion_tokens"] <= 4 and answer["usage"]["prompt_tokens"] > 4

    status, raw = _post(f"{server}/v1/chat/completions", _chat_body(tiny_export, image, stream=True))
    assert status == 200
    chunks = [
        json.loads(line[len("data: ") :])
        for line in raw.decode().splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    # A random tiny model emits byte-fallback tokens that end or start inside a multi-byte character: the whole
    # decode and the stream's incremental decoder place U+FFFD differently. The rest is the same text.
    assert streamed.replace("\ufffd", "") == text.replace("\ufffd", "") and chunks[-1]["choices"][0][
        "finish_reason"
    ] in ("length", "stop")


# --- the vLLM plugin's CPU parts ------------------------------------------------------------------------------
import importlib.util  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from dpa_cli.cli.app import app  # noqa: E402
from dpa_cli.serving import vllm_plugin, vllm_spec  # noqa: E402
from dpa_cli.serving.vllm_spec import UnservableError  # noqa: E402
from tests.test_bad_inputs import tree_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def dpa_models(tiny_export, dpa_workspace) -> dict[str, Path]:
    """Real DPA folders of both kinds the plugin meets: a Qwen3 target with a tied head and a LLaVA-NeXT perceiver
    (batched image fields), and a Llama target with its own head and a Qwen2.5-VL perceiver (flat patches)."""
    return {"qwen3-tied": tiny_export, "llama-untied": dpa_workspace("llama3_qwen") / "model"}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _tensor_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            names += list(handle.keys())
    return names


@pytest.mark.parametrize("kind", ["qwen3-tied", "llama-untied"])
def test_every_tensor_of_a_dpa_model_lands_on_a_vllm_parameter(dpa_models, kind):
    """The target's tensors cover vLLM's LLM class parameters exactly (q/k/v and gate/up as their shards, the head
    only when untied); the perceiver's and phi's are exactly the encoder's own (built from the config)."""
    from transformers import AutoConfig

    from dpa_cli.model import DPAModel

    folder = dpa_models[kind]
    config = _config(folder)
    llm: dict[str, set] = {}
    encoder = set()
    for name in _tensor_names(folder):
        mapped, shard = vllm_spec.vllm_weight_name(name)
        if mapped.startswith("encoder."):
            assert shard is None
            encoder.add(mapped.removeprefix("encoder."))
        else:
            llm.setdefault(mapped, set()).add(shard)
    assert llm == vllm_spec.vllm_llm_parameters(config)
    with torch.device("meta"):
        model = DPAModel(AutoConfig.from_pretrained(folder, trust_remote_code=True))
    wanted = {n for n in model.state_dict() if n.startswith(("perceiver.", "multi_modal_projector."))}
    assert encoder == wanted
    head = "language_model.lm_head.weight" in llm
    assert head == (kind == "llama-untied")


@pytest.mark.parametrize(
    "name",
    [
        "lm_head",
        "model.vision_tower.x.weight",
        "model.perceiverx.w",
        "language_model.w",
        "",
        "model.multi_modal_projector",
    ],
)
def test_a_tensor_outside_the_known_parts_is_named(name):
    with pytest.raises(UnservableError, match=f"tensor {name!r} is in no part"):
        vllm_spec.vllm_weight_name(name)


@pytest.mark.parametrize(
    ("model_type", "arch"),
    [
        ("qwen3", "Qwen3ForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
    ],
)
def test_the_target_family_picks_vllms_own_class(dpa_models, model_type, arch):
    """The target's config goes to vLLM's class for its family with that architecture, the tie carried up."""
    config = _config(dpa_models["qwen3-tied"])
    config = {**config, "text_config": {**config["text_config"], "model_type": model_type}}
    hf = vllm_spec.target_hf_config(config)
    assert vllm_spec.target_architecture(config) == arch and hf["architectures"] == [arch]
    assert hf["tie_word_embeddings"] is True and hf["hidden_size"] == config["text_config"]["hidden_size"]
    untied = _config(dpa_models["llama-untied"])
    assert vllm_spec.target_hf_config(untied)["tie_word_embeddings"] is False


@pytest.mark.parametrize("model_type", ["gemma3", "", None, "Qwen3", "qwen3_vl"])
def test_a_target_family_without_a_vllm_mapping_is_named(dpa_models, model_type):
    config = _config(dpa_models["qwen3-tied"])
    config = {**config, "text_config": {**config["text_config"], "model_type": model_type}}
    with pytest.raises(UnservableError, match=f"model_type {model_type!r} has no vLLM mapping here .*qwen3"):
        vllm_spec.target_architecture(config)


@pytest.mark.parametrize("kind", ["qwen3-tied", "llama-untied"])
def test_placeholders_per_image_are_the_models_features_image_by_image(dpa_models, kind):
    """What vLLM's processor reserves per image (DPAProcessor's count) is the number of features the model writes
    for it; cut out of a two-image batch (vllm_spec.field_sizes / image_inputs), each image alone gives the
    features the batch gave it; the profiling size gets the most placeholders."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = dpa_models[kind]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    largest = vllm_spec.largest_image_size(processor)
    images = [example_image(40, 30), example_image(23, 61), example_image(*largest)]
    counts = vllm_spec.image_feature_counts(processor, images)
    inputs = processor(images=images, text=[processor.image_token * len(images)], return_tensors="pt")
    image_fields = {k: v for k, v in inputs.items() if k not in vllm_spec.TEXT_FIELDS}
    with torch.no_grad():
        together = model.model.get_image_features(**image_fields).pooler_output
        layout = vllm_spec.field_sizes(inputs, len(images))
        for index, count in enumerate(counts):
            alone = model.model.get_image_features(**vllm_spec.image_inputs(inputs, layout, index)).pooler_output
            assert len(alone) == 1 and alone[0].shape[0] == count == together[index].shape[0]
            torch.testing.assert_close(alone[0], together[index], rtol=1e-4, atol=1e-5)
    assert counts == [vllm_spec.image_feature_counts(processor, [image])[0] for image in images]
    assert counts[2] == max(counts)


def test_the_vllm_plugin_registers_the_export_architecture(tiny_export):
    """The `vllm.general_plugins` entry point registers the name the export's config gives, lazily by
    `module:Class` (the module imports vLLM, which cannot be installed here: it is run by scripts/gpu_check.sh)."""

    class Registry:
        calls: list = []

        def register_model(self, arch, model_cls):
            self.calls.append((arch, model_cls))

    registry = Registry()
    vllm_plugin.register(registry)
    assert registry.calls == [(_config(tiny_export)["architectures"][0], vllm_plugin.MODEL_CLASS)]
    module, _, name = vllm_plugin.MODEL_CLASS.partition(":")
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert f"class {name}(" in source
    points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert points["vllm.general_plugins"]["dpa"] == "dpa_cli.serving.vllm_plugin:register"


# --- `dpa serve` ------------------------------------------------------------------------------------------------
def _serve_cases(tmp: Path, export: Path) -> dict[str, tuple[list[str], list[str]]]:
    """(argv, needles) per spelling of a refused `dpa serve`."""
    (tmp / "file.txt").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "llava").mkdir()
    (tmp / "llava" / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    (tmp / "broken").mkdir()
    (tmp / "broken" / "config.json").write_text("{not json")
    (tmp / "list").mkdir()
    (tmp / "list" / "config.json").write_text("[]")
    missing = ["vLLM is not installed", "pip install vllm", f"transformers serve {export} --trust-remote-code"]
    config = json.loads((export / "config.json").read_text())
    for name, change in UNSERVABLE.items():  # a config the plugin cannot serve as transformers runs it
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(json.dumps(_deep_update(config, change)))
    unservable = {
        name: ([str(tmp / name)], [f"{name}/config.json", needle, "transformers serve"])
        for name, needle in (
            ("markers", "feature_span 'image+markers'"),
            ("early", "early fusion"),
            ("gemma-target", "model_type 'gemma3_text' has no vLLM mapping"),
        )
    }
    return {
        **unservable,
        "no-vllm": ([str(export)], missing),
        "no-vllm-port": ([str(export), "--port", "9001"], missing),
        "no-vllm-host-extra": ([str(export), "--host", "0.0.0.0", "--max-model-len", "64"], missing),
        "no-vllm-extra-after": ([str(export), "--tensor-parallel-size", "2", "--enforce-eager"], missing),
        "vllm-option-first": (
            ["--gpu-memory-utilization", "0.5", str(export)],
            ["--gpu-memory-utilization came where the export folder goes", "dpa serve EXPORT"],
        ),
        "missing-folder": ([str(tmp / "nope")], ["no such model folder", "dpa export"]),
        "a-file": ([str(tmp / "file.txt")], ["no such model folder"]),
        "no-config": ([str(tmp / "empty")], ["no config.json"]),
        "not-dpa": ([str(tmp / "llava")], ["model_type 'llava_next' is not a DPA model", "vllm serve"]),
        "bad-json": ([str(tmp / "broken")], ["broken/config.json"]),
        "json-list": ([str(tmp / "list")], ["model_type None is not a DPA model"]),
    }


UNSERVABLE = {
    "markers": {"feature_span": "image+markers"},
    "early": {"early_fusion": True},
    "gemma-target": {"text_config": {"model_type": "gemma3_text"}},
}


def _deep_update(config: dict, change: dict) -> dict:
    return {
        **config,
        **{k: _deep_update(config.get(k, {}), v) if isinstance(v, dict) else v for k, v in change.items()},
    }


SERVE_CASES = [
    *UNSERVABLE,
    "no-vllm",
    "no-vllm-port",
    "no-vllm-host-extra",
    "no-vllm-extra-after",
    "vllm-option-first",
    "missing-folder",
    "a-file",
    "no-config",
    "not-dpa",
    "bad-json",
    "json-list",
]


@pytest.mark.parametrize("case", SERVE_CASES)
def test_dpa_serve_refuses_clearly_and_writes_nothing(tiny_export, tmp_path, case):
    if case.startswith("no-vllm") and VLLM:
        pytest.skip("vLLM is installed: dpa serve would start it")
    argv, needles = _serve_cases(tmp_path, tiny_export)[case]
    before = tree_hash(tmp_path, tiny_export)
    result = CliRunner().invoke(app, ["serve", *argv])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and len(lines) <= 2, result.stderr
    assert all(needle in result.stderr for needle in needles), (needles, result.stderr)
    assert tree_hash(tmp_path, tiny_export) == before


@pytest.mark.optional  # needs vLLM, which pins its own torch (docs/serving.md)
@pytest.mark.parametrize("kind", ["qwen3-tied", "llama-untied"])
def test_vllm_processor_and_encoder_step_match_transformers(dpa_models, kind):
    """With vLLM importable (its Python code suffices; no GPU): vLLM's own multimodal processing with the plugin
    gives DPAProcessor's prompt ids and one placeholder range per image of its feature count, and the encoder
    step (`embed_multimodal` on the batched kwargs vLLM builds, weights loaded by vllm_spec's names) gives the
    transformers model's features, image by image."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from dpa_cli.serving.vllm_model import DPAEncoder, DPAForConditionalGeneration

    folder = dpa_models[kind]
    vllm_plugin.register()
    config = ModelConfig(model=str(folder), tokenizer=str(folder), dtype="float32", max_model_len=256)
    assert config.architectures == [vllm_spec.ARCHITECTURE] and config.is_multimodal_model
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    hf = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    images = [example_image(40, 30), example_image(23, 61)]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = hf.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    out = processor(prompt, processor.info.parse_mm_data({"image": images}))
    expected = hf(images=images, text=[prompt], return_tensors="pt")
    assert list(out["prompt_token_ids"]) == expected["input_ids"][0].tolist()
    counts = vllm_spec.image_feature_counts(hf, images)
    assert [r.length for r in out["mm_placeholders"]["image"]] == counts

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    encoder = DPAEncoder(model.config)
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    state = {
        vllm_spec.vllm_weight_name(n)[0].removeprefix("encoder."): t
        for n, t in weights.items()
        if vllm_spec.vllm_weight_name(n)[0].startswith("encoder.")
    }
    encoder.load_state_dict(state, strict=True)
    host = torch.nn.Module()
    host.encoder = encoder.eval()
    with torch.no_grad():
        features = DPAForConditionalGeneration.embed_multimodal(host, **out["mm_kwargs"].get_data())
        fields = {k: v for k, v in expected.items() if k not in vllm_spec.TEXT_FIELDS}
        reference = model.model.get_image_features(**fields).pooler_output
    assert [f.shape[0] for f in features] == counts
    for mine, theirs in zip(features, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
