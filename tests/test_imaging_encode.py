"""Encoders keep pixels and modes; the shipped sample photo is what the README promises."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from tests.support import images
from worker.imaging import encode_jpeg, encode_png

SAMPLE = Path(__file__).resolve().parents[1] / "api_client" / "assets" / "sample.jpg"


def reopen(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize(
    "img",
    [
        Image.fromarray(images.noise_rgb(33, 17)),
        Image.fromarray(images.rgba_png(33, 17)[1], "RGBA"),
        Image.fromarray(np.random.default_rng(2).random((17, 33)) < 0.5),
        Image.fromarray(np.random.default_rng(3).integers(0, 65536, (17, 33), dtype=np.uint16)),
    ],
    ids=["RGB", "RGBA", "1", "I;16"],
)
@pytest.mark.parametrize("level", [1, 6, 9])
def test_png_keeps_mode_and_pixels_at_any_level(img, level):
    back = reopen(encode_png(img, compress_level=level))
    assert back.format == "PNG" and back.mode == img.mode
    assert (np.asarray(back) == np.asarray(img)).all()


def test_png_level_trades_size_only():
    img = images.sample_scene(320, 213)
    fast, small = encode_png(img, compress_level=1), encode_png(img, compress_level=9)
    assert len(small) < len(fast)
    assert (np.asarray(reopen(fast)) == np.asarray(reopen(small))).all()


def test_jpeg_of_rgb_and_refusal_of_alpha():
    img = images.sample_scene(320, 213)
    back = reopen(encode_jpeg(img, quality=90))
    assert back.format == "JPEG" and back.size == img.size
    assert np.abs(np.asarray(back).astype(int) - np.asarray(img)).mean() < 3
    with pytest.raises(ValueError, match="PNG"):
        encode_jpeg(img.convert("RGBA"))


def test_sample_photo_asset():
    data = SAMPLE.read_bytes()
    assert len(data) < 300_000
    img = reopen(data)
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (1280, 853)
    assert img.getexif().get(ExifTags.Base.Orientation) == 1
    # A photo-like scene, not a flat card: many colours in sky, grass and objects.
    assert len(img.getcolors(maxcolors=1 << 20)) > 10_000
