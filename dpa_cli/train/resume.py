"""Before `--resume`: is the checkpoint whole, and was it written by a run of this model? And after a failure:
was it the disk?

A checkpoint that a crash, a copy or a hand left damaged (a truncated optimizer state, a garbled
trainer_state.json, weights of another model) is refused by name before anything is loaded from it, instead of
failing deep inside the trainer or, worse, loading half of it: transformers loads checkpoint weights with
`strict=False`, so weights of another model would be skipped with a log line.
"""

from __future__ import annotations

import errno
import json
import re
import zipfile
from pathlib import Path
from typing import Any

from dpa_cli.errors import BadInputError, DpaError

TRAINER_STATE = "trainer_state.json"
# The trainer's own pickles, loaded with weights_only=True on resume; `training_args.bin` is never read back.
TRAINER_PICKLES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
# PEFT / transformers wrappers that rename a module without changing what it holds.
_WRAPPERS = re.compile(r"\.(default|modules_to_save|original_module|base_layer)(?=\.)")
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# How Rust (safetensors) and C++ (torch.save) writers word a full disk or a file size limit.
_DISK_WORDS = ("No space left on device", "Disk quota exceeded", "File too large", "file write failed")


def _refuse(checkpoint: Path, what: str) -> BadInputError:
    return BadInputError(
        f"cannot resume from {checkpoint}: {what}",
        hint=f"delete {checkpoint.name} to resume from the checkpoint before it, or start over with --restart",
    )


def _plain(name: str) -> str:
    return _WRAPPERS.sub("", name.removeprefix("base_model.model."))


def _model_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer by its plain name (PEFT wrappers removed), with its full shape (ZeRO-3 too)."""
    shapes = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        shape = getattr(tensor, "ds_shape", None) or tensor.shape  # ZeRO-3 keeps the full shape aside
        shapes[_plain(name)] = tuple(shape)
    return shapes


def _check_state(checkpoint: Path) -> None:
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _refuse(checkpoint, f"it has no {TRAINER_STATE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _refuse(checkpoint, f"{TRAINER_STATE} is not readable JSON ({err})") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _refuse(checkpoint, f"{TRAINER_STATE} has no step count (global_step: {step!r})")


def _check_files(checkpoint: Path) -> None:
    """Every safetensors file of the checkpoint whole (header, offsets, size)."""
    from dpa_cli.checkpoint.reader import read_shard, verify_data_size
    from dpa_cli.errors import CheckpointError

    files = sorted(p for p in checkpoint.glob("*.safetensors") if p.is_file())
    if not files and not any(checkpoint.glob("global_step*")):
        raise _refuse(checkpoint, "it holds no weights (no *.safetensors, no DeepSpeed global_step folder)")
    for file in files:
        try:
            verify_data_size(read_shard(file)[0])
        except CheckpointError as err:
            raise _refuse(checkpoint, f"{file.name}: {err.message.removeprefix(f'{file}: ')}") from None


def check_checkpoint_weights(checkpoint: Path, model: Any) -> None:
    """Each tensor of the checkpoint is a tensor of the model being trained, of its shape: not another model's."""
    from dpa_cli.checkpoint.reader import read_safetensors_header

    shapes = _model_shapes(model)
    for file in sorted(p for p in Path(checkpoint).glob("*.safetensors") if p.is_file()):
        for name, info in read_safetensors_header(file)[0].items():
            shape = shapes.get(_plain(name))
            if shape is None:
                raise _refuse(
                    checkpoint,
                    f"{file.name} holds {name!r}, which the model being trained does not "
                    "have: it comes from another model or run",
                )
            if shape != tuple(info.shape):
                raise _refuse(
                    checkpoint,
                    f"{file.name} holds {name!r} of shape {list(info.shape)}, but the model "
                    f"being trained has {list(shape)}: it comes from another model",
                )


def _check_pickles(checkpoint: Path) -> None:
    """The trainer's optimizer / scheduler / RNG files load as the trainer will load them (weights only,
    memory-mapped: nothing is read into memory); DeepSpeed's shards must at least be whole archives."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    deepspeed = any(checkpoint.glob("global_step*"))  # DeepSpeed keeps the optimizer state in its own folder
    needed = [name for name in ("optimizer.pt", "scheduler.pt") if not deepspeed and not (checkpoint / name).is_file()]
    if not any(checkpoint.glob("rng_state*.pth")):
        needed.append("rng_state.pth")
    if needed:  # the trainer would go on without them, and the run would no longer be the one it continues
        raise _refuse(checkpoint, f"it has no {' or '.join(needed)}, so the run cannot continue exactly")
    for path in sorted(checkpoint.iterdir()):
        if path.name in TRAINER_PICKLES or re.fullmatch(r"rng_state(_\d+)?\.pth", path.name):
            try:
                with safe_globals():
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises many kinds for a damaged file; all mean the same here
                raise _refuse(checkpoint, f"{path.name} is damaged ({_first_line(err)})") from None
    for path in sorted(checkpoint.glob("global_step*/*.pt")):
        try:
            zipfile.ZipFile(path).close()  # reads the central directory: a truncated file has none
        except (zipfile.BadZipFile, OSError) as err:
            raise _refuse(checkpoint, f"{path.relative_to(checkpoint)} is damaged ({err})") from None


def _first_line(err: BaseException) -> str:
    """The first sentence of an error's text: torch's messages go on for a paragraph."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse (exit 2, naming the file) a checkpoint the trainer could not resume from: before any model loads."""
    checkpoint = Path(checkpoint)
    _check_state(checkpoint)
    _check_files(checkpoint)
    _check_pickles(checkpoint)


def disk_failure(error: BaseException, hint: str) -> DpaError | None:
    """A full disk (or quota, or file size limit) met while writing, however the writer wrapped it: the one-line
    failure to show, or None when `error` is something else."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            where = f" ({current.filename})" if current.filename else ""
            return DpaError(f"cannot write: {current.strerror}{where}", hint=hint)
        text = str(current)
        if any(words in text for words in _DISK_WORDS):
            return DpaError(f"cannot write the run's files: {_first_line(current)}", hint=hint)
        current = current.__cause__ or current.__context__
    return None
