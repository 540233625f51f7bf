"""Run a DPA model: one answer to images and a prompt, or a multi-turn chat, through the processor's chat template.

MODEL is a workspace (its latest stage, or `--stage N`, with a LoRA adapter applied unmerged as trained),
a stage folder, an export or any DPA checkpoint. Decoding is greedy unless a temperature is given, so the
same model and prompt always give the same tokens. Under the paper encoding the prompt ends inside an open
think block, as the official `chat()` prompt does: the answer is what follows the model's `</think>`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa_cli import loading
from dpa_cli.errors import BadInputError
from dpa_cli.loading import load_as_trained
from dpa_cli.workspace.results import StageResult, find_runnable

DEVICES = ("cpu", "cuda")
THINK_CLOSE = "</think>"  # dpa_cli.model.processing_dpa.THINK_CLOSE


@dataclass
class Runnable:
    """A loaded model with its processor, where it came from and where it runs."""

    model: Any
    processor: Any
    source: StageResult
    device: str


def pick_device(device: str | None) -> str:
    """`cuda` when asked for (and present) or, by default, when present; else `cpu`."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise BadInputError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA GPU is visible to torch here", hint="use --device cpu")
    return device


def open_runnable(spec: str, stage: int | None = None, device: str | None = None, allow_code: bool = False) -> Runnable:
    """Load MODEL as trained. On a GPU in its stored dtype; on CPU in float32, where 16-bit matmuls are slow.
    `allow_code` (--trust-remote-code) runs the folder's own model code even when it is not dpa's."""
    import torch

    source = find_runnable(spec, stage)
    device = pick_device(device)
    dtype = None if device == "cuda" else torch.float32
    model = load_as_trained(source, dtype=dtype, device=device, allow_code=allow_code)
    return Runnable(model, loading.load_processor(source.model_dir, allow_code), source, device)


def check_runnable(spec: str, allow_code: bool = False) -> None:
    """Refuse MODEL now if the trust gate would refuse it: its config and processor load (no weights), so a
    command that runs several models stops before it works on the first."""
    source = find_runnable(spec)
    loading.load_config(source.model_dir, allow_code)
    loading.load_processor(source.model_dir, allow_code)


def open_image(path: str | Path) -> Any:
    """An image file as RGB, decoded now so a bad file is named before any generation starts.

    The path is the user's own (not confined to an image root), but it passes the same gate as data images:
    no URL or video, a regular file, its size checked from the header before decoding, truncation caught.
    """
    from dpa_cli.data.image_refs import image_ref
    from dpa_cli.data.images import ImageError, load_image

    try:  # the resolver data images go through: a data:image/...;base64, URI is an image too, a URL is refused
        return load_image(image_ref(os.path.expanduser(str(path)), None))[0]
    except ImageError as err:
        raise BadInputError(err.message) from None


def user_turn(text: str, images: list[Any]) -> dict[str, Any]:
    """A user message in the chat-template format: its images first, then the text."""
    content = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def build_inputs(processor: Any, messages: list[dict[str, Any]], answer_next: bool = False) -> Any:
    """Model inputs for the conversation, ending with the assistant's turn to speak. `answer_next`: the answer's
    own tokens come next (scoring a given answer), so a prompt that opens a think block (the paper encoding)
    closes it, as dpa_cli.evaluation.batch.batch_inputs does."""
    if processor.chat_template:
        closed = {"enable_thinking": False} if answer_next and opens_thinking(processor) else {}
        return processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **closed
        )
    if len(messages) > 1:
        what = "this model has no chat template, so it cannot hold a conversation"
        raise BadInputError(what, hint="use `dpa generate`")
    content = messages[0]["content"]
    images = [block["image"] for block in content if block["type"] == "image"]
    prompt = content[-1]["text"]
    texts = processor.perceiver_texts(messages) if images and hasattr(processor, "perceiver_texts") else None
    fusion = {} if texts is None else {"perceiver_text": texts}
    text = "".join(f"{processor.image_token}\n" for _ in images) + prompt
    return processor(images=images or None, text=[text], return_tensors="pt", **fusion)


def opens_thinking(processor: Any) -> bool:
    """Whether the processor's generation prompt ends inside an open think block (the paper encoding)."""
    return getattr(processor, "encoding", "dpa") == "paper"


def answer_text(processor: Any, text: str) -> str:
    """The answer in a decoded reply: after an opened think block, what follows the last `</think>` (all of it
    when the block was never closed), newlines stripped, as the official chat() does (FVT:292-315); else the
    text as decoded."""
    if not opens_thinking(processor):
        return text
    return text.rsplit(THINK_CLOSE, 1)[-1].strip("\n")


def _streamer(tokenizer: Any, on_text: Callable[[str], None], after_think: bool = False) -> Any:
    """transformers' TextStreamer, handing each finished piece of text to `on_text` instead of printing it;
    with `after_think`, only what follows the `</think>` (all of it, at the end, if none came)."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        held: str | None = "" if after_think else None  # reasoning held back until the block closes
        started = not after_think  # the answer's leading newlines are dropped

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.held is not None:
                self.held += text
                if THINK_CLOSE not in self.held and not stream_end:
                    return
                text, self.held = self.held.rsplit(THINK_CLOSE, 1)[-1], None
            if not self.started:
                text = text.lstrip("\n")
                self.started = bool(text)
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def processor_inputs(processor: Any, messages: list[dict[str, Any]]) -> Any:
    """The model inputs of `messages`; what the processor refuses (an image too thin for the perceiver's patch
    grid, `<image>` markers typed into the prompt with no image for them) is a BadInputError."""
    try:
        return build_inputs(processor, messages)
    except ValueError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInputError(f"the processor refuses the images or the prompt ({reason})") from None


def reply(
    runnable: Runnable,
    messages: list[dict[str, Any]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    on_text: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The model's next assistant turn: `text` and the generated `token_ids`; streamed to `on_text` if given."""
    import torch

    model, tokenizer = runnable.model, runnable.processor.tokenizer
    dtype = next(model.parameters()).dtype
    inputs = processor_inputs(runnable.processor, messages).to(device=runnable.device, dtype=dtype)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    streamer = _streamer(tokenizer, on_text, opens_thinking(runnable.processor)) if on_text else None
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
    new = output[0, inputs["input_ids"].shape[1] :]
    text = answer_text(runnable.processor, tokenizer.decode(new, skip_special_tokens=True))
    return {"text": text, "token_ids": new.tolist()}


@dataclass
class ChatSession:
    """A conversation: user turns (with the images added since the last one) and the model's replies."""

    runnable: Runnable
    max_new_tokens: int = 256
    temperature: float = 0.0
    messages: list[dict[str, Any]] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)  # images for the next user turn

    def add_image(self, path: str | Path) -> None:
        self.pending.append(open_image(path))

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Send one user turn and return the reply; a failed turn leaves the conversation as it was (a refused
        turn also drops the images waiting for it, so the next message does not fail the same way)."""
        turn = [*self.messages, user_turn(text, self.pending)]
        try:
            answer = reply(self.runnable, turn, self.max_new_tokens, self.temperature, on_text)
        except BadInputError:
            self.pending = []
            raise
        self.messages = [*turn, {"role": "assistant", "content": [{"type": "text", "text": answer["text"]}]}]
        self.pending = []
        return answer

    def reset(self) -> None:
        self.messages, self.pending = [], []
