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
    command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", str(tiny_export),
               "--trust-remote-code", "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=tiny_export.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited {process.returncode}:\n{process.stdout.read().decode()[-3000:]}")
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
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _chat_body(export: Path, image, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": QUESTION}]
    return {"model": str(export), "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **extra}  # fmt: skip


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
    chunks = [json.loads(line[len("data: ") :]) for line in raw.decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    # A random tiny model emits byte-fallback tokens that end or start inside a multi-byte character: the whole
    # decode and the stream's incremental decoder place U+FFFD differently. The rest is the same text.
    assert streamed.replace("\ufffd", "") == text.replace("\ufffd", "") and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
