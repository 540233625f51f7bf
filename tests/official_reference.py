"""What the official DPA code computes, as code: an independent transcription to test dpa against (issue 15).

Written from the official repository (THUMAI-Lab/Deep-Pre-Alignment @ 1faf467, read with `git show HEAD:PATH`) and
from the careful reading of it in briefs/official-dpa.md ("sec." below); no official code is copied or run (it does
not import under transformers 5). It never imports dpa_cli: it reads an official-layout checkpoint's tensors itself
and computes with torch and, where the official code calls transformers, the same transformers building blocks
(Qwen2.5-VL's vision tower, Qwen3 decoder layers, Qwen3ForCausalLM, tokenizers, the image processor), wired as the
official code wires them. Where the official code leans on a transformers 4.57 function whose transformers 5 form
differs (M-RoPE position ids and rotary sections), the rule is written out here from its 4.57 reading.

Short names (as in the brief): FVT `ms-swift/modelings/modeling_forward_visual_tokens_llava_arch.py`, LB
`ms-swift/modelings/modeling_llava_baseline.py`, QWT `ms-swift/swift/llm/template/template/qwen.py`, TB
`ms-swift/swift/llm/template/base.py`, TU `ms-swift/swift/llm/template/template/utils.py`, VU
`ms-swift/swift/llm/template/vision_utils.py`, LS `ms-swift/swift/plugin/loss_scale/loss_scale.py`, PT
`ms-swift/scripts/PT_DPA_4node.sh`; tf457 = transformers 4.57.1, qvu = qwen-vl-utils 0.0.11 (sec. 0).

The official code hard-codes the real Qwen ids (FVT:34-40, QWT:285, QWT:691: 151652 `<|vision_start|>`, 151653
`<|vision_end|>`, 151655 `<|image_pad|>`, 151667 `<think>`, 271 `\\n\\n`, 151668 `</think>`). Tiny tokenizers give
those strings other ids, so `Ids` looks each id up by the string it stands for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from PIL import Image
from safetensors import safe_open
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm

IGNORE = -100
IMAGE_TAG = "<image>"  # the data's image tag (TB:43 `special_tokens`)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # what the tag becomes (QWT:307)
# ChatML pieces of QwenTemplateMeta (TU:13-20; QWT:31-36 auto_add_bos False; default_system None for both templates:
# QWT:65, 812-818), so no system turn and no BOS (TB:1088-1103).
PROMPT = "<|im_start|>user\n{{QUERY}}<|im_end|>\n<|im_start|>assistant\n"
CHAT_SEP, SUFFIX = "<|im_end|>\n", "<|im_end|>"
NO_THINK_PREFIX = "<think>\n\n</think>\n\n"  # Qwen3Template (QWT:61-62), put in every assistant turn (TU:45-56)
TRAIN_MAX_PIXELS = 262_144  # MAX_PIXELS (PT:14, SFT:14, LORA:14)
# qwen_vl_utils constants, not patched for this model type (sec. 3.5 step 3; qvu:26-28)
QVU_FACTOR, QVU_MIN_PIXELS, QVU_MAX_PIXELS, QVU_MAX_RATIO = 28, 4 * 28 * 28, 16384 * 28 * 28, 200


# --- reading official folders ----------------------------------------------------------------------------------
def hub_folder(cache: Path, repo_id: str) -> Path:
    """Where from_pretrained finds `repo_id` offline (LB:548-549, FVT:115-126, QWT:510): its cached snapshot."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder: safetensors, else `pytorch_model*.bin` (the scripts save with --save_safetensors
    false, PT:60), read weights-only."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    if not tensors:
        for path in sorted(Path(folder).glob("pytorch_model*.bin")):
            tensors.update(torch.load(path, weights_only=True, map_location="cpu"))
    return tensors


def under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


