"""The workspace's chat template: the target's own, made to render image items when it does not.

A plain LM's template renders string content only (Qwen3's turns list content into an empty string, Llama 3's
into the list's Python repr), so the workspace's processor would find no image placeholder for the images it
is given. Such a template is wrapped: a short prelude flattens every message's list content into one string,
text items as written and image items as the placeholder, and then the LM's own template runs unchanged on
those messages (its turn markers, system rules and Qwen3's think blocks all apply as for a text chat). A
template that already renders each image item as the placeholder (every VLM target's) is kept byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2

# Qwen-VL tokenizers mark an image with these around `<|image_pad|>`, as Qwen2.5-VL's own template does and as
# the official DPA thinker text holds it (official-dpa.md sec. 3.2).
QWEN_MARKERS = ("<|vision_start|>", "<|vision_end|>")
QWEN_PAD = "<|image_pad|>"
PROBE_TEXT = "dpa probe text"
# The first line of a wrapped template: what the prelude is, for a reader of chat_template.jinja.
BANNER = "{#- dpa: list content flattened to text, image items as the image placeholder; then the LM's template -#}"
# The prelude. An image item is set off from neighbouring items by a newline, as LLaVA data writes `<image>\n`
# (dpa's data reader gives that newline back to the marker). Items other than text and image carry nothing the
# DPA processor reads, so they are left out. `dict(message, content=...)` keeps every other key of the message
# (reasoning_content, tool_calls, name, ...). Top-level `set messages` rebinds the name the LM's template reads.
_PRELUDE = (
    BANNER
    + """
{%- set dpa_ns = namespace(messages=[]) -%}
{%- for message in messages -%}
{%- set content = message.content if message.content is defined else none -%}
{%- if content is string or content is none or content is mapping -%}
{%- set dpa_ns.messages = dpa_ns.messages + [message] -%}
{%- else -%}
{%- set dpa_text = namespace(text='', last='') -%}
{%- for item in content
    if item is mapping and (item.type == 'image' or (item.type == 'text' and item.text is string)) -%}
{%- set separator = '\\n' if not loop.first and 'image' in (item.type, dpa_text.last) else '' -%}
{%- set dpa_text.text = dpa_text.text + separator + (IMAGE_TEXT if item.type == 'image' else item.text) -%}
{%- set dpa_text.last = item.type -%}
{%- endfor -%}
{%- set dpa_ns.messages = dpa_ns.messages + [dict(message, content=dpa_text.text)] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = dpa_ns.messages -%}
"""
)


@dataclass(frozen=True)
class WorkspaceTemplate:
    """The chat template the workspace's processor gets, and whether dpa wrapped the target's."""

    template: str | None
    wrapped: bool
    image_text: str  # what an image item renders as (before the processor expands the placeholder)
    renders_images: bool = True  # False: not even wrapped does it render a user turn's image and text

    def note(self) -> str | None:
        if not self.renders_images:
            return (
                "the target's chat template does not render a user turn's text and images, even flattened to "
                "text: chat with images will be refused; fix its chat_template.jinja"
            )
        if self.wrapped:
            return (
                f"the target's chat template renders only text: wrapped so that an image item renders as "
                f"{self.image_text} inside it"
            )
        return None


def image_text(tokenizer: Any, image_token: str) -> str:
    """An image item's text: the placeholder, inside Qwen's vision markers when it is Qwen's pad and the
    tokenizer has them as single tokens (the layout every Qwen-VL template and the official DPA text use)."""
    if image_token == QWEN_PAD and all(_is_single_token(tokenizer, marker) for marker in QWEN_MARKERS):
        return f"{QWEN_MARKERS[0]}{image_token}{QWEN_MARKERS[1]}"
    return image_token


def _is_single_token(tokenizer: Any, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    known = token_id is not None and token_id != tokenizer.unk_token_id
    return known and tokenizer.convert_ids_to_tokens(token_id) == token


def wrap(template: str, image: str) -> str:
    """`template` behind the prelude that flattens list content, an image item rendering as `image`."""
    literal = "'" + image.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return _PRELUDE.replace("IMAGE_TEXT", literal) + template


def _probe() -> list[dict[str, Any]]:
    """A user turn with two images, text between and after them, in the shape processors are given."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": PROBE_TEXT},
                {"type": "image"},
                {"type": "text", "text": "?"},
            ],
        }
    ]


def renders_images(tokenizer: Any, template: str, image_token: str) -> bool:
    """Whether `template` renders the probe's two image items as the placeholder and keeps its text."""
    try:
        text = tokenizer.apply_chat_template(
            _probe(), chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError):
        return False  # a template that cannot render list content at all
    return isinstance(text, str) and text.count(image_token) == 2 and PROBE_TEXT in text


def workspace_template(tokenizer: Any, image_token: str) -> WorkspaceTemplate:
    """The target tokenizer's chat template as the workspace should have it (None when it has none)."""
    template = tokenizer.chat_template
    image = image_text(tokenizer, image_token)
    if not isinstance(template, str) or renders_images(tokenizer, template, image_token):
        return WorkspaceTemplate(template, wrapped=False, image_text=image)
    wrapped = wrap(template, image)
    if not renders_images(tokenizer, wrapped, image_token):  # kept as it was: the note says what is wrong
        return WorkspaceTemplate(template, wrapped=False, image_text=image, renders_images=False)
    return WorkspaceTemplate(wrapped, wrapped=True, image_text=image)
