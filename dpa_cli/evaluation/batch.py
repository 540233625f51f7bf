"""Batched model calls for evaluation: prompts through the chat template, left padding, greedy answers and
option-letter log-likelihoods.

A model is a VLM (loaded as `dpa generate` loads it: a workspace's stage as trained, an export, any VLM) or a
text-only causal LM (the original LLM, for the language-forgetting comparison). Left padding puts every
prompt's last token in the last column, so one forward pass scores the next token for the whole batch and
`generate` continues every row from its own end.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dpa_cli.errors import BadInputError
from dpa_cli.evaluation.metrics import LETTERS

VQA_INSTRUCTION = "Answer the question using a single word or phrase."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)  # Qwen3's (possibly empty) reasoning block


def _is_text_only(model_dir: Path) -> bool:
    from dpa_cli.describe import read_config
    from dpa_cli.families import detect_family

    return detect_family(read_config(model_dir), str(model_dir / "config.json")).name == "causal_lm"


def open_model(spec: str, device: str | None = None, allow_code: bool = False) -> Any:
    """A `Runnable`; for a text-only LM its `processor` is the tokenizer. `allow_code`: --trust-remote-code."""
    import torch

    from dpa_cli import loading
    from dpa_cli.generate import Runnable, open_runnable, pick_device
    from dpa_cli.workspace.results import find_runnable

    source = find_runnable(spec)
    if not _is_text_only(source.model_dir):
        return open_runnable(spec, device=device, allow_code=allow_code)
    device = pick_device(device)
    dtype = "auto" if device == "cuda" else torch.float32
    model = loading.load_model(source.model_dir, allow_code, auto_class="AutoModelForCausalLM", dtype=dtype)
    return Runnable(model.to(device).eval(), loading.load_tokenizer(source.model_dir, allow_code), source, device)


def tokenizer_of(runnable: Any) -> Any:
    return getattr(runnable.processor, "tokenizer", runnable.processor)


def is_vision(runnable: Any) -> bool:
    return hasattr(runnable.processor, "image_processor")


def prompt_text(item: Any, instruction: str | None = None) -> str:
    """The user's message: the record's own prompt, else question, options as "A. ..." lines, instruction."""
    if item.prompt:
        return item.prompt
    text = item.question
    if item.options:
        text += "\n" + "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, item.options))
    suffix = instruction if instruction is not None else (CHOICE_INSTRUCTION if item.options else VQA_INSTRUCTION)
    return f"{text}\n{suffix}" if suffix else text


def _conversation(runnable: Any, text: str, image: Any) -> list[dict[str, Any]]:
    if not is_vision(runnable):
        return [{"role": "user", "content": text}]
    from dpa_cli.generate import user_turn

    return [user_turn(text, [image] if image is not None else [])]


def batch_inputs(runnable: Any, texts: list[str], images: list[Any], answer_next: bool = False) -> Any:
    """Left-padded model inputs for one batch of prompts (`images[i]` is None for a text-only prompt).
    `answer_next`: the answer's first token comes next, so a prompt that opens a think block (the paper
    encoding) also closes it, as the official benchmark prompt does (EV:130-132)."""
    from dpa_cli.generate import opens_thinking

    processor, tokenizer = runnable.processor, tokenizer_of(runnable)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if any(image is not None for image in images) and not is_vision(runnable):
        raise BadInputError(
            f"{runnable.source.model_dir} is a text-only model and the items hold images",
            hint="evaluate it on text-only items (e.g. MMLU-style files)",
        )
    if processor.chat_template:
        conversations = [_conversation(runnable, text, image) for text, image in zip(texts, images)]
        padding = {"processor_kwargs": {"padding": True}} if is_vision(runnable) else {"padding": True}
        closed = {"enable_thinking": False} if answer_next and opens_thinking(processor) else {}
        inputs = processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **padding,
            **closed,
        )
    elif is_vision(runnable):
        marker = f"{processor.image_token}\n"
        prompts = [(marker if image is not None else "") + text for text, image in zip(texts, images)]
        present = [[image] for image in images if image is not None]
        inputs = processor(images=present or None, text=prompts, padding=True, return_tensors="pt")
    else:
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
    if not is_vision(runnable):  # a tokenizer's BatchEncoding holds only integer tensors
        return inputs.to(runnable.device)
    return inputs.to(device=runnable.device, dtype=next(runnable.model.parameters()).dtype)


def generate_answers(runnable: Any, texts: list[str], images: list[Any], max_new_tokens: int) -> list[str]:
    """Greedy answers, one per prompt, without special tokens or an empty reasoning block."""
    import torch

    tokenizer = tokenizer_of(runnable)
    inputs = batch_inputs(runnable, texts, images)
    with torch.no_grad():
        output = runnable.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    from dpa_cli.generate import answer_text

    new = output[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [_THINK.sub("", answer_text(runnable.processor, text)).strip() for text in texts]


def letter_token_ids(runnable: Any, count: int) -> list[int]:
    """The token that starts each option letter as the answer's first token ("A" after the chat template,
    " A" after "Answer:" without one, as MMLU scores it)."""
    tokenizer = tokenizer_of(runnable)
    prefix = "" if runnable.processor.chat_template else " "
    ids = [tokenizer.encode(prefix + letter, add_special_tokens=False)[0] for letter in LETTERS[:count]]
    if len(set(ids)) != len(ids):
        raise BadInputError(
            f"{runnable.source.model_dir}: its tokenizer does not give each option letter its own first token",
            hint="use --scoring generate",
        )
    return ids


def letter_logprobs(runnable: Any, texts: list[str], images: list[Any], counts: list[int]) -> list[dict[str, float]]:
    """Per prompt: the log-probability of each option letter as the answer's first token (one forward pass)."""
    import torch

    if not runnable.processor.chat_template:
        texts = [f"{text}\nAnswer:" for text in texts]
    inputs = batch_inputs(runnable, texts, images, answer_next=True)
    with torch.no_grad():
        logits = runnable.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1, :]  # [batch, vocab]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    rows = []
    for row, count in zip(logprobs, counts):
        ids = letter_token_ids(runnable, count)
        rows.append({letter: round(float(row[i]), 6) for letter, i in zip(LETTERS, ids)})
    return rows