@dataclass(frozen=True)
class Ids:
    """The hard-coded official ids, found by the string each stands for."""

    vision_start: int
    vision_end: int
    image_pad: int
    pad: int  # 151643 <|endoftext|>
    think: tuple[int, ...]  # [151667, 271, 151668, 271]: the no-think prefix as the Qwen3 tokenizer splits it

    @classmethod
    def of(cls, tokenizer: Any) -> Ids:
        def one(token: str) -> int:
            return tokenizer.convert_tokens_to_ids(token)

        think = tuple(tokenizer(NO_THINK_PREFIX, add_special_tokens=False)["input_ids"])
        return cls(one("<|vision_start|>"), one("<|vision_end|>"), one("<|image_pad|>"), one("<|endoftext|>"), think)


# --- the training template (sec. 2.1, 3.1, 3.2) -------------------------------------------------------------------
def _contexts(messages: list[dict[str, str]], think: bool) -> list[tuple[str, float]]:
    """`_swift_encode` (TB:1064-1177): per round the prompt with the query (OTHER), the response (RESPONSE), then the
    chat separator (OTHER) or, after the last, the suffix (SUFFIX); loss scale 1 for RESPONSE and SUFFIX (LS:43-47).
    The thinker's Qwen3Template first puts the no-think prefix in every assistant message (TU:45-56)."""
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2), messages
    out: list[tuple[str, float]] = []
    rounds = list(zip(messages[::2], messages[1::2]))
    for index, (query, response) in enumerate(rounds):
        answer = response["content"]
        if think and not answer.startswith(("<think>", NO_THINK_PREFIX)):
            answer = NO_THINK_PREFIX + answer
        out += [(PROMPT.replace("{{QUERY}}", query["content"]), 0.0), (answer, 1.0)]
        out.append((CHAT_SEP, 0.0) if index < len(rounds) - 1 else (SUFFIX, 1.0))
    return out


