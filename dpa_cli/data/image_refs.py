"""Every image reference a dataset may hold, turned into an `ImageRef` by one set of rules, and judged in one place.

Data writes images in many ways: a path or a list of paths, datasets cells (`{"bytes", "path"}`), OpenAI /
transformers blocks (`{"type": "image_url", "image_url": {"url"}}`), URLs, `data:` URIs, videos, or junk.
`image_refs` takes any of them and never raises: a value dpa cannot use becomes an `ImageRef` carrying its
problem, so a sample keeps its image count and every consumer reports the problem by kind. `check_ref` is the
gate every reader passes (data check, train, eval, analyze, generate, chat): a path is judged from its text,
kept under the image root after symlinks, and located with `stat` alone, so nothing outside the root is opened.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

MAX_PATH_BYTES = 4096  # Linux PATH_MAX: a longer "path" is no file name (the OS would say "File name too long")
MAX_NAME_BYTES = 255  # NAME_MAX: one file or folder name
MAX_EMBEDDED_BYTES = 64 << 20  # a data: URI's decoded size; far above any image a perceiver reads
VIDEO_SUFFIXES = frozenset(".mp4 .m4v .mov .avi .mkv .webm .flv .wmv .mpg .mpeg .3gp .ogv .mts .m2ts .vob .y4m".split())
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://")  # a scheme of 2+ letters: `C://` is a drive, not a URL
_WINDOWS_ABSOLUTE = re.compile(r"[A-Za-z]:[\\/]|[\\/]{2}|\\")  # C:\x, C:/x, \\server\share, \x
_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]+={0,2}")
_SEPARATORS = re.compile(r"[\\/]")
_URLSAFE = str.maketrans("-_", "+/")
_DEPTH = 3  # {"type": "image_url", "image_url": {"url": ...}} is two levels; deeper is junk
URL_FIX = "dpa never downloads: download it first, save it under --image-root and give its relative path"
VIDEO_FIX = "dpa reads still images: extract frames (e.g. `ffmpeg -i VIDEO -vf fps=1 f%04d.png`) and list them"


VIDEO_BLOCKS = ("video", "video_url")  # transformers / OpenAI content blocks that hold a video


class ImageError(Exception):
    """An image that cannot be used: `kind` is a problem kind of `dpa data check`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def shorten(text: str) -> str:
    """A reference as a one-line message shows it: whole when printable and of a path's length, else escaped
    (control characters visible), and beyond that its start and end with its length."""
    if len(text) <= 300:
        return text if text.isprintable() else repr(text)
    return f"{text[:40]!r}...{text[-20:]!r} ({len(text):,} characters)"


@dataclass(frozen=True)
class ImageRef:
    """Where a sample's image comes from; nothing is read until it is loaded or probed (dpa_cli.data.images).

    `path` is the path as the data writes it; with `root` set it must stay inside `root` (a reference from
    data always has one; `root=None` is a path the user typed on the command line, e.g. `dpa generate -i`).
    `data` holds embedded bytes (then `path` is only a name to show), `image` an already decoded image, and
    `problem` the (kind, message) of a value that cannot be an image at all.
    """

    path: str | None = None
    root: Path | None = None
    data: bytes | None = None
    image: Any = None
    problem: tuple[str, str] | None = None

    def describe(self) -> str:
        if self.path:
            return shorten(self.path)
        return "embedded image" if self.data is not None or self.image is not None else "no image"


def _bad(kind: str, message: str) -> ImageRef:
    return ImageRef(problem=(kind, message))


