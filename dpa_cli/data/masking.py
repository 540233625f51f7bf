"""Label masking from the target's own chat template, never from string heuristics.

The conversation is rendered once with the template. Each assistant turn's start is found by rendering the
conversation up to that turn with the generation prompt (the template's own assistant header), and its
content is located from there, so whatever the template inserts between header and content (Qwen3's empty
`<think>\\n\\n</think>\\n\\n`) stays masked. The text is tokenized once with character offsets, so spans map
exactly onto tokens. Stage 2 also supervises the end-of-turn token of every assistant turn (the special token
the template writes right after the content: `<|im_end|>`, `<|eot_id|>`, `<end_of_utterance>`), not what follows
it; stage 1 supervises the caption only, except under the paper encoding, whose official loss learns the
`<|im_end|>` of the caption too (its template suffix, ms-swift loss scale `default`).

An answer may itself open with the end of the assistant header: the paper template's generation prompt ends with
`<think>\\n\\n`, and an answer that already carries its empty think block (Qwen3-style data) gets no second one, so
its `<think>` is the header's. Its search then starts where the header's text stops being the template's. Under the
paper encoding the empty think block is never learned, wherever it stands (the official code masks its tokens in
the labels, `template/qwen.py:689-692`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dpa_cli.data.samples import BadSampleError, Sample
from dpa_cli.errors import DpaError
from dpa_cli.model.processing_dpa import PAPER_THINK


@dataclass(frozen=True)
class Layout:
    """A sample's target text before image expansion: token ids and which are supervised."""

    text: str  # the rendered conversation, holding the target's image token once per image
    ids: list[int]
    supervised: list[bool]
    answers: list[str]  # the assistant texts located in `text`, in order


