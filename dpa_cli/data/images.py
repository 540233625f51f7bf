"""Reading a sample's images safely: every reference passes `check_ref` first (kind, paths kept inside the
image root), decompression bombs are refused from the header before decoding, truncated files caught, and
unusual modes (CMYK, alpha, grayscale, 16-bit) converted to RGB and reported. `probe_image` reads only the
header (size and mode) for `dpa data check --fast`. Every reader of images (data check, train, eval, analyze,
generate, chat) comes through here.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from dpa_cli.data.image_refs import ImageError, ImageRef, check_ref
from dpa_cli.model.processing_dpa import capped_size  # the processor owns the training cap's size rule

__all__ = ["ImageError", "MAX_IMAGE_PIXELS", "cap_pixels", "capped_size", "load_image", "probe_image"]

# PIL's own decompression-bomb threshold (about 89.5 megapixels, a 0.25 GiB RGB image). Images above it are
# refused from their header, before any pixel is decoded; the perceivers resize far below it anyway.
MAX_IMAGE_PIXELS = 89_478_485

# Mode -> (warning kind, what is said). Modes not listed (RGB, and palette images without transparency)
# convert to RGB without loss, silently.
CONVERSIONS = {
    "CMYK": ("converted_cmyk", "CMYK image converted to RGB"),
    "RGBA": ("converted_alpha", "image with alpha composited on white"),
    "LA": ("converted_alpha", "image with alpha composited on white"),
    "PA": ("converted_alpha", "image with alpha composited on white"),
    "RGBa": ("converted_alpha", "image with alpha composited on white"),
    "La": ("converted_alpha", "image with alpha composited on white"),
    "L": ("converted_grayscale", "grayscale image converted to RGB"),
    "1": ("converted_grayscale", "1-bit image converted to RGB"),
    "I;16": ("converted_16bit", "16-bit image scaled to 8 bits"),
    "I;16B": ("converted_16bit", "16-bit image scaled to 8 bits"),
    "I;16L": ("converted_16bit", "16-bit image scaled to 8 bits"),
    "I": ("converted_16bit", "16/32-bit integer image scaled to 8 bits"),
    "F": ("converted_16bit", "floating-point image clipped to 8 bits"),
}


def _open(ref: ImageRef) -> Any:
    """The image opened lazily (header read, pixels not decoded), size checked against MAX_IMAGE_PIXELS."""
    from PIL import Image, UnidentifiedImageError

    path = check_ref(ref)  # the reference's kind and confinement: nothing is opened before this
    if ref.image is not None:
        image = ref.image
    else:
        name = ref.describe()
        handle: Any = io.BytesIO(ref.data) if path is None else path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(handle)
        except Image.DecompressionBombError:
            raise ImageError(
                "image_too_large", f"{name}: larger than {MAX_IMAGE_PIXELS:,} pixels (refused as a decompression bomb)"
            ) from None
        except UnidentifiedImageError:
            raise ImageError("unreadable_image", f"{name}: not a readable image (no format PIL knows)") from None
        except Exception as err:  # noqa: BLE001  PIL's header parsers raise many types on forged input
            raise ImageError("unreadable_image", f"{name}: not a readable image ({_reason(err)})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            "image_too_large",
            f"{ref.describe()}: {width}x{height} pixels, more than "
            f"{MAX_IMAGE_PIXELS:,} (refused as a decompression bomb)",
        )
    if width == 0 or height == 0:
        raise ImageError("unreadable_image", f"{ref.describe()}: the image is {width}x{height} pixels")
    return image


def _reason(err: Exception) -> str:
    """An exception in one line: its first line, or its type when it has no text."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _conversion(image: Any) -> tuple[str, str] | None:
    if image.mode == "P" and "transparency" in image.info:
        return CONVERSIONS["RGBA"]
    return CONVERSIONS.get(image.mode)


def probe_image(ref: ImageRef) -> tuple[tuple[int, int], list[tuple[str, str]]]:
    """(width, height) and the conversion warnings, from the header only (no pixel decoded)."""
    image = _open(ref)
    conversion = _conversion(image)
    warnings_ = [(conversion[0], f"{ref.describe()}: {conversion[1]}")] if conversion else []
    return image.size, warnings_


def _to_rgb(image: Any) -> Any:
    """RGB without surprises: alpha over white (not black), 16-bit scaled (not clipped), CMYK via PIL."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(ref: ImageRef) -> tuple[Any, list[tuple[str, str]]]:
    """The decoded RGB image and the conversion warnings; an `ImageError` names what is wrong."""
    from PIL import Image

    image = _open(ref)
    conversion = _conversion(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except OSError as err:
        kind = "truncated_image" if "truncated" in str(err) or "broken data" in str(err) else "unreadable_image"
        raise ImageError(
            kind, f"{ref.describe()}: {'truncated' if kind == 'truncated_image' else 'unreadable'} ({_reason(err)})"
        ) from None
    except Exception as err:  # noqa: BLE001  as in _open: a decoder fed forged data may raise anything
        raise ImageError("unreadable_image", f"{ref.describe()}: unreadable ({_reason(err)})") from None
    warnings_ = [(conversion[0], f"{ref.describe()}: {conversion[1]}")] if conversion else []
    return _to_rgb(image), warnings_


def cap_pixels(image: Any, max_pixels: int | None) -> Any:
    """The image resized to `capped_size` with bilinear filtering (torchvision's `Resize` on a PIL image, the
    official call, is PIL's bilinear resize); the image processor then snaps it to its patch grid."""
    from PIL import Image

    size = capped_size(image.size, max_pixels)
    return image if size == image.size else image.resize(size, Image.BILINEAR)