def image_refs(value: Any, root: Path | None) -> list[ImageRef]:
    """A sample's `image` / `images` value as references, in order: one per entry (None entries are no image)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [image_ref(item, root) for item in items if item is not None]


def image_ref(item: Any, root: Path | None, depth: int = 0) -> ImageRef:
    """One entry: a path / URL / data: URI string, bytes, a dict (datasets cell or chat block), a decoded image."""
    if isinstance(item, str):
        return _from_text(item, root)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return ImageRef(data=bytes(item))
    if isinstance(item, dict):
        return _from_dict(item, root, depth)
    if hasattr(item, "size") and hasattr(item, "mode"):  # a decoded PIL image
        return ImageRef(image=item)
    if isinstance(item, (list, tuple)):
        return _bad("bad_image_ref", f"a nested list ({shorten(str(item))}), not an image path")
    if isinstance(item, (bool, int, float)):
        return _bad("bad_image_ref", f"a number ({item!r}), not an image path")
    return _bad("bad_image_ref", f"a {type(item).__name__}, not an image path")


def _from_dict(item: dict, root: Path | None, depth: int) -> ImageRef:
    keys = ", ".join(sorted(map(str, item))) or "no keys"
    if item.get("type") in VIDEO_BLOCKS or item.get("video") is not None or item.get("video_url") is not None:
        return _bad("unsupported_image", f"a video block ({keys}): {VIDEO_FIX}")
    if depth >= _DEPTH:
        return _bad("bad_image_ref", f"an image object nested {depth + 1} levels deep ({keys})")
    data = item.get("bytes")
    if data is not None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return _bad(
                "bad_image_ref",
                f"`bytes` holds a {type(data).__name__}, not bytes "
                "(in JSON, embed an image as a data:image/...;base64, URI)",
            )
        name = item.get("path")
        return ImageRef(path=name if isinstance(name, str) else None, data=bytes(data))
    # A datasets cell without bytes, or a chat block: its path / URL is judged like any other (not trusted as is).
    for key in ("path", "url", "image_url", "image"):
        if item.get(key) is not None:
            return image_ref(item[key], root, depth + 1)
    return _bad("bad_image_ref", f"an object ({keys}) without a `path`, `bytes`, `url` or `image` value")


def _from_text(text: str, root: Path | None) -> ImageRef:
    if text[:5].lower() == "data:":
        return _from_data_uri(text)
    return ImageRef(path=text, root=root)


def _from_data_uri(text: str) -> ImageRef:
    """`data:image/png;base64,...` decoded to embedded bytes (its length checked before decoding)."""
    head, comma, payload = text.partition(",")
    media, *params = head[5:].split(";")
    name = f"data:{shorten(media) or '(no type)'} URI ({len(text):,} characters)"
    if not comma:
        return _bad("bad_image_ref", f"{name}: no `,` before its data")
    if not media.strip().lower().startswith("image/"):
        return _bad("unsupported_image", f"{name}: not an image (dpa reads data:image/...;base64, URIs)")
    if "base64" not in (p.strip().lower() for p in params):
        return _bad("bad_image_ref", f"{name}: not base64 (write data:{media};base64,...)")
    if len(payload) // 4 * 3 > MAX_EMBEDDED_BYTES:
        return _bad("image_too_large", f"{name}: over {MAX_EMBEDDED_BYTES >> 20} MiB of embedded data")
    payload = "".join(payload.split()).translate(_URLSAFE).rstrip("=")  # MIME line breaks, URL-safe alphabet
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        return _bad("bad_image_ref", f"{name}: not valid base64")
    return ImageRef(path=name, data=data)


def _looks_base64(text: str) -> bool:
    """Base64 image data given where a path belongs: base64 text that decodes to an image format's magic bytes."""
    if len(text) < 16 or not _BASE64.fullmatch(text[:4096]):
        return False
    try:
        return base64.b64decode(text[:16], validate=True).startswith(IMAGE_MAGIC)
    except (binascii.Error, ValueError):
        return False


def url_scheme(text: str) -> str | None:
    """The scheme of a URL (`https`, `s3`, `hf`), None for anything else (`C://x` is a Windows drive)."""
    match = _URL.match(text)
    return match.group(1) if match else None


