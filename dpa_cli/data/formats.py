"""Opening training data: LLaVA JSON / JSONL files and Hugging Face datasets (folders, parquet, arrow).

`open_samples` returns a `SampleSource`: iterable over `Sample`s and, unless streaming, sized and indexable.
Nothing is decoded at load: JSONL lines are parsed when a sample is read, dataset images stay bytes until an
encoder loads them. A file that cannot be data (not UTF-8, an object instead of a list, empty) is a
`BadInputError` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from dpa_cli.data.image_refs import url_scheme
from dpa_cli.data.samples import Sample, from_chat, from_llava
from dpa_cli.errors import BadInputError
from dpa_cli.jsonio import DECODER, PARSE_ERRORS, parse_json, reason

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATASET_SUFFIXES = (".parquet", ".arrow")


class SampleSource(Protocol):
    """Samples of one dataset. Map-style sources (not streaming) also have `__len__` and `__getitem__`."""

    path: Path
    streaming: bool

    def __iter__(self) -> Iterator[Sample]: ...


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadInputError(
            f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start})",
            hint=f"re-encode it, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.json`",
        ) from None


def _json_error(path: Path, err: Exception) -> BadInputError:
    return BadInputError(f"{path}: {reason(err)}")


class ListSource:
    """A JSON list of LLaVA records held in memory (as LLaVA's own loader holds it)."""

    streaming = False

    def __init__(self, path: Path, records: list, root: Path | None):
        self.path, self.records, self.root = path, records, root

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return from_llava(self.records[index], index, self.root)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))


def _line_offsets(path: Path) -> array:
    """Byte offsets of the non-blank lines of a JSONL file (memory: 8 bytes per sample)."""
    offsets, position = array("q"), 0
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return offsets


class JsonlSource:
    """A JSONL file, indexed by line offsets; a line is parsed only when its sample is read."""

    streaming = False

    def __init__(self, path: Path, root: Path | None):
        self.path, self.root = path, root
        self.offsets = _line_offsets(path)
        self._fd: tuple[int, int] | None = None  # (pid, fd): worker processes open their own

    def __len__(self) -> int:
        return len(self.offsets)

    def _line(self, index: int) -> bytes:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        start = self.offsets[index]
        chunk, size = b"", 1 << 12
        while b"\n" not in chunk:  # pread: no shared file position between DataLoader workers
            more = os.pread(self._fd[1], size, start + len(chunk))
            if not more:
                break
            chunk += more
            size *= 2
        return chunk.split(b"\n", 1)[0]

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += len(self)
        return _jsonl_sample(self._line(index), index, self.root)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}


def _jsonl_sample(line: bytes, index: int, root: Path | None) -> Sample:
    try:
        record = parse_json(line.decode("utf-8-sig"))  # a BOM (Windows editors write one) is not a bad first line
    except UnicodeDecodeError:
        return Sample(f"#{index}", [], [], index, [("bad_record", f"line {index + 1} is not UTF-8")])
    except PARSE_ERRORS as err:
        return Sample(f"#{index}", [], [], index, [("bad_record", f"line {index + 1}: {reason(err)}")])
    return from_llava(record, index, root)


class StreamingJsonSource:
    """A JSON list or JSONL file read incrementally: one record in memory at a time."""

    streaming = True

    def __init__(self, path: Path, root: Path | None, lines: bool):
        self.path, self.root, self.lines = path, root, lines

    def __iter__(self) -> Iterator[Sample]:
        if self.lines:
            with open(self.path, "rb") as handle:
                index = 0
                for line in handle:
                    if line.strip():
                        yield _jsonl_sample(line, index, self.root)
                        index += 1
            return
        for index, record in enumerate(_iter_json_list(self.path)):
            yield from_llava(record, index, self.root)


