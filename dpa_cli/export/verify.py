"""Verification: the export, reloaded by plain transformers in a fresh process, gives the trained model's logits.

The reference is the model as training ran it (base weights, LoRA adapter unmerged), in float32 on CPU, on
the fixed probe of `probe_check`; it is computed first, so a stage that does not load fails before anything
is written. The export is then loaded in float32 in a child process that never imports dpa_cli, the probe
rebuilt with the export's own processor; inputs must match exactly and logits within the tolerance of the
export's dtype. The two models are loaded one after the other, never together.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from dpa_cli.checkpoint import read_checkpoint_index
from dpa_cli.checkpoint.reader import torch_dtype
from dpa_cli.describe import read_config
from dpa_cli.errors import DpaError
from dpa_cli.export import probe_check
from dpa_cli.loading import load_as_trained, load_processor, may_run_code
from dpa_cli.workspace.results import StageResult

FP32_TOLERANCE = 1e-4
# Storing weights in 16 bits rounds each by at most u of its size (the unit roundoff: 2**-8 in bf16,
# 2**-11 in fp16), and the logits move by a fraction of their size that grows with depth:
# 2 * sqrt(layers) * u, measured on random Qwen3 models of 2 to 36 layers (docs/export.md). A 16-bit
# export is held to four times that.
UNIT = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
MARGIN = 8
FAILED = "nothing was written; please report this with the output of `dpa export --no-verify --json`"


def tolerance(folder: Path, reference_max_abs: float) -> float:
    """The bound for `folder`'s weights: 1e-4 in float32; 8 * sqrt(layers) * u * max |logit| in 16 bits."""
    dtypes = {torch_dtype(info.dtype) for info in read_checkpoint_index(folder).tensors.values()}
    unit = max((UNIT.get(dtype, 0.0) for dtype in dtypes), default=0.0)
    config = read_config(Path(folder))
    layers = int((config.get("text_config") or {}).get("num_hidden_layers") or 1)
    return max(FP32_TOLERANCE, MARGIN * math.sqrt(layers) * unit * reference_max_abs)


def reference_probe(result: StageResult, path: Path, allow_code: bool = False) -> None:
    """Run the trained model on the probe in float32 and save the inputs and logits to `path`."""
    from safetensors.torch import save_file

    try:
        model = load_as_trained(result, dtype=torch.float32, allow_code=allow_code)
        inputs = probe_check.probe_inputs(load_processor(result.model_dir, allow_code))
        with torch.no_grad():
            logits = model(**inputs).logits
    except DpaError:
        raise
    except Exception as err:  # the trained model itself fails: say so in one line, write nothing
        first = (str(err).strip().splitlines() or [""])[0]
        what = f"{type(err).__name__}: {first}"
        raise DpaError(f"{result.model_dir}: the trained model fails on the probe ({what})") from err
    finally:
        model = None
        gc.collect()  # free the reference before the export is loaded in the child
    save_file({**{k: v.contiguous() for k, v in inputs.items()}, probe_check.LOGITS: logits.contiguous()}, path)


def run_check(folder: Path, probe: Path, adapter: Path | None, allow_code: bool = False) -> dict[str, Any]:
    """Run probe_check.py in a fresh interpreter, offline, from an empty folder: only transformers on its path.

    The remote code it loads is cached in that folder too, so the temporary export leaves no trace. The
    child runs the export's code only as dpa itself would (dpa_cli.loading's decision, passed in its
    environment): dpa's own code byte for byte, or anything with `allow_code` (--trust-remote-code).
    """
    work = probe.parent
    script = Path(shutil.copy(probe_check.__file__, work / "probe_check.py"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["HF_MODULES_CACHE"] = str(work / "modules")
    env[probe_check.TRUST_ENV] = "1" if may_run_code(folder, allow_code) else "0"
    command = [sys.executable, str(script), str(folder), str(probe), *([str(adapter)] if adapter else [])]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = errors[-1] if errors else f"exit code {done.returncode}"
        raise DpaError(f"plain transformers cannot load and run the export: {reason}", hint=FAILED)
    return json.loads(lines[-1])


def _judge(report: dict[str, Any], bound: float) -> None:
    if report["dpa_cli_imported"]:
        raise DpaError("the export imported dpa_cli when loaded: it is not self-contained", hint=FAILED)
    if report["load_problems"]:
        raise DpaError(f"the export loads with missing or unexpected weights: {report['load_problems']}", hint=FAILED)
    if report["mismatched_inputs"]:
        names = ", ".join(report["mismatched_inputs"])
        what = f"the export's processor builds different probe inputs ({names}) than the trained model's"
        raise DpaError(what, hint=FAILED)
    diff = report["max_abs_diff"]
    if not diff <= bound:  # also catches NaN
        raise DpaError(
            f"the export's logits differ from the trained model's by {diff:.3g} on the probe (tolerance {bound:.3g})",
            hint=FAILED,
        )


def check_export(folder: Path, probe: Path, adapter: Path | None = None, allow_code: bool = False) -> dict[str, Any]:
    """Compare `folder` (with `adapter` applied, for --keep-adapter) with the reference saved in `probe`.

    Raises when it is off; `probe`'s folder is the child's working folder and should hold nothing else.
    """
    report = run_check(folder, probe, adapter, allow_code)
    bound = tolerance(folder, report["reference_max_abs"])
    _judge(report, bound)
    return {"max_abs_diff": report["max_abs_diff"], "tolerance": bound, "verified": True}
