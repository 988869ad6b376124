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
from pipeline.io.sources import read_bytes
from pipeline.rows import Row, map_rows


class RejectedImage(ValueError):
    """An input that cannot become a sample; the message says why."""


def array_to_png(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {array.dtype}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_to_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def target_size(width: int, height: int, policy: ImageConfig) -> tuple[int, int]:
    """Scale so the short side is `resolution`, keep the aspect ratio, round sides to `multiple_of`."""
    scale = policy.resolution / min(width, height)
    m = policy.multiple_of
    return (max(m, round(width * scale / m) * m), max(m, round(height * scale / m) * m))


def decode_image(data: bytes, policy: ImageConfig) -> tuple[np.ndarray, dict]:
    """Decode source bytes into an RGB uint8 array at the policy's size.

    Returns the array and a record of the transform (original size and mode, EXIF rotation, new
    size). Raises RejectedImage with a readable reason for anything that cannot become a sample.
    """
    if not data:
        raise RejectedImage("empty file (0 bytes)")
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # image.max_pixels replaces Pillow's own limit, checked on the header
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > policy.max_pixels:
                raise RejectedImage(f"{width}x{height} pixels is over image.max_pixels={policy.max_pixels}")
            im.load()
    except RejectedImage:
        raise
    except Image.DecompressionBombError as e:
        raise RejectedImage(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise RejectedImage(f"not a decodable image: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    mode = im.mode
    orientation = im.getexif().get(0x0112, 1)
    im = ImageOps.exif_transpose(im)
    if min(im.size) < policy.min_side:
        raise RejectedImage(f"{im.width}x{im.height} is smaller than image.min_side={policy.min_side}")
    if max(im.size) > policy.max_aspect_ratio * min(im.size):
        raise RejectedImage(f"{im.width}x{im.height} has an aspect ratio over image.max_aspect_ratio={policy.max_aspect_ratio:g}")
    im = _to_rgb(im)
    size = target_size(im.width, im.height, policy)
    if size != im.size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    transform = {
        "original_size": [width, height],
        "original_mode": mode,
        "exif_orientation": int(orientation),
        "size": list(size),
        "resize": f"short side to {policy.resolution}, sides to multiples of {policy.multiple_of}, lanczos",
    }
    return np.asarray(im), transform


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited on white rather than dropped to black."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray((arr / peak * 255.0).round().astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return background
    return im.convert("RGB")


class Decode:
    """The decode stage: fetch (when only a path is known), hash, decode, orient, convert to RGB, resize."""

    def __init__(self, policy: ImageConfig, storage_options: dict[str, Any]):
        self.policy = policy
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows("decode", batch, self.decode)

    def decode(self, row: Row) -> list[Row]:
        data = row.pop("source_bytes")
        if data is None:
            data = read_bytes(row["source_uri"], self.storage_options)
        row["source_sha256"] = hashlib.sha256(data).hexdigest()
        array, transform = decode_image(data, self.policy)
        row.update(image=array_to_png(array), width=array.shape[1], height=array.shape[0], transform=json.dumps(transform))
        return [row]