def _iter_json_list(path: Path, chunk_size: int = 1 << 20) -> Iterator[Any]:
    """The elements of a top-level JSON list, parsed one by one from chunks of the file."""
    decoder = DECODER
    with open(path, encoding="utf-8-sig") as handle:
        buffer, position, started = "", 0, False
        while True:
            while position < len(buffer) and (buffer[position].isspace() or (started and buffer[position] == ",")):
                position += 1
            if position < len(buffer) and not started:
                if buffer[position] != "[":
                    raise BadInputError(f"{path}: the top level is not a JSON list of samples")
                started, position = True, position + 1
                continue
            if position < len(buffer) and buffer[position] == "]":
                return
            try:
                record, end = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError as err:
                more = handle.read(chunk_size)
                if not more:
                    raise _json_error(path, err) from None
                buffer, position = buffer[position:] + more, 0
                continue
            except PARSE_ERRORS as err:  # nested too deeply, NaN, a number Python will not convert
                raise _json_error(path, err) from None
            after = end
            while after < len(buffer) and buffer[after].isspace():
                after += 1
            if after == len(buffer) or buffer[after] not in ",]":  # "3." of "3.5": the value may go on
                more = handle.read(chunk_size)
                if more:
                    buffer, position = buffer[position:] + more, 0
                    continue
                raise BadInputError(f"{path}: not valid JSON (the list is not closed with ])")
            yield record
            position = end


class DatasetSource:
    """A Hugging Face `datasets.Dataset` (map-style) or `IterableDataset` (streaming), images left undecoded."""

    def __init__(self, path: Path, dataset: Any, root: Path | None, streaming: bool):
        self.path, self.root, self.streaming = path, root, streaming
        # Arrow rows keep image cells as {"bytes", "path"}: decoding waits for the encoder.
        self.dataset = dataset.decode(False) if streaming else dataset.with_format("arrow")

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streaming source has no length")
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += len(self)
        return from_chat(self.dataset[index].to_pylist()[0], index, self.root)

    def __iter__(self) -> Iterator[Sample]:
        if self.streaming:
            return (from_chat(row, i, self.root) for i, row in enumerate(self.dataset))
        return self._iter_batches()

    def _iter_batches(self) -> Iterator[Sample]:
        index = 0
        for table in self.dataset.iter(batch_size=512):
            for row in table.to_pylist():
                yield from_chat(row, index, self.root)
                index += 1


def _head(path: Path) -> str:
    """The start of the file as text, to tell the format (bad bytes are judged later: whole file or per line)."""
    with open(path, "rb") as handle:
        return handle.read(1 << 12).decode("utf-8-sig", errors="replace")


def _refuse_encoding(path: Path) -> None:
    """Name the encoding problem of a file whose start is not UTF-8 text."""
    import codecs

    with open(path, "rb") as handle:
        raw = handle.read(1 << 12)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        hint = f"re-encode it: iconv -f utf-16 -t utf-8 {path.name}"
        raise BadInputError(f"{path}: UTF-16 text, not UTF-8", hint=hint)
    try:
        codecs.getincrementaldecoder("utf-8-sig")().decode(raw, final=False)
    except UnicodeDecodeError:
        _decode(raw, path)


def _first_line_parses(path: Path) -> bool:
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                try:
                    parse_json(line.decode("utf-8-sig"))
                except PARSE_ERRORS:
                    return False
                return True
    return False


def _open_json(path: Path, root: Path | None, streaming: bool):
    if not path.is_file():  # a FIFO would read as empty here, then block the reader for ever
        raise BadInputError(f"{path}: not a regular file (a FIFO, socket or device)")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: the file is empty (0 bytes)")
    head = _head(path).lstrip()
    if not head:
        raise BadInputError(f"{path}: holds only whitespace, no samples")
    if head[0] not in "[{":
        _refuse_encoding(path)
        raise BadInputError(f"{path}: not LLaVA JSON (a list of samples) or JSONL (one sample object per line)")
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    if head[0] == "{" and not jsonl and not _first_line_parses(path):
        return ListSource(path, [_whole_object(path)], root)  # one pretty-printed sample (else refused)
    lines = jsonl or head[0] == "{"
    if streaming:
        return StreamingJsonSource(path, root, lines)
    if not lines:
        try:
            records = parse_json(_decode(path.read_bytes(), path), max_depth=None)  # C parser: bounded by recursion
        except PARSE_ERRORS as err:
            raise _json_error(path, err) from None
        return ListSource(path, records, root)
    source = JsonlSource(path, root)
    if len(source) == 1 and not jsonl:
        _whole_object(path)
    return source


