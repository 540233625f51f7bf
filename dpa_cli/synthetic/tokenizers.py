"""Offline tokenizers for synthetic checkpoints: byte-level BPE trained in code, with each family's special
tokens and a realistic chat template. Training runs once per process (a few ms); no network, ever.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BASE_VOCAB = 320  # 256 byte symbols + merges; specials are appended after, as in real tokenizers
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A picture of a cat sitting on a red mat next to a window.",
    "What is shown in the image? Describe it in detail, please.",
    "You are a helpful assistant. The user asks and the assistant answers.",
    "There are 3 apples and 2 oranges on the table; 3 + 2 = 5.",
    "The chart shows sales rising from 2019 to 2024 in every region.",
)

# One macro renders string content and OpenAI-style content lists; IMAGE becomes a Jinja string literal.
_RENDER = (
    "{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content -%}{%- if part.type == 'image' -%}{{- IMAGE -}}{%- elif part.type == 'text' -%}"
    "{{ part.text }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)


def _render(image: str) -> str:
    return _RENDER.replace("IMAGE", json.dumps(image))


def chatml_template(image: str, system: str | None = "You are a helpful assistant.") -> str:
    """Qwen2 / Qwen2-VL / LLaVA-OneVision ChatML, with a default system turn when `system` is set."""
    default = (
        "{%- if loop.first and message.role != 'system' -%}"
        "{{- '<|im_start|>system\\n" + system + "<|im_end|>\\n' -}}{%- endif -%}"
        if system
        else ""
    )
    return _render(image) + (
        "{%- for message in messages -%}" + default + "{{- '<|im_start|>' + message.role + '\\n' + "
        "render(message.content) + '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def qwen3_template(image: str) -> str:
    """Qwen3's rule: the assistant turn after the last user query opens with `<think>\\n\\n</think>\\n\\n`
    (empty unless `reasoning_content` is given); earlier answers carry no think block."""
    return _render(image) + (
        "{%- if messages[0].role == 'system' -%}"
        "{{- '<|im_start|>system\\n' + render(messages[0].content) + '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- set ns = namespace(last_query_index=messages|length - 1) -%}"
        "{%- for message in messages -%}{%- if message.role == 'user' -%}"
        "{%- set ns.last_query_index = loop.index0 -%}{%- endif -%}{%- endfor -%}"
        "{%- for message in messages -%}{%- set content = render(message.content) -%}"
        "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}"
        "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}"
        "{%- elif message.role == 'assistant' -%}"
        "{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' -%}"
        "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) -%}"
        "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content -}}"
        "{%- else -%}{{- '<|im_start|>assistant\\n' + content -}}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- if enable_thinking is defined and enable_thinking is false -%}"
        "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
    )


def llama3_template(image: str) -> str:
    """Llama-3 headers; llava-hf's Llama-3 models put `<image>\\n` in the user turn."""
    return _render(image) + (
        "{{- bos_token -}}{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + "
        "render(message.content) | trim + '<|eot_id|>' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    )


def idefics3_template(bos: str) -> str:
    """Idefics3 / SmolVLM: `User:<image>text<end_of_utterance>\\nAssistant: ...`."""
    return _render("<image>") + (
        "{{- '" + bos + "' -}}{%- for message in messages -%}"
        "{{- message.role | capitalize -}}"
        "{%- if message.content is not string and message.content[0].type == 'image' -%}{{- ':' -}}"
        "{%- else -%}{{- ': ' -}}{%- endif -%}"
        "{{- render(message.content) + '<end_of_utterance>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
    )


QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
IDEFICS_TILES = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
IDEFICS_IMAGE = ("<fake_token_around_image>", "<image>", "<global-img>", *IDEFICS_TILES)


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens (in id order after the BPE vocab), their roles, and the chat template."""

    specials: tuple[str, ...]
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    plain: tuple[str, ...] = ()  # added but not special, like Qwen3's <think> tags
    template: str | None = None
    prepend_bos: bool = False  # Llama tokenizers add BOS themselves


_QWEN = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_THINK = ("<think>", "</think>")

TOKENIZERS: dict[str, TokenizerSpec] = {
    "qwen3": TokenizerSpec(
        _QWEN + QWEN_VISION, "<|im_end|>", pad="<|endoftext|>", plain=_THINK, template=qwen3_template(QWEN_IMAGE)
    ),
    "qwen3_llava": TokenizerSpec(
        _QWEN + QWEN_VISION + ("<image>",),
        "<|im_end|>",
        pad="<|endoftext|>",
        plain=_THINK,
        template=qwen3_template("<image>\n"),
    ),
    "qwen2": TokenizerSpec(
        _QWEN + QWEN_VISION, "<|im_end|>", pad="<|endoftext|>", template=chatml_template(QWEN_IMAGE)
    ),
    "qwen3_vl": TokenizerSpec(
        _QWEN + QWEN_VISION,
        "<|im_end|>",
        pad="<|endoftext|>",
        plain=_THINK,
        template=chatml_template(QWEN_IMAGE, system=None),
    ),
    "qwen2_llava": TokenizerSpec(
        _QWEN + QWEN_VISION + ("<image>", "<video>"),
        "<|im_end|>",
        pad="<|endoftext|>",
        template=chatml_template("<image>\n"),
    ),
    "llama3": TokenizerSpec(
        _LLAMA3 + ("<image>",),
        "<|eot_id|>",
        bos="<|begin_of_text|>",
        pad="<|end_of_text|>",
        template=llama3_template("<image>\n"),
        prepend_bos=True,
    ),
    "vicuna": TokenizerSpec(("<unk>", "<s>", "</s>"), "</s>", bos="<s>", unk="<unk>", prepend_bos=True),
    "idefics3": TokenizerSpec(
        ("<|begin_of_text|>", "<|end_of_text|>", "<end_of_utterance>") + IDEFICS_IMAGE,
        "<end_of_utterance>",
        bos="<|begin_of_text|>",
        pad="<|end_of_text|>",
        template=idefics3_template("<|begin_of_text|>"),
    ),
    "smolvlm": TokenizerSpec(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>") + IDEFICS_IMAGE,
        "<end_of_utterance>",
        bos="<|im_start|>",
        pad="<|im_end|>",
        template=idefics3_template("<|im_start|>"),
    ),
}


@functools.cache
def _trained_bpe(corpus: tuple[str, ...] = CORPUS, vocab_size: int = BASE_VOCAB) -> str:
    """The byte-level BPE model, trained once per process and kept as JSON (callers get fresh copies)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus * 4, trainer)
    return tokenizer.to_str()


def tiny_tokenizer(
    kind: str, corpus: tuple[str, ...] = CORPUS, vocab_size: int = BASE_VOCAB
) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of `kind` (see TOKENIZERS): BPE trained on `corpus`, specials after its vocabulary,
    chat template set."""
    spec = TOKENIZERS[kind]
    tokenizer = Tokenizer.from_str(_trained_bpe(tuple(corpus), vocab_size))
    tokenizer.add_special_tokens(list(spec.specials))
    tokenizer.add_tokens(list(spec.plain))
    if spec.prepend_bos:
        bos_id = tokenizer.token_to_id(spec.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A $B", special_tokens=[(spec.bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=spec.eos,
        bos_token=spec.bos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        chat_template=spec.template,
    )
