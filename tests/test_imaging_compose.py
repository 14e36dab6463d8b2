"""Cutouts and overlays: exact alpha and exact blend values, outlines, palette, sizes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from config.errors import InvalidMask
from tests.support import images
from worker.imaging import DecodedImage, cutout, load_image, overlay, palette_color

LIMITS = dict(max_pixels=50_000_000, max_bytes=8 << 20)
HEIGHT, WIDTH = 30, 40


def decoded(data: bytes, **kw) -> DecodedImage:
    return load_image(data, **LIMITS, **kw)


@pytest.fixture
def photo() -> DecodedImage:
    return decoded(images.encode(Image.fromarray(images.noise_rgb(WIDTH, HEIGHT)), "PNG"))


@pytest.fixture
def transparent_photo() -> tuple[DecodedImage, np.ndarray]:
    data, pixels = images.rgba_png(WIDTH, HEIGHT)
    return decoded(data), pixels


def blob(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def random_mask(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((HEIGHT, WIDTH)) < 0.5


def blend(base: np.ndarray, colour: tuple[int, int, int], alpha: float) -> np.ndarray:
    """The documented formula, written out independently: float64, rounding half up."""
    return np.floor(base.astype(np.float64) * (1 - alpha) + np.array(colour) * alpha + 0.5)


# --- cutout ---------------------------------------------------------------------------------


def test_cutout_alpha_is_mask_times_255_over_the_original_pixels(photo):
    mask = random_mask()
    out = cutout(photo, mask)
    pixels = np.asarray(out)
    assert out.mode == "RGBA" and out.size == (WIDTH, HEIGHT)
    assert (pixels[..., 3] == mask.astype(np.uint8) * 255).all()
    assert (pixels[..., :3] == np.asarray(photo.rgb)).all()


def test_cutout_multiplies_an_existing_alpha_and_keeps_straight_colours(transparent_photo):
    image, source = transparent_photo
    mask = random_mask(1)
    pixels = np.asarray(cutout(image, mask))
    assert (pixels[..., 3] == mask * source[..., 3].astype(int) * 255 // 255).all()
    # The colours are the file's own, not those composited over black for the models.
    assert (pixels[..., :3] == source[..., :3]).all()


def test_cutout_crop_is_the_masks_bounding_box(transparent_photo):
    image, source = transparent_photo
    mask = blob(5, 7, 17, 30)
    mask[5, 7] = False  # the box still spans it
    out = cutout(image, mask, crop=True)
    assert out.size == (23, 12)
    pixels = np.asarray(out)
    assert (pixels[..., :3] == source[5:17, 7:30, :3]).all()
    assert (pixels[..., 3] == np.where(mask[5:17, 7:30], source[5:17, 7:30, 3], 0)).all()


def test_cutout_of_an_empty_mask(photo):
    empty = np.zeros((HEIGHT, WIDTH), dtype=bool)
    assert not np.asarray(cutout(photo, empty))[..., 3].any()
    with pytest.raises(InvalidMask, match="empty"):
        cutout(photo, empty, crop=True)


# --- overlay --------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_overlay_blends_inside_each_mask_and_leaves_the_rest(photo, alpha):
    first, second = blob(2, 3, 12, 20), blob(15, 10, 28, 38)
    out = np.asarray(overlay(photo, [first, second], alpha=alpha))
    base = np.asarray(photo.rgb)
    assert out.shape == base.shape and out.dtype == np.uint8
    assert (out[first] == blend(base[first], palette_color(0), alpha)).all()
    assert (out[second] == blend(base[second], palette_color(1), alpha)).all()
    outside = ~(first | second)
    assert (out[outside] == base[outside]).all()


def test_overlay_rounds_half_up():
    base = np.full((4, 4, 3), 1, dtype=np.uint8)
    image = decoded(images.encode(Image.fromarray(base), "PNG"))
    out = np.asarray(overlay(image, [np.ones((4, 4), bool)], alpha=0.5, colors=[(0, 2, 255)]))
    # 0.5 -> 1, 1.5 -> 2, 128.0 -> 128
    assert out[0, 0].tolist() == [1, 2, 128]


def test_where_masks_overlap_the_later_is_drawn(photo):
    under, over = blob(0, 0, 20, 20), blob(10, 10, 30, 30)
    out = np.asarray(overlay(photo, [under, over]))
    both = under & over
    assert (out[both] == blend(np.asarray(photo.rgb)[both], palette_color(1), 0.5)).all()


def test_a_label_map_colours_id_n_as_segment_n_minus_1(photo):
    masks = [blob(2, 3, 12, 20), blob(15, 10, 28, 38), blob(0, 30, 5, 40)]
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.int32)
    for index, mask in enumerate(masks):
        labels[mask] = index + 1
    from_masks = np.asarray(overlay(photo, masks, alpha=0.6))
    from_labels = np.asarray(overlay(photo, labels, alpha=0.6))
    assert (from_masks == from_labels).all()


def test_outline_paints_two_pixels_inside_the_border_in_full_colour(photo):
    mask = blob(5, 5, 25, 35)
    out = np.asarray(overlay(photo, [mask], outline=True, colors=[(10, 200, 30)]))
    base = np.asarray(photo.rgb)
    ring = mask & ~blob(7, 7, 23, 33)
    assert (out[ring] == (10, 200, 30)).all()
    inner = blob(7, 7, 23, 33)
    assert (out[inner] == blend(base[inner], (10, 200, 30), 0.5)).all()
    assert (out[~mask] == base[~mask]).all()


def test_palette_is_stable_and_distinct():
    colours = [palette_color(i) for i in range(12)]
    assert colours == [palette_color(i) for i in range(12)]
    assert len(set(colours)) == 12
    assert all(0 <= c <= 255 and type(c) is int for colour in colours for c in colour)
    spread = min(
        np.abs(np.subtract(a, b)).sum() for i, a in enumerate(colours) for b in colours[i + 1 :]
    )
    assert spread >= 60


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(HEIGHT, WIDTH + 1), (HEIGHT - 1, WIDTH), (WIDTH, HEIGHT)])
def test_masks_of_another_size_are_invalid_not_padded(photo, shape):
    wrong = np.ones(shape, dtype=bool)
    with pytest.raises(InvalidMask, match="must match the image"):
        cutout(photo, wrong)
    with pytest.raises(InvalidMask, match="must match the image"):
        overlay(photo, [np.ones((HEIGHT, WIDTH), bool), wrong])
    with pytest.raises(InvalidMask, match="must match the image"):
        overlay(photo, wrong.astype(np.int32))


def test_a_reduced_decode_cannot_be_composed():
    image = decoded(images.oriented_jpeg(1, width=512, height=384), reduce_to=64)
    mask = np.ones((384, 512), dtype=bool)
    with pytest.raises(ValueError, match="full decode"):
        cutout(image, mask)
    with pytest.raises(ValueError, match="full decode"):
        overlay(image, [mask])