def _whole_object(path: Path) -> dict:
    """A .json file holding one object: one sample is fine; anything else is refused, saying where the list may be."""
    try:
        value = parse_json(_decode(path.read_bytes(), path))
    except PARSE_ERRORS as err:
        raise _json_error(path, err) from None
    if "conversations" in value or "messages" in value:
        return value
    lists = [key for key, item in value.items() if isinstance(item, list)]
    hint = f"the samples may be the list under {lists[0]!r}: extract it with `jq '.{lists[0]}'`" if lists else None
    raise BadInputError(f"{path}: the top level is a JSON object; LLaVA data is a JSON list of samples", hint=hint)


def _load_dataset(path: Path, streaming: bool) -> Any:
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars would come before a refusal's one line
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to read ..." line, before ours
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), streaming=streaming)
        else:
            kind = path.suffix.lower().lstrip(".")
            loaded = datasets.load_dataset(kind, data_files=str(path), streaming=streaming)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001  any loader failure on the user's files (a dataset_info.json whose
        # features are not a mapping is a TypeError, a garbled parquet an ArrowInvalid): the folder is named
        said = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInputError(f"{path}: not a dataset datasets can load ({said})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if shown:
            datasets.enable_progress_bars()
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" not in loaded and len(loaded) != 1:
            raise BadInputError(f"{path}: several splits ({', '.join(loaded)}) and none is `train`")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    if streaming and isinstance(loaded, datasets.Dataset):  # saved with save_to_disk: stream it row by row
        loaded = loaded.to_iterable_dataset()
    return loaded


def _check_columns(path: Path, dataset: Any) -> None:
    names = list(dataset.column_names or dataset.features or [])
    if names and "messages" not in names and "conversations" not in names:
        raise BadInputError(
            f"{path}: no `messages` or `conversations` column (columns: {', '.join(names)})",
            hint="a chat dataset needs `messages` (transformers chat format) and an `images` or `image` column",
        )


def refuse_urls(data: str | Path, image_root: str | Path | None) -> None:
    """`--data` and `--image-root` are local: a URL is named (Path() would fold `https://` to `https:/` and the
    user would read "no such file"), with what to do instead."""
    for flag, value in (("--data", data), ("--image-root", image_root)):
        scheme = url_scheme(str(value)) if value is not None else None
        if scheme:
            raise BadInputError(
                f"{flag} {value}: a URL ({scheme}://); dpa never downloads",
                hint="download it first (e.g. `curl -LO URL`, `hf download --repo-type dataset REPO`) "
                "and pass the local file or folder",
            )


def open_samples(data: str | Path, image_root: str | Path | None = None, streaming: bool = False) -> SampleSource:
    """The samples of `data`: a LLaVA JSON / JSONL file, or a Hugging Face datasets folder / parquet / arrow file.

    Image paths in the data are relative to `image_root` (default: the data file's folder) and must stay in it.
    With `streaming`, samples are read one at a time (no length, no indexing).
    """
    refuse_urls(data, image_root)
    path = Path(data).expanduser()
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    if image_root is not None and not Path(image_root).expanduser().is_dir():
        raise BadInputError(f"--image-root {image_root}: not a folder")
    root = Path(image_root).expanduser() if image_root is not None else (path if path.is_dir() else path.parent)
    if path.is_dir() or path.suffix.lower() in DATASET_SUFFIXES:
        dataset = _load_dataset(path, streaming)
        _check_columns(path, dataset)
        source: Any = DatasetSource(path, dataset, root, streaming)
    else:
        source = _open_json(path, root, streaming)
    if not streaming and len(source) == 0:
        raise BadInputError(f"{path}: no samples")
    return source


def dataset_fingerprint(data: str | Path) -> str:
    """sha256 of the data: of the file, or for a folder of every file's relative path and sha256, in order."""
    path = Path(data).expanduser()
    if path.is_file():
        return _file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