class TemplateMasker:
    """Renders conversations with the target's chat template and marks the supervised tokens."""

    def __init__(self, processor: Any, stage: int):
        self.tokenizer = processor.tokenizer
        self.template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not self.template:
            raise DpaError(
                "the target tokenizer has no chat template: labels cannot be masked by turn",
                hint="add the target's chat_template.jinja to the workspace model folder",
            )
        if getattr(self.tokenizer, "backend_tokenizer", None) is None:
            raise DpaError("the target tokenizer is not a fast (tokenizers) tokenizer: dpa needs its character offsets")
        self.stage = stage
        paper = getattr(processor, "encoding", "dpa") == "paper"
        self.end_of_turn = stage != 1 or paper
        # The paper's empty think block as the target tokenizes it: its run of tokens is never learned.
        self.unlearned = self.tokenizer(PAPER_THINK, add_special_tokens=False)["input_ids"] if paper else []
        self.image_token_id = processor.image_token_id
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {})
        self.end_of_turn_ids = {i for i, token in decoder.items() if token.special} - {self.image_token_id}
        if self.tokenizer.eos_token_id is not None:
            self.end_of_turn_ids.add(self.tokenizer.eos_token_id)
        specials = sorted((str(decoder[i]) for i in self.end_of_turn_ids if i in decoder), key=len, reverse=True)
        self.closing = re.compile("|".join(map(re.escape, specials)) or "(?!)")
        self.header = self._assistant_header()

    def _assistant_header(self) -> str | None:
        """The text the template writes to open an assistant turn: its generation prompt, when that is a suffix."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        try:
            plain, prompted = self.render(probe), self.render(probe, add_generation_prompt=True)
        except Exception:  # a template that needs more than a user turn: every turn is then found by rendering
            return None
        header = prompted[len(plain) :] if prompted.startswith(plain) else ""
        return header if header.strip() else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _header_ends(self, messages: list[dict], text: str) -> dict[int, int] | None:
        """Message index -> end of its assistant header in `text`, when the header occurs exactly once per
        assistant turn (then the k-th occurrence opens the k-th assistant turn, and no render per turn is needed)."""
        if self.header is None:
            return None
        turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
        ends, position = [], text.find(self.header)
        while position >= 0 and len(ends) <= len(turns):
            ends.append(position + len(self.header))
            position = text.find(self.header, ends[-1])
        return dict(zip(turns, ends)) if len(ends) == len(turns) else None

    def _turn_start(self, messages: list[dict], k: int, text: str, cursor: int) -> int:
        """Where assistant turn k's content may start: after the prompt the template renders up to it."""
        if k == 0:
            return cursor
        head = self.render(messages[:k], add_generation_prompt=True)
        return len(head) if len(head) >= cursor and text.startswith(head) else cursor

    def _spans(self, sample: Sample, text: str) -> tuple[list[tuple[int, int]], list[str]]:
        """Character spans of each assistant turn's content in `text`."""
        spans, answers, cursor = [], [], 0
        header_ends = self._header_ends(sample.messages, text)
        for k, message in enumerate(sample.messages):
            parts = [b["text"] for b in message["content"] if b.get("type") == "text"]
            if message["role"] != "assistant" or not "".join(parts).strip():
                continue
            if header_ends is not None:
                start = header_ends[k]
            else:
                start = self._turn_start(sample.messages, k, text, cursor)
            start = max(cursor, start - self._header_overlap(parts))
            span = self._locate(text, [p for p in parts if p.strip()], start)
            if span is None:
                raise BadSampleError(
                    sample.id,
                    "no_supervised",
                    f"the chat template does not render assistant turn "
                    f"{k}'s text as written, so it cannot be supervised",
                )
            spans.append(span)
            answers.append(text[span[0] : span[1]])
            cursor = span[1]
        return spans, answers

    def _header_overlap(self, parts: list[str]) -> int:
        """How many characters at the end of the assistant header the answer writes itself: the longest header
        suffix, not only whitespace, that the answer (as written, or trimmed) starts with. The paper template's
        header ends with `<think>\\n\\n`, which an answer holding its own empty think block supplies. Whitespace
        alone never counts: a template that trims answers (Llama-3's) writes its header's newlines itself."""
        header = self.header or ""
        heads = (parts[0], parts[0].lstrip()) if parts else ()
        sizes = (n for n in range(len(header), 0, -1) if header[-n:].strip())
        return next((n for n in sizes if any(head.startswith(header[-n:]) for head in heads)), 0)

    def _locate(self, text: str, parts: list[str], start: int) -> tuple[int, int] | None:
        """The first place from `start` holding the text blocks in order (as written, else trimmed) and followed
        by a special token: an answer "k" is not the "k" of a template's "<think>". Else the first place at all."""
        trimmed = [parts[0].lstrip(), *parts[1:]]
        trimmed[-1] = trimmed[-1].rstrip()
        first = None
        for variant in (parts, trimmed) if trimmed != parts else (parts,):
            span = _find_in_order(text, variant, start)
            while span is not None:
                after = span[1]
                while after < len(text) and text[after].isspace():
                    after += 1
                if after == len(text) or self.closing.match(text, after):
                    return span
                first = first or span
                span = _find_in_order(text, variant, span[0] + 1)
        return first

    def layout(self, sample: Sample) -> Layout:
        try:
            text = self.render(sample.messages)
            spans, answers = self._spans(sample, text)
        except BadSampleError:
            raise
        except Exception as err:  # a template raising on this conversation (jinja's raise_exception, bad roles)
            raise BadSampleError(sample.id, "bad_record", f"the chat template refuses this conversation ({err})")
        encoding = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        ids = encoding.ids
        supervised = [False] * len(ids)
        for start, end in spans:
            first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
            if first is None or last is None:  # characters no token covers: compare every token's offsets
                supervised = _overlapping(encoding.offsets, spans)
                break
            supervised[first : last + 1] = [True] * (last + 1 - first)
        if self.end_of_turn:
            for _, end in spans:
                self._end_of_turn(text, ids, encoding, end, supervised)
        self._unlearn(ids, supervised)
        return Layout(text, ids, supervised, answers)

    def _unlearn(self, ids: list[int], supervised: list[bool]) -> None:
        """Paper encoding: each fully supervised run of the empty think block's tokens is masked (official
        template/qwen.py:689-692), e.g. the block an answer carries itself."""
        size = len(self.unlearned)
        for i in range(len(ids) - size + 1) if size else ():
            if ids[i : i + size] == self.unlearned and all(supervised[i : i + size]):
                supervised[i : i + size] = [False] * size

    def _end_of_turn(self, text: str, ids: list[int], encoding: Any, end: int, supervised: list[bool]) -> None:
        """Supervise the first special token after a content span, and the whitespace tokens before it, if any."""
        index = encoding.char_to_token(end - 1)
        index = len(ids) if index is None else index + 1
        between = []
        while index < len(ids):
            start, stop = encoding.token_to_chars(index)
            if ids[index] in self.end_of_turn_ids:
                if not text[end:start].strip():
                    for j in [*between, index]:
                        supervised[j] = True
                return
            if text[start:stop].strip():
                return
            between.append(index)
            index += 1


def _find_in_order(text: str, parts: list[str], start: int) -> tuple[int, int] | None:
    """(start of the first part, end of the last) of the parts found one after another from `start`."""
    begin, position = None, start
    for part in parts:
        found = text.find(part, position)
        if found < 0:
            return None
        begin = found if begin is None else begin
        position = found + len(part)
    return begin, position


def _overlapping(offsets: list, spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: whether its characters overlap any span (spans sorted, non-overlapping)."""
    out, s = [False] * len(offsets), 0
    for i, (start, end) in enumerate(offsets):
        while s < len(spans) and spans[s][1] <= start:
            s += 1
        out[i] = s < len(spans) and start < spans[s][1] and end > spans[s][0] and end > start
    return out
