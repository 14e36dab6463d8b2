"""load_image: orientation, every pixel mode, and each kind of bad input with its code."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image, ImageFile, features

from config.errors import ImageTooLarge, ImageTooSmall, InvalidImage
from tests.support import images
from worker.imaging import DecodedImage, load_image

LIMITS = dict(max_pixels=50_000_000, max_bytes=8 << 20)


def decode(data: bytes, **overrides) -> DecodedImage:
    return load_image(data, **{**LIMITS, **overrides})


def quadrant_centres(width: int, height: int) -> dict[str, tuple[int, int]]:
    """(x, y) of the middle of each quadrant of a width x height picture."""
    return {
        "top_left": (width // 4, height // 4),
        "top_right": (3 * width // 4, height // 4),
        "bottom_left": (width // 4, 3 * height // 4),
        "bottom_right": (3 * width // 4, 3 * height // 4),
    }


def assert_quadrants(rgb: Image.Image) -> None:
    pixels = np.asarray(rgb).astype(int)
    for quadrant, (x, y) in quadrant_centres(*rgb.size).items():
        expected = images.QUADRANT_COLOURS[quadrant]
        assert np.abs(pixels[y, x] - expected).max() <= 12, (quadrant, pixels[y, x])


# --- orientation ------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_gives_the_displayed_picture(orientation):
    decoded = decode(images.oriented_jpeg(orientation, width=64, height=48))
    assert decoded.size == (64, 48)
    assert decoded.rgb.size == (64, 48)
    assert decoded.format == "JPEG"
    assert_quadrants(decoded.rgb)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_reduced_decode_reports_the_full_displayed_size(orientation):
    decoded = decode(images.oriented_jpeg(orientation, width=512, height=384), reduce_to=64)
    assert decoded.size == (512, 384)
    # 384 // 64 = 6 allows libjpeg's 1/4 scale, not 1/8: both sides stay >= 64.
    assert decoded.rgb.size == (128, 96)
    assert decoded.is_reduced
    assert_quadrants(decoded.rgb)


def test_reduce_to_leaves_small_jpegs_and_other_formats_at_full_size():
    assert not decode(images.oriented_jpeg(1, 64, 48), reduce_to=64).is_reduced
    png = images.encode(Image.fromarray(images.quadrants(512, 384)), "PNG")
    assert decode(png, reduce_to=64).rgb.size == (512, 384)


# --- modes ------------------------------------------------------------------------------

SIXTEEN_BIT = np.array([[0, 255, 256, 32768, 65280, 65535]], dtype=np.uint16).repeat(2, axis=0)
SIXTEEN_BIT_AS_8 = np.array([0, 0, 1, 128, 255, 255], dtype=np.uint8)


def gray_row(decoded: DecodedImage) -> np.ndarray:
    pixels = np.asarray(decoded.rgb)
    assert decoded.rgb.mode == "RGB" and pixels.dtype == np.uint8
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[0, :, 0]


@pytest.mark.parametrize(
    "make, mode",
    [(images.gray16_png, "I;16"), (images.gray16_big_endian_tiff, "I;16B")],
    ids=["png-I;16", "tiff-I;16B"],
)
def test_16_bit_gray_is_scaled_not_clipped(make, mode):
    decoded = decode(make(SIXTEEN_BIT))
    assert decoded.mode == mode
    assert gray_row(decoded).tolist() == SIXTEEN_BIT_AS_8.tolist()


def test_32_bit_int_gray_is_scaled_as_16_bit_samples():
    values = np.array([[0, 32768, 65535, 70000, -5]] * 2)
    decoded = decode(images.int32_tiff(values))
    assert decoded.mode == "I"
    assert gray_row(decoded).tolist() == [0, 128, 255, 255, 0]


def test_float_gray_is_taken_as_zero_to_one():
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]] * 2)
    decoded = decode(images.float_tiff(values))
    assert decoded.mode == "F"
    assert gray_row(decoded).tolist() == [0, 128, 255, 255, 0, 0]


def test_8_bit_gray_and_bilevel():
    gray = np.arange(24, dtype=np.uint8).reshape(2, 12) * 10
    decoded = decode(images.encode(Image.fromarray(gray), "PNG"))
    assert gray_row(decoded).tolist() == gray[0].tolist()
    bits = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=bool)
    decoded = decode(images.bilevel_png(bits))
    assert decoded.mode == "1"
    assert (np.asarray(decoded.rgb)[..., 0] == bits * 255).all()


@pytest.mark.parametrize(
    "cmyk, rgb",
    [((0, 255, 255, 0), (255, 0, 0)), ((0, 0, 0, 255), (0, 0, 0)), ((0, 0, 0, 0), (255, 255, 255))],
)
def test_cmyk_jpeg_converts_to_rgb(cmyk, rgb):
    decoded = decode(images.cmyk_jpeg(cmyk))
    assert decoded.mode == "CMYK" and decoded.rgb.mode == "RGB"
    assert np.abs(np.asarray(decoded.rgb).astype(int) - rgb).max() <= 3


def test_rgba_is_composited_over_black_and_keeps_its_alpha_and_colours():
    data, pixels = images.rgba_png()
    decoded = decode(data)
    colour, alpha = pixels[..., :3].astype(int), pixels[..., 3]
    assert decoded.mode == "RGBA"
    assert (decoded.alpha == alpha).all()
    expected = np.floor(colour * alpha[..., None] / 255 + 0.5)
    assert (np.asarray(decoded.rgb) == expected).all()
    assert (np.asarray(decoded.rgba) == pixels).all()


def test_gray_with_alpha():
    data, pixels = images.la_png()
    decoded = decode(data)
    gray, alpha = pixels[..., 0].astype(int), pixels[..., 1]
    assert decoded.mode == "LA"
    assert (decoded.alpha == alpha).all()
    assert (gray_row_all(decoded) == np.floor(gray * alpha / 255 + 0.5)).all()


def gray_row_all(decoded: DecodedImage) -> np.ndarray:
    pixels = np.asarray(decoded.rgb)
    assert (pixels[..., 0] == pixels[..., 2]).all()
    return pixels[..., 0]


def test_palette_with_transparency_gives_alpha():
    data, index = images.palette_png_with_transparency()
    decoded = decode(data)
    assert decoded.mode == "P"
    opaque = index == 0
    assert (decoded.alpha == np.where(opaque, 255, 0)).all()
    assert (np.asarray(decoded.rgb)[opaque] == images.RED).all()
    assert (np.asarray(decoded.rgb)[~opaque] == 0).all()
    assert (np.asarray(decoded.rgba)[~opaque][:, :3] == images.GREEN).all()


def test_opaque_images_have_no_alpha():
    decoded = decode(images.oriented_jpeg(1))
    assert decoded.alpha is None and decoded.rgba is None


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "GIF", "TIFF", "PNG"])
def test_lossless_formats_decode_exactly(fmt):
    pixels = images.quadrants(20, 14)
    params = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode(images.encode(Image.fromarray(pixels), fmt, **params))
    assert decoded.format == fmt
    assert (np.asarray(decoded.rgb) == pixels).all()


@pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")
def test_avif():
    decoded = decode(images.encode(Image.fromarray(images.quadrants(64, 48)), "AVIF", quality=90))
    assert decoded.format == "AVIF" and decoded.size == (64, 48)
    assert_quadrants(decoded.rgb)


def test_multi_picture_jpeg_from_a_phone_decodes_its_primary_image():
    decoded = decode(images.mpo())
    assert decoded.format == "MPO"
    assert decoded.size == (16, 12)
    assert (np.asarray(decoded.rgb).astype(int)[6, 8] - (0, 100, 200)).__abs__().max() <= 3


def test_smallest_allowed_image():
    assert decode(images.encode(Image.new("RGB", (1, 1)), "PNG"), min_side=1).size == (1, 1)


# --- bad input ----------------------------------------------------------------------------


def noise_jpeg() -> bytes:
    return images.encode(Image.fromarray(images.noise_rgb(64, 48)), "JPEG")


def raises_code(error: type, data: bytes, **overrides) -> pytest.ExceptionInfo:
    with pytest.raises(error) as info:
        decode(data, **overrides)
    assert info.value.code == error.code
    return info


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"this is not an image at all",
        images.truncated(noise_jpeg()),
        images.truncated(images.encode(Image.fromarray(images.noise_rgb(64, 48)), "PNG")),
        images.encode(Image.new("RGB", (8, 8)), "PPM"),  # real, but not a format we accept
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "ppm"],
)
def test_unreadable_bytes_are_invalid_image(data):
    info = raises_code(InvalidImage, data)
    assert type(info.value) is InvalidImage


def test_truncated_images_stay_errors():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    info = raises_code(InvalidImage, images.truncated(noise_jpeg()))
    assert "JPEG image of 64x48" in info.value.message


def test_over_the_byte_limit():
    raises_code(ImageTooLarge, images.oriented_jpeg(1), max_bytes=100)


@pytest.mark.timeout(10)
def test_decompression_bomb_fails_from_its_header():
    # The pixel data is a fragment: a decoder that reached it would report truncation.
    info = raises_code(ImageTooLarge, images.png_bomb(9000, 9000), max_pixels=50_000_000)
    assert "PNG" in info.value.message and "9000x9000" in info.value.message
    # past Pillow's own limit (about 179 MP, the process's to set) it is Pillow that refuses
    info = raises_code(ImageTooLarge, images.png_bomb(30000, 30000), max_pixels=100_000_000)
    assert "900000000 pixels" in info.value.message


def test_pixel_limit_is_inclusive_and_holds_under_rotation():
    data = images.oriented_jpeg(6, width=64, height=48)
    assert decode(data, max_pixels=64 * 48).size == (64, 48)
    raises_code(ImageTooLarge, data, max_pixels=64 * 48 - 1)


def test_pixel_limit_is_checked_before_a_reduced_decode():
    # 1/8 scale would decode only 3750x3750 pixels, but the image is 30000x30000.
    data = images.jpeg_declaring(30000, 30000, orientation=6)
    raises_code(ImageTooLarge, data, max_pixels=20_000_000, reduce_to=64)


def test_too_small():
    info = raises_code(ImageTooSmall, images.encode(Image.new("RGB", (1, 1)), "PNG"))
    assert "1x1" in info.value.message
    raises_code(ImageTooSmall, images.encode(Image.new("RGB", (5, 40)), "PNG"), min_side=8)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_animated_or_multi_page_images_use_their_first_frame_and_say_so(fmt):
    image = decode(images.animated(fmt, count=3))
    first = decode(images.encode(images.frames(3)[0], "PNG"))
    assert image.frames == 3 and image.describe_frames() == {"frames": 3, "frame_used": 0}
    tolerance = 0 if fmt in ("PNG", "TIFF") else 40  # GIF's palette and WEBP's lossy frames
    assert np.abs(np.asarray(image.rgb, np.int16) - np.asarray(first.rgb, np.int16)).max() <= tolerance
