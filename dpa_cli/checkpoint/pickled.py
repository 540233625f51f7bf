"""Pickled weights (`pytorch_model*.bin`), read only for the formats that ship nothing else.

The DPA paper's official checkpoints are saved with `--save_safetensors false` (official
`ms-swift/scripts/PT_DPA_4node.sh:60`), so their families declare `pickled_weights`; every other checkpoint's
pickles are refused unread. torch's weights-only unpickler builds tensors and plain containers only: a pickle
that carries code is an error here, never run. Files are memory-mapped (the zip format torch has written since
1.6), so indexing reads no tensor data and a copy reads one tensor at a time.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from dpa_cli.checkpoint.reader import CheckpointIndex, ShardInfo, TensorInfo, torch_dtypes
from dpa_cli.errors import CheckpointError
from dpa_cli.jsonio import PARSE_ERRORS, parse_json, reason

if TYPE_CHECKING:
    import torch

PICKLED_SINGLE = "pytorch_model.bin"
PICKLED_INDEX = "pytorch_model.bin.index.json"


def pickled_files(folder: Path) -> list[Path]:
    """`pytorch_model.bin`, else the shards its index names, else every `pytorch_model*.bin`."""
    if (folder / PICKLED_SINGLE).is_file():
        return [folder / PICKLED_SINGLE]
    index = folder / PICKLED_INDEX
    if index.is_file():
        try:
            parsed = parse_json(index.read_bytes())
        except PARSE_ERRORS as err:
            raise CheckpointError(f"{index}: {reason(err)}") from None
        weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f'{index}: no "weight_map" from tensor names to shard files')
        names = sorted(set(weight_map.values()))
        if any(Path(name).is_absolute() or ".." in Path(name).parts for name in names):
            raise CheckpointError(f"{index}: a shard lies outside the checkpoint folder")
        return [folder / name for name in names]
    return sorted(folder.glob("pytorch_model*.bin"))


def load_pickled(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one pickled file, memory-mapped; anything but a flat {name: tensor} dict is refused."""
    import torch

    hint = "re-save it with a recent torch (torch.save of the state dict), or as safetensors"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({err.strerror or err})", hint="check the path") from None
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a weights-only torch file ({first[:200]})", hint=hint) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: holds something other than a {{name: tensor}} state dict", hint=hint)
    return state


def pickled_index(folder: Path, files: list[Path]) -> CheckpointIndex:
    """The tensors of pickled files, memory-mapped to read names, shapes and dtypes (no tensor data)."""
    names = {dtype: name for name, dtype in torch_dtypes().items()}
    shards: dict[Path, ShardInfo] = {}
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: weight file is missing", hint="download the missing file again")
        for name, tensor in load_pickled(path).items():
            if tensor.dtype not in names:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which dpa cannot copy")
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is also stored in {tensors[name].file.name}")
            nbytes = tensor.numel() * tensor.element_size()
            tensors[name] = TensorInfo(name, names[tensor.dtype], tuple(tensor.shape), path, (0, nbytes))
        size = path.stat().st_size
        shards[path] = ShardInfo(path, 0, size, size, {}, pickled=True)
    return CheckpointIndex(folder, tensors, shards, {})