def _split_tags(contexts: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """`_split_special_tokens` (TB:745-760) then `_pre_tokenize_images` (TB:845-864): each `<image>` becomes the
    Qwen image string (QWT:307) with loss scale 0."""
    out = []
    for text, scale in contexts:
        for index, piece in enumerate(text.split(IMAGE_TAG)):
            if index:
                out.append((QWEN_IMAGE, 0.0))
            if piece:
                out.append((piece, scale))
    return out


def _merge(contexts: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """`_simplify_context_list` (TB:714-742): neighbouring strings of equal loss scale are joined, then each joined
    string is tokenized on its own (TB:954-958)."""
    out: list[tuple[str, float]] = []
    for text, scale in contexts:
        if out and out[-1][1] == scale:
            out[-1] = (out[-1][0] + text, scale)
        else:
            out.append((text, scale))
    return out


def _dynamic_eos(ids: list[int], labels: list[int], suffix: list[int]) -> None:
    """`_add_dynamic_eos` (TB:971-984, called at TB:1274): a masked run that starts with the suffix (`<|im_end|>`)
    and is followed by a learned run gets the suffix learned, so every assistant `<|im_end|>` is learned."""
    start = 0
    for i in range(1, len(labels)):
        if labels[i - 1] >= 0 and labels[i] == IGNORE:
            start = i
        if start > 0 and labels[i - 1] == IGNORE and labels[i] >= 0:
            if i - start >= len(suffix) and ids[start : start + len(suffix)] == suffix:
                labels[start : start + len(suffix)] = suffix


def _template_encode(tokenizer: Any, messages: list[dict[str, str]], think: bool) -> tuple[list[int], list[int]]:
    """`Template._encode` (TB:1244-1288): ids and labels of the conversation, `labels[0] = -100` (TB:1279-1280)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, scale in _merge(_split_tags(_contexts(messages, think))):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]  # `_tokenize` (TB:763-764)
        ids += piece
        labels += piece if scale > 0 else [IGNORE] * len(piece)  # TB:960-963
    _dynamic_eos(ids, labels, tokenizer(SUFFIX, add_special_tokens=False)["input_ids"])
    labels[0] = IGNORE
    return ids, labels


def _expand_pads(ids: list[int], labels: list[int], pad: int, counts: list[int]) -> tuple[list[int], list[int]]:
    """`_extend_tokens` (TB:326-346) as QWT:369-377 (perceiver) and QWT:639-653 (thinker) call it: the k-th image pad
    becomes `prod(image_grid_thw[k]) / merge_size**2` pads, labelled -100."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    images = iter(counts)
    for token, label in zip(ids, labels):
        n = next(images) if token == pad else 1
        out_ids += [token] * n
        out_labels += [label] if token != pad else [IGNORE] * n
    return out_ids, out_labels


def smart_resize(height: int, width: int) -> tuple[int, int]:
    """qwen-vl-utils `smart_resize` (qvu:60-86) with its own constants: each side to the nearest multiple of 28, then
    the area brought into [3136, 12845056] in proportion."""
    if max(height, width) / min(height, width) > QVU_MAX_RATIO:
        raise ValueError(f"aspect ratio over {QVU_MAX_RATIO}")
    h = max(QVU_FACTOR, round(height / QVU_FACTOR) * QVU_FACTOR)
    w = max(QVU_FACTOR, round(width / QVU_FACTOR) * QVU_FACTOR)
    if h * w > QVU_MAX_PIXELS:
        beta = math.sqrt(height * width / QVU_MAX_PIXELS)
        h = max(QVU_FACTOR, math.floor(height / beta / QVU_FACTOR) * QVU_FACTOR)
        w = max(QVU_FACTOR, math.floor(width / beta / QVU_FACTOR) * QVU_FACTOR)
    elif h * w < QVU_MIN_PIXELS:
        beta = math.sqrt(QVU_MIN_PIXELS / (height * width))
        h = math.ceil(height * beta / QVU_FACTOR) * QVU_FACTOR
        w = math.ceil(width * beta / QVU_FACTOR) * QVU_FACTOR
    return h, w


def training_image(path: Path) -> Image.Image:
    """The training image pipeline before the processor (sec. 3.5): `load_image` converts to RGB (VU:143-149); the
    template scales it down in proportion to at most MAX_PIXELS (TB:278-280, `rescale_image` VU:89-99: torchvision
    Resize on a PIL image, i.e. PIL bilinear; as for every sample but a template instance's first, whose
    `self.max_pixels` is still unset, QWT:586); `fetch_image` snaps it to the 28 grid (QWT:303; qvu:89-95, PIL
    resize with its default bicubic)."""
    image = Image.open(path)
    image = image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    if width * height > TRAIN_MAX_PIXELS:
        ratio = width / height
        scaled = math.sqrt(TRAIN_MAX_PIXELS / ratio)
        image = image.resize((int(scaled * ratio), int(scaled)), Image.BILINEAR)
    h, w = smart_resize(image.height, image.width)
    return image.resize((w, h), Image.BICUBIC)


@dataclass
class Encoded:
    """One sample as `ForwardVisualTokensArchTemplate._encode` returns it (QWT:583-696)."""

    perceiver_ids: list[int]
    ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


@dataclass(frozen=True)
class TemplateParts:
    """What the DPA template encodes with: the processor ms-swift builds from the model folder
    (`ms-swift/swift/llm/model/register.py:438-443`: the perceiver's tokenizer and image processor) and the thinker
    template's tokenizer, `Qwen/Qwen3-4B` whatever the config says (QWT:510)."""

    perceiver_tokenizer: Any
    thinker_tokenizer: Any
    image_processor: Any

    @classmethod
    def load(cls, folder: Path, hub: Path) -> TemplateParts:
        local = {"trust_remote_code": False}  # the folder's auto_map names the official modules: never run them
        return cls(
            tf.AutoTokenizer.from_pretrained(folder, **local),
            tf.AutoTokenizer.from_pretrained(hub_folder(hub, "Qwen/Qwen3-4B"), **local),
            tf.AutoImageProcessor.from_pretrained(folder, **local),
        )


def encode(messages: list[dict[str, str]], images: list[Path], stage: int, parts: TemplateParts) -> Encoded:
    """The training encode of one LLaVA-style conversation (`<image>` tags in the text, one image file per tag).

    Stage 1 (PT:15-16): KEEP_FIRST_TURN_ONLY keeps the first round (`preprocessor/core.py:582-610`) and
    TRIME_PERCEIVER_AFTER_IMAGE cuts the perceiver ids after the first `<|vision_end|>` (QWT:658-670)."""
    if stage == 1:
        messages = messages[:2]
    tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if tags < len(images):  # `_add_default_tags` (TB:916-944): missing tags go in front of the first message
        messages = [
            {**messages[0], "content": IMAGE_TAG * (len(images) - tags) + messages[0]["content"]},
            *messages[1:],
        ]
    pictures = [training_image(path) for path in images]
    # `processor.image_processor(images, do_resize=False)` (QWT:633-636, QWT:352): the pixels are already on the grid.
    pixels = parts.image_processor(images=pictures, do_resize=False, return_tensors="pt")
    merge = parts.image_processor.merge_size**2
    counts = [int(grid.prod()) // merge for grid in pixels["image_grid_thw"]]
    p_ids, t_ids = Ids.of(parts.perceiver_tokenizer), Ids.of(parts.thinker_tokenizer)
    # Perceiver: the parent Qwen2.5-VL template's encode of the whole conversation, labels dropped (QWT:598-601).
    perceiver, perceiver_labels = _template_encode(parts.perceiver_tokenizer, messages, think=False)
    perceiver, _ = _expand_pads(perceiver, perceiver_labels, p_ids.image_pad, counts)
    if stage == 1:
        perceiver = perceiver[: perceiver.index(p_ids.vision_end) + 1]
    # Thinker: ms-swift's `qwen3` template on the same messages (QWT:613-615), the same image string (QWT:525).
    ids, labels = _template_encode(parts.thinker_tokenizer, messages, think=True)
    ids, labels = _expand_pads(ids, labels, t_ids.image_pad, counts)
    size = len(t_ids.think)  # the think block is masked where it tokenized to exactly its 4 ids (QWT:689-692)
    for i in range(len(labels) - size + 1):
        if tuple(labels[i : i + size]) == t_ids.think:
            labels[i : i + size] = [IGNORE] * size
    return Encoded(perceiver, ids, labels, pixels["pixel_values"], pixels["image_grid_thw"])


def collate(samples: list[Encoded], parts: TemplateParts) -> dict[str, torch.Tensor]:
    """Training collation: both sequences right-padded with the template tokenizer's pad id, `<|endoftext|>`
    (TB:1623, 1666; QWT:741-766), masks with 0, labels with -100; pixels and grids concatenated (TB:1731-1750)."""
    pad = parts.perceiver_tokenizer.pad_token_id

    def right(rows: list[list[int]], value: int) -> torch.Tensor:
        length = max(len(row) for row in rows)
        return torch.tensor([row + [value] * (length - len(row)) for row in rows])

    return {
        "input_ids": right([s.ids for s in samples], pad),
        "attention_mask": right([[1] * len(s.ids) for s in samples], 0),
        "labels": right([s.labels for s in samples], IGNORE),
        "input_ids_of_perceiver": right([s.perceiver_ids for s in samples], pad),
        "attention_mask_of_perceiver": right([[1] * len(s.perceiver_ids) for s in samples], 0),
        "pixel_values": torch.cat([s.pixel_values for s in samples]),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in samples]),
    }


# --- the forward (sec. 2.2-2.7) -------------------------------------------------------------------------------------
def rope_index(ids: torch.Tensor, mask: torch.Tensor, grids: torch.Tensor, image_pad: int, merge: int) -> torch.Tensor:
    """`get_rope_index` of tf457 (:1026-1114, called at :1272-1293; sec. 2.2), `[3, batch, seq]`: over each row's
    unmasked tokens, text counts up on all three axes; an image starting at position p takes (p, p + r, p + c) for its
    merged row r and column c; the text after it resumes at 1 + the largest position so far; masked slots get 1."""
    positions = torch.ones(3, *ids.shape, dtype=torch.long)
    grid = iter(grids.tolist())
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        tokens, out, position, i = ids[row][keep].tolist(), [], 0, 0
        while i < len(tokens):
            if tokens[i] != image_pad:
                out.append((position,) * 3)
                position, i = position + 1, i + 1
                continue
            _, h, w = next(grid)
            h, w = h // merge, w // merge
            out += [(position, position + r, position + c) for r in range(h) for c in range(w)]
            position, i = position + max(h, w), i + h * w
        positions[:, row, keep] = torch.tensor(out, dtype=torch.long).T
    return positions


def mrope_cos_sin(positions: torch.Tensor, theta: float, dim: int, section: list[int]) -> tuple[torch.Tensor, ...]:
    """The perceiver's rotary (LB:552-553: `Qwen2_5_VLRotaryEmbedding(perceiver_config)`; tf457 :491-526 and
    `modeling_rope_utils.py:123-131`: inv_freq = 1 / theta^(2i/d), cos/sin per axis in float32) as
    `apply_multimodal_rotary_pos_emb(..., mrope_section)` uses it (LB:356-362): the doubled frequency vector split as
    mrope_section * 2, piece i taken from position row i % 3. Returns cos, sin `[batch, seq, dim]` for Qwen3's
    attention, which rotates q and k with them as 1-D RoPE does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = positions[..., None].float() * inv_freq  # [3, batch, seq, dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)

    def sections(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([part[i % 3] for i, part in enumerate(table.split(list(section) * 2, dim=-1))], dim=-1)

    return sections(emb.cos()), sections(emb.sin())


def causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive causal mask from the 2-D padding mask (LB:471-485), `[batch, 1, seq, seq]`."""
    length = mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class Perceiver(torch.nn.Module):
    """`LLaVABaselineModelForConditionalGeneration` (LB:542-585) as the DPA model runs it (FVT:433-450): the ViT of
    `vit_path`'s config with the merger MLP rebuilt to the LM width (LB:559-570), the Qwen3 layers of `llm_path`'s
    config (LB:549-551, attention LB:333-394), M-RoPE with theta and rotary size from the perceiver config itself
    (LB:552-553) and the sections from `vit_path`'s (LB:556-557). Its LM head is never used (sec. 2.2 step 3)."""

    def __init__(self, config: dict[str, Any], hub: Path, tensors: dict[str, torch.Tensor]):
        super().__init__()
        vit_folder, llm_folder = hub_folder(hub, config["vit_path"]), hub_folder(hub, config["llm_path"])
        vlm = tf.AutoConfig.from_pretrained(vit_folder)  # LB:548
        language = tf.AutoConfig.from_pretrained(llm_folder)  # LB:549
        language._attn_implementation = "eager"
        self.visual = Qwen2_5_VisionTransformerPretrainedModel(vlm.vision_config)
        merger = self.visual.merger
        if merger.mlp[2].out_features != language.hidden_size:  # LB:559-570: exact GELU, both Linears with bias
            width = merger.hidden_size
            merger.mlp = torch.nn.Sequential(
                torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, language.hidden_size)
            )
        self.embed_tokens = torch.nn.Embedding(language.vocab_size, language.hidden_size)
        self.layers = torch.nn.ModuleList(Qwen3DecoderLayer(language, i) for i in range(language.num_hidden_layers))
        self.norm = Qwen3RMSNorm(language.hidden_size, eps=language.rms_norm_eps)
        self.load_state_dict(
            {
                **{f"visual.{k}": v for k, v in under(tensors, "visual.").items()},
                **{k: v for k, v in under(tensors, "language_model.").items()},
            }
        )
        # The rotary: a Qwen2Config's fields (LLaVABaselineConfig, LB:518-535), with its defaults when absent
        # (tf457 configuration_qwen2.py: rope_theta 10000, hidden 4096, 32 heads); only the default rope type.
        rope = config.get("rope_scaling") or {}
        assert rope.get("rope_type", rope.get("type", "default")) == "default", rope
        head_dim = config.get("head_dim") or config.get("hidden_size", 4096) // config.get("num_attention_heads", 32)
        self.theta = float(config.get("rope_theta", 10000.0))
        self.rotary_dim = int(head_dim * config.get("partial_rotary_factor", 1.0))
        raw = read_json(vit_folder / "config.json")  # 4.57 reads `vlm.config.rope_scaling`; v5 configs nest it
        text = raw.get("text_config") or {}
        self.section = (raw.get("rope_scaling") or text.get("rope_scaling") or text["rope_parameters"])["mrope_section"]
        self.image_pad, self.merge = vlm.image_token_id, vlm.vision_config.spatial_merge_size
        self.eval()

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, pixel_values: torch.Tensor, grids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The last hidden state after the final norm (LB:508-509), `[batch, seq, d_p]`, and the positions used."""
        embeds = self.embed_tokens(ids)  # tf457 :1253-1254
        image = self.visual(pixel_values.to(self.visual.dtype), grid_thw=grids).pooler_output  # tf457 :1159-1173
        slots = ids == self.image_pad
        assert int(slots.sum()) == image.shape[0]  # tf457 :1201-1204
        embeds = embeds.masked_scatter(slots[..., None], image.to(embeds.dtype))  # tf457 :1256-1262
        positions = rope_index(ids, mask, grids, self.image_pad, self.merge)
        cos, sin = mrope_cos_sin(positions, self.theta, self.rotary_dim, self.section)
        attention = causal_mask(mask, embeds.dtype)
        hidden = embeds
        for layer in self.layers:  # LB:493-506
            hidden = layer(hidden, attention_mask=attention, position_embeddings=(cos.to(hidden), sin.to(hidden)))
        return {"hidden": self.norm(hidden), "positions": positions}


def load_thinker(config: tf.Qwen3Config, tensors: dict[str, torch.Tensor]) -> tf.Qwen3ForCausalLM:
    """The thinker: a stock `Qwen3ForCausalLM` (FVT:120-121). A tied config (Qwen3-4B) makes its head the input
    embedding whatever copies the file holds (tf457 `modeling_utils.py:3010-3021`); an untied one reads its head."""
    thinker = tf.Qwen3ForCausalLM(config)
    state = {f"model.{k}": v for k, v in under(tensors, "model.").items()}
    head = tensors.get("lm_head.weight")
    thinker.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"] if head is None else head})
    if config.tie_word_embeddings:
        thinker.lm_head.weight = thinker.model.embed_tokens.weight
    return thinker.eval()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`ForCausalLMLoss` (tf457 `loss/loss_utils.py:45-68`) as FVT:622-628 calls it: float32 logits, labels shifted
    left (one -100 appended), viewed with the top-level vocab size, token-mean cross-entropy ignoring -100
    (sec. 2.7)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    return F.cross_entropy(logits.float().reshape(-1, vocab_size), shifted.reshape(-1), ignore_index=IGNORE)


class OfficialDPA(torch.nn.Module):
    """`ForwardVisualTokensArchForCausalLM` (FVT:102-136, 396-640): perceiver, phi (`linear_align_dim`,
    Linear -> ReLU -> Linear with bias, FVT:128-136) and the thinker."""

    def __init__(
        self,
        perceiver: Perceiver,
        phi: dict[str, torch.Tensor],
        thinker: tf.Qwen3ForCausalLM,
        ids: Ids,
        vocab_size: int,
    ):
        super().__init__()
        self.perceiver, self.thinker, self.ids, self.vocab_size = perceiver, thinker, ids, vocab_size
        self.phi = torch.nn.Sequential(
            torch.nn.Linear(*phi["0.weight"].shape[::-1]),
            torch.nn.ReLU(),
            torch.nn.Linear(*phi["2.weight"].shape[::-1]),
        )
        self.phi.load_state_dict(phi)
        self.eval()

    @classmethod
    def from_official(cls, folder: Path, hub: Path, dtype: torch.dtype = torch.float32) -> OfficialDPA:
        """An official DPA checkpoint (format `forward_visual_tokens_llava_arch`, sec. 1.3): its tensors by their
        in-memory names, the thinker config from `thinker_name_or_path` (FVT:120)."""
        config = read_json(Path(folder) / "config.json")
        tensors = {k: v.to(dtype) for k, v in read_weights(folder).items()}
        perceiver = Perceiver(config["perceiver_config"], hub, under(tensors, "model.perceiver.model.vlm."))
        thinker_config = tf.Qwen3Config.from_pretrained(hub_folder(hub, config["thinker_name_or_path"]))
        thinker = load_thinker(thinker_config, under(tensors, "model.thinker."))
        ids = Ids.of(tf.AutoTokenizer.from_pretrained(hub_folder(hub, config["t_tokenizer_name_or_path"])))
        vocab = config.get("vocab_size", 151936)  # Qwen2Config's default (sec. 2.7: the top-level vocab size)
        return cls(perceiver.to(dtype), under(tensors, "model.linear_align_dim."), thinker.to(dtype), ids, vocab)

    @classmethod
    def from_parts(cls, baseline: Path, target: Path, phi: dict[str, torch.Tensor], hub: Path) -> OfficialDPA:
        """The DPA model of the paper's pair, as FVT wires its parts: the perceiver an official `llava_baseline`
        folder (sec. 1.2), the thinker a plain Qwen3ForCausalLM (FVT:120-121, 1-D positions) holding the language
        model of a `qwen_custom_vl_hw_new` folder (sec. 1.1: keys `model.*` as 4.5x saved them, or
        `model.language_model.*`; no `tie_word_embeddings` means tied, HW:273), and phi as given (a fresh phi has no
        official source). The repository has no builder of DPA-4B-init (sec. 6): this is the forward of these parts."""
        config = read_json(Path(baseline) / "config.json")
        perceiver = Perceiver(config, hub, under(read_weights(baseline), "model.vlm."))
        config = read_json(Path(target) / "config.json")
        dropped = ("model_type", "architectures", "_name_or_path", "auto_map", "rope_scaling")
        text = {k: v for k, v in config["text_config"].items() if k not in dropped}
        thinker_config = tf.Qwen3Config(**{**text, "tie_word_embeddings": config.get("tie_word_embeddings", True)})
        stored = read_weights(target)
        language = under(stored, "model.language_model.") or {
            k: v for k, v in under(stored, "model.").items() if not k.startswith("visual.")
        }
        head = {k: v for k, v in stored.items() if k == "lm_head.weight"}
        thinker = load_thinker(thinker_config, {**{f"model.{k}": v for k, v in language.items()}, **head})
        ids = Ids.of(tf.AutoTokenizer.from_pretrained(hub_folder(hub, "Qwen/Qwen3-4B")))  # QWT:510
        return cls(perceiver, phi, thinker, ids, thinker_config.vocab_size)

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FVT:396-519 and FVT:600-628. Returns the perceiver states at the feature rows (`states`), phi of them
        (`features`), the thinker's input embeddings (`inputs_embeds`), `logits` and `loss`."""
        ids, p_ids = batch["input_ids"], batch["input_ids_of_perceiver"]
        embeds = self.thinker.get_input_embeddings()(ids)  # FVT:399-400
        run = self.perceiver(
            p_ids, batch["attention_mask_of_perceiver"], batch["pixel_values"], batch["image_grid_thw"]
        )  # FVT:433-450
        hidden, rows = run["hidden"], []
        for row in range(p_ids.shape[0]):  # every start paired with its end, batch-major (FVT:409-430, 462-476)
            starts = (p_ids[row] == self.ids.vision_start).nonzero()[:, 0].tolist()
            ends = (p_ids[row] == self.ids.vision_end).nonzero()[:, 0].tolist()
            assert starts and len(starts) == len(ends)  # FVT:423-425
            rows += [hidden[row, start : end + 1] for start, end in zip(starts, ends)]  # inclusive: N + 2 rows
        states = torch.cat(rows)  # FVT:479
        features = self.phi(states)  # FVT:480, before the dtype cast
        slots = (ids == self.ids.vision_start) | (ids == self.ids.vision_end) | (ids == self.ids.image_pad)
        assert int(slots.sum()) == features.shape[0]  # FVT:483-493
        embeds = embeds.masked_scatter(slots[..., None], features.to(embeds))  # FVT:495-503
        # position_ids are None in training (ms-swift drops the collator's, TB:1348-1364), so Qwen3 counts 0..L-1.
        logits = self.thinker(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits  # FVT:507-519
        loss = causal_lm_loss(logits, batch["labels"], self.vocab_size)  # FVT:622-628
        return {
            "states": states,
            "features": features,
            "inputs_embeds": embeds,
            "logits": logits,
            "loss": loss,
            "perceiver_positions": run["positions"],
        }
