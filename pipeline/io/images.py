"""Images: codec helpers, the size policy, and the decode stage.

Images travel between stages as PNG bytes (lossless); stages that compute on pixels decode to
uint8 RGB arrays with `png_to_array` and encode results with `array_to_png`.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pipeline.config import ImageConfig
from pipeline.io.sources import InputTooLarge, read_bytes
from pipeline.rows import Row, map_rows


class RejectedImage(ValueError):
    """An input that cannot become a sample; the message says why."""


def array_to_png(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {array.dtype}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def mask_to_size(data: bytes, width: int, height: int) -> bytes:
    """An inpaint mask (any image; white = repainted) as a 0/255 grayscale PNG of width x height (nearest)."""
    try:
        mask = Image.open(io.BytesIO(data)).convert("L").resize((width, height), Image.Resampling.NEAREST)
    except Exception as e:  # noqa: BLE001 - any undecodable mask is one rejected input
        raise RejectedImage(f"source mask: not a decodable image: {type(e).__name__}") from None
    return array_to_png(np.where(np.asarray(mask) > 127, 255, 0).astype(np.uint8))


def png_to_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def target_size(width: int, height: int, policy: ImageConfig) -> tuple[int, int]:
    """Scale so the short side is `resolution`, keep the aspect ratio, round sides to `multiple_of`."""
    scale = policy.resolution / min(width, height)
    m = policy.multiple_of
    return (max(m, round(width * scale / m) * m), max(m, round(height * scale / m) * m))


# file extension -> the Pillow format that may open it; nothing else is ever decoded (EPS would run
# Ghostscript, for one)
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}


def pillow_formats(extensions: list[str]) -> list[str]:
    """The Pillow formats of the configured extensions (those Pillow decodes)."""
    return sorted({FORMATS[e.lower().lstrip(".")] for e in extensions if e.lower().lstrip(".") in FORMATS})


def decode_image(data: bytes, policy: ImageConfig, formats: list[str] | None = None) -> tuple[np.ndarray, dict]:
    """Decode source bytes into an RGB uint8 array at the policy's size.

    Only the Pillow `formats` given are opened (default: every format of `FORMATS`). Returns the array
    and a record of the transform (original size and mode, EXIF rotation, new size). Raises
    RejectedImage with a readable reason for anything that cannot become a sample.
    """
    if not data:
        raise RejectedImage("empty file (0 bytes)")
    formats = formats or sorted(set(FORMATS.values()))
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # image.max_pixels replaces Pillow's own limit, checked on the header
            im = Image.open(io.BytesIO(data), formats=formats)
            width, height = im.size
            if width * height > policy.max_pixels:
                raise RejectedImage(f"{width}x{height} pixels is over image.max_pixels={policy.max_pixels}")
            im.load()
    except RejectedImage:
        raise
    except Image.DecompressionBombError as e:
        raise RejectedImage(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise RejectedImage(f"not a decodable image in an allowed format ({', '.join(formats)})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise RejectedImage(f"not a decodable image: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    mode = im.mode
    orientation = im.getexif().get(0x0112, 1)
    ignored = None
    if isinstance(orientation, int) and 1 <= orientation <= 8:
        im = ImageOps.exif_transpose(im)
    else:  # a tag of the wrong type or value (text, bytes, 0): a good photo with a bad tag, not a bad photo
        ignored, orientation = repr(orientation)[:80], 1
    if min(im.size) < policy.min_side:
        raise RejectedImage(f"{im.width}x{im.height} is smaller than image.min_side={policy.min_side}")
    if max(im.size) > policy.max_aspect_ratio * min(im.size):
        raise RejectedImage(f"{im.width}x{im.height} has an aspect ratio over image.max_aspect_ratio={policy.max_aspect_ratio:g}")
    im, value_range = _to_rgb(im)
    size = target_size(im.width, im.height, policy)
    if size != im.size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    transform = {
        "original_size": [width, height],
        "original_mode": mode,
        "exif_orientation": orientation,
        **({"exif_orientation_ignored": ignored} if ignored else {}),
        **({"value_range": value_range} if value_range else {}),
        "size": list(size),
        "resize": f"short side to {policy.resolution}, sides to multiples of {policy.multiple_of}, lanczos",
    }
    return np.asarray(im), transform


def _to_rgb(im: Image.Image) -> tuple[Image.Image, list[float] | None]:
    """Any mode to RGB; transparency is composited on white rather than dropped to black. Wide modes
    are scaled to 8 bits: 16-bit by their format's range (0-65535, or 0-255 when no value exceeds it),
    32-bit integer and float by the image's own range (returned, to be recorded)."""
    value_range = None
    if im.mode.startswith("I;16"):
        im = Image.fromarray(_scaled(im, 0, 65535 if im.getextrema()[1] > 255 else 255))
    elif im.mode in ("I", "F"):
        low, high = _finite_range(im)
        value_range = [low, high]
        im = Image.fromarray(_scaled(im, low, high))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return background, value_range
    return im.convert("RGB"), value_range


STRIP = 1 << 18  # values converted at a time: decode memory stays ~1 byte per pixel beyond Pillow's own


def _strips(im: Image.Image):
    """The image as float32 arrays of whole rows, about STRIP values each."""
    rows = max(1, STRIP // im.width)
    for y in range(0, im.height, rows):
        yield y, np.asarray(im.crop((0, y, im.width, min(im.height, y + rows))), dtype=np.float32)


def _finite_range(im: Image.Image) -> tuple[float, float]:
    low, high = np.inf, -np.inf
    for _, strip in _strips(im):
        finite = strip[np.isfinite(strip)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if low > high:
        raise RejectedImage(f"a {im.mode} image without finite values")
    return low, high


def _scaled(im: Image.Image, low: float, high: float) -> np.ndarray:
    """The image's values mapped linearly from [low, high] to uint8 (non-finite ones clipped), a strip at a time."""
    out = np.empty((im.height, im.width), np.uint8)
    scale = 255.0 / (high - low) if high > low else 0.0
    for y, strip in _strips(im):
        strip = np.nan_to_num(strip, nan=low, posinf=high, neginf=low)
        out[y : y + len(strip)] = np.clip(((strip - low) * scale).round(), 0, 255)
    return out


class Decode:
    """The decode stage: fetch (when only a path is known), hash, decode, orient, convert to RGB, resize."""

    def __init__(self, policy: ImageConfig, storage_options: dict[str, Any], extensions: list[str] | None = None):
        self.policy = policy
        self.storage_options = storage_options
        self.formats = pillow_formats(extensions) if extensions else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows("decode", batch, self.decode)

    def decode(self, row: Row) -> list[Row]:
        data, path = row.pop("source_bytes"), row.pop("source_path", None)  # path: a Parquet path cell's file
        if error := row.pop("source_error", None):
            raise RejectedImage(error)
        if data is None:
            data = read_bytes(path or row["source_uri"], self.storage_options, self.policy.max_bytes)
        elif len(data) > self.policy.max_bytes:
            raise InputTooLarge(f"{len(data)} bytes is over image.max_bytes={self.policy.max_bytes}")
        row["source_sha256"] = hashlib.sha256(data).hexdigest()
        array, transform = decode_image(data, self.policy, self.formats)
        row.update(image=array_to_png(array), width=array.shape[1], height=array.shape[0], transform=json.dumps(transform))
        if row.get("source_mask") is not None:  # source.mask_column: an inpaint mask at the image's new size
            row["source_mask"] = mask_to_size(row["source_mask"], array.shape[1], array.shape[0])
        return [row]
