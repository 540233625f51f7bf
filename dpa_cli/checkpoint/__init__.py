"""Checkpoint I/O: header-only inspection, lazy one-shard-at-a-time reads, sharded writes, atomic commits."""

from dpa_cli.checkpoint.reader import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointIndex,
    FileSlice,
    LazyTensorReader,
    ShardInfo,
    TensorInfo,
    find_truncated_files,
    read_checkpoint_index,
    read_safetensors_header,
    read_shard,
    sha256_file,
    verify_data_size,
)

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointIndex",
    "FileSlice",
    "LazyTensorReader",
    "ShardInfo",
    "TensorInfo",
    "find_truncated_files",
    "read_checkpoint_index",
    "read_safetensors_header",
    "read_shard",
    "sha256_file",
    "verify_data_size",
]
