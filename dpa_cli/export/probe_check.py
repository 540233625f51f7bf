"""The fixed probe (one synthetic image and a prompt), and the check a fresh process runs on an export with it.

Run as a script, it loads the export with plain transformers (`AutoModelForImageTextToText` and
`AutoProcessor`; peft for an export that keeps its adapter), rebuilds the probe's inputs with the export's
own processor, compares them and the logits with the reference saved by dpa, and prints one JSON line. It
imports nothing from dpa_cli, as a user's machine has nothing of it either. It runs the export's model code
only when its parent says so (DPA_TRUST_REMOTE_CODE=1: dpa's trust gate found dpa's own code, or the user
passed --trust-remote-code); without it, nothing of the folder's code is imported.

    DPA_TRUST_REMOTE_CODE=1 python probe_check.py EXPORT_DIR PROBE.safetensors [ADAPTER_DIR]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from PIL import Image

PROBE_PROMPT = "Describe the image in one sentence."
LOGITS = "logits"
TRUST_ENV = "DPA_TRUST_REMOTE_CODE"


def trusted() -> bool:
    """The parent's decision: run the folder's model code only on an explicit "1"."""
    return os.environ.get(TRUST_ENV) == "1"


def probe_image(width: int = 64, height: int = 48) -> Image.Image:
    """A deterministic RGB pattern: no file, no randomness, the same pixels on every machine."""
    image = Image.new("RGB", (width, height))
    image.putdata([(5 * x % 256, 9 * y % 256, (3 * x + 7 * y) % 256) for y in range(height) for x in range(width)])
    return image


def probe_inputs(processor) -> dict[str, torch.Tensor]:
    """The probe as model inputs, through the processor's chat template when it has one."""
    if processor.chat_template:
        content = [{"type": "image", "image": probe_image()}, {"type": "text", "text": PROBE_PROMPT}]
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    else:  # a base model without a chat template: the bare image marker and the prompt
        fusion = {"perceiver_text": PROBE_PROMPT} if getattr(processor, "early_fusion", False) else {}
        text = f"{processor.image_token}\n{PROBE_PROMPT}"
        inputs = processor(images=[probe_image()], text=[text], return_tensors="pt", **fusion)
    return {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor)}


def _load(folder: str, adapter: str | None):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=trusted(), dtype=torch.float32, output_loading_info=True
    )
    problems = sorted(info["missing_keys"])[:3] + sorted(info["unexpected_keys"])[:3]
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), problems


def check(folder: str, probe: str, adapter: str | None = None) -> dict:
    """Reload `folder` as a user would and compare its inputs and logits on the probe with the saved ones."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    saved = load_file(probe)
    inputs = probe_inputs(AutoProcessor.from_pretrained(folder, trust_remote_code=trusted()))
    mismatched = sorted(
        name
        for name in set(inputs) | (set(saved) - {LOGITS})
        if name not in inputs or name not in saved or not torch.equal(inputs[name], saved[name])
    )
    model, problems = _load(folder, adapter)
    with torch.no_grad():
        logits = model(**inputs).logits
    reference = saved[LOGITS]
    same_shape = logits.shape == reference.shape
    return {
        "max_abs_diff": float((logits - reference).abs().max()) if same_shape else float("inf"),
        "reference_max_abs": float(reference.abs().max()),
        "logits_shape": list(logits.shape),
        "mismatched_inputs": mismatched,
        "load_problems": problems,
        "dpa_cli_imported": any(name.split(".")[0] == "dpa_cli" for name in sys.modules),
        "offline": os.environ.get("HF_HUB_OFFLINE") == "1",
    }


if __name__ == "__main__":
    folder_arg, probe_arg, *adapter_arg = sys.argv[1:]
    print(json.dumps(check(folder_arg, probe_arg, adapter_arg[0] if adapter_arg else None)))
