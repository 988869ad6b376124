"""Decode and size policy on real photographs and inputs the tests damage themselves."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ImageConfig
from pipeline.io.images import RejectedImage, decode_image, png_to_array, array_to_png, target_size
from tests.helpers import photo

POLICY = ImageConfig(resolution=64)


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (512, 512), (1000, 97)])
def test_size_policy_keeps_aspect_and_rounds_to_multiple_of_8(size):
    w, h = target_size(*size, POLICY)
    assert w % 8 == 0 and h % 8 == 0
    assert min(w, h) == 64
    assert abs(w / h - size[0] / size[1]) / (size[0] / size[1]) < 0.1


def test_real_photo_is_resized_and_transform_recorded():
    array, transform = decode_image(encode(Image.fromarray(photo("coffee")), "JPEG"), POLICY)  # 600x400
    assert array.shape == (64, 96, 3) and array.dtype == np.uint8
    assert transform["original_size"] == [600, 400]
    assert transform["size"] == [96, 64]
    assert transform["original_mode"] == "RGB"


def test_exif_orientation_is_applied():
    landscape = Image.fromarray(photo("coffee"))
    exif = landscape.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    array, transform = decode_image(encode(landscape, "JPEG", exif=exif), POLICY)
    assert array.shape[0] > array.shape[1]  # displayed as portrait
    assert transform["exif_orientation"] == 6


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_other_modes_are_converted_to_rgb(mode):
    astronaut = Image.fromarray(photo("astronaut"))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(astronaut.convert("L"), dtype=np.uint16) * 257))
    else:
        image = astronaut.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    array, transform = decode_image(encode(image, fmt), POLICY)
    assert array.shape == (64, 64, 3) and array.dtype == np.uint8
    assert transform["original_mode"] == mode
    assert array.std() > 10  # still a photograph, not a blank page
    # and the same photograph: its brightness follows the RGB original's, pixel by pixel
    reference, _ = decode_image(encode(astronaut), POLICY)
    gray = lambda a: a.astype(float).mean(axis=2)
    assert np.abs(gray(array) - gray(reference)).mean() < 5


def test_transparent_pixels_become_white():
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)  # fully transparent black
    array, _ = decode_image(encode(Image.fromarray(rgba, "RGBA")), POLICY)
    assert (array == 255).all()


def test_bad_inputs_are_rejected_with_a_reason():
    good = encode(Image.fromarray(photo("chelsea")), "JPEG")
    with pytest.raises(RejectedImage, match="empty file"):
        decode_image(b"", POLICY)
    with pytest.raises(RejectedImage, match="not a decodable image"):
        decode_image(good[: len(good) // 3], POLICY)
    with pytest.raises(RejectedImage, match="not a decodable image"):
        decode_image(b"%PDF-1.4 definitely not an image", POLICY)
    with pytest.raises(RejectedImage, match="max_pixels"):
        decode_image(good, ImageConfig(resolution=64, max_pixels=1000))
    with pytest.raises(RejectedImage, match="min_side"):
        decode_image(encode(Image.new("RGB", (8, 300))), POLICY)
    with pytest.raises(RejectedImage, match="1000x97 has an aspect ratio over image.max_aspect_ratio=4"):
        decode_image(encode(Image.new("RGB", (1000, 97))), POLICY)
    array, _ = decode_image(encode(Image.new("RGB", (1000, 97))), ImageConfig(resolution=64, max_aspect_ratio=11))
    assert array.shape == (64, 656, 3)


def test_png_round_trip_is_lossless():
    astronaut = photo("astronaut")
    np.testing.assert_array_equal(png_to_array(array_to_png(astronaut)), astronaut)