def path_problem(path: str, confined: bool) -> tuple[str, str] | None:
    """What is wrong with a path from its text alone (no file system call): (kind, message), or None.

    `confined`: the path comes from data and must stay under the image root.
    """
    shown = shorten(path)
    if not path.strip():
        return "bad_image_ref", "an empty image path"
    if _looks_base64(path):
        return "bad_image_ref", f"{shown}: base64 text, not a path (write it as data:image/png;base64,...)"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "bad_image_ref", f"{shown}: the path holds a control character"
    size = len(path.encode("utf-8", "surrogatepass"))
    longest = max(len(part.encode("utf-8", "surrogatepass")) for part in _SEPARATORS.split(path))
    if size > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        return "bad_image_ref", (
            f"{shown}: too long for a path ({size:,} bytes; a name may have "
            f"{MAX_NAME_BYTES}, a path {MAX_PATH_BYTES:,})"
        )
    if path[:5].lower() == "file:":
        if confined:
            return "unsafe_image_path", f"{shown}: a file: URI (paths are relative to the image root)"
        return "unsupported_image", f"{shown}: a file: URI; pass the file's path instead"
    scheme = url_scheme(path)
    if scheme:
        fix = (
            URL_FIX
            if confined
            else "dpa never downloads: download it first (e.g. `curl -o image.png URL`) and pass the file's path"
        )
        return "unsupported_image", f"{shown}: a URL ({scheme}://); {fix}"
    suffix = os.path.splitext(path)[1].lower()
    if suffix in VIDEO_SUFFIXES:
        return "unsupported_image", f"{shown}: a video ({suffix}); {VIDEO_FIX}"
    return _escape(path, shown) if confined else None


def _escape(path: str, shown: str) -> tuple[str, str] | None:
    """A data path that would leave its root: absolute (POSIX, `~`, Windows), or `..`, also percent-encoded."""
    for text in dict.fromkeys((path, unquote(path))):  # `%2e%2e/` is `../` to anything that decodes it
        encoded = " (percent-encoded)" if text != path else ""
        if os.path.isabs(text) or text.startswith("~") or _WINDOWS_ABSOLUTE.match(text):
            return "unsafe_image_path", f"{shown}: absolute path{encoded} (paths are relative to the image root)"
        if ".." in _SEPARATORS.split(text):
            return "unsafe_image_path", f"{shown}: leaves the image root via ..{encoded}"
    return None


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _confined(ref: ImageRef) -> str:
    """The path under the root, refused when the file or any folder on the way is a symlink (never followed)."""
    expected = os.path.join(_real_folder(str(ref.root)), os.path.normpath(ref.path or ""))
    # The folder part resolves once per folder (cached); the file itself is checked on every call.
    if _real_folder(os.path.dirname(expected)) != os.path.dirname(expected) or os.path.islink(expected):
        raise ImageError(
            "unsafe_image_path", f"{ref.describe()}: goes through a symlink (images must be files under the root)"
        )
    return expected


def image_file(ref: ImageRef) -> str:
    """The regular, non-empty file a path reference names, judged and located with `stat` only (nothing opened)."""
    problem = path_problem(ref.path or "", confined=ref.root is not None)
    if problem:
        raise ImageError(*problem)
    path, name = (_confined(ref), ref.describe()) if ref.root is not None else (ref.path or "", ref.describe())
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        where = f"{name}: no such file under {ref.root}" if ref.root is not None else f"no such image: {name}"
        raise ImageError("missing_image", where) from None
    except OSError as err:  # permission, a symlink loop, ...
        raise ImageError("unreadable_image", f"{name}: cannot be read ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError("unreadable_image", f"{name}: a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
        raise ImageError("unreadable_image", f"{name}: not a regular file")
    if info.st_size == 0:
        raise ImageError("unreadable_image", f"{name}: the file is empty (0 bytes)")
    return path


def check_ref(ref: ImageRef) -> str | None:
    """The gate before any image is read: raises `ImageError` for a reference dpa cannot use; returns the file's
    path for a path reference, None for embedded bytes or a decoded image."""
    if ref.problem is not None:
        raise ImageError(*ref.problem)
    if ref.data is not None or ref.image is not None:
        return None
    return image_file(ref)
