"""Masks: bbox and area, COCO RLE, 1-bit mask PNGs and 16-bit label-map PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from config.errors import InvalidMask
from tests.support import images
from tests.support.images import png_bomb
from worker.imaging import (
    area,
    bbox,
    label_map_from_png,
    label_map_to_png,
    mask_from_png,
    mask_to_png,
    rle_decode,
    rle_encode,
)


def png_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR."""
    return (
        int.from_bytes(data[16:20], "big"),
        int.from_bytes(data[20:24], "big"),
        data[24],
        data[25],
    )


def test_bbox_and_area():
    mask = np.zeros((6, 9), dtype=bool)
    mask[1:4, 2:7] = True
    mask[5, 8] = True
    assert bbox(mask) == [2, 1, 7, 5]
    assert area(mask) == 16
    assert bbox(np.zeros((3, 3), dtype=bool)) is None
    assert area(np.zeros((3, 3), dtype=bool)) == 0
    assert all(type(v) is int for v in bbox(mask))


# --- COCO RLE -------------------------------------------------------------------------------


def test_rle_follows_coco_column_major_convention():
    mask = np.array([[0, 1], [1, 1], [0, 0]], dtype=bool)
    # Columns top to bottom: [0, 1, 0] then [1, 1, 0] -> 0 | 1 | 0 | 1 1 | 0
    assert rle_encode(mask) == {"size": [3, 2], "counts": [1, 1, 1, 2, 1]}


def test_rle_of_a_mask_starting_inside_begins_with_zero():
    mask = np.array([[1, 0], [0, 0]], dtype=bool)
    assert rle_encode(mask) == {"size": [2, 2], "counts": [0, 1, 3]}
    assert rle_encode(np.ones((2, 3), dtype=bool)) == {"size": [2, 3], "counts": [0, 6]}
    assert rle_encode(np.zeros((2, 3), dtype=bool)) == {"size": [2, 3], "counts": [6]}


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (23, 1), (37, 53), (480, 640)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
def test_rle_round_trips(shape, density):
    mask = np.random.default_rng(sum(shape)).random(shape) < density
    rle = rle_encode(mask)
    assert all(type(c) is int for c in rle["counts"])
    assert sum(rle["counts"]) == mask.size
    decoded = rle_decode(rle)
    assert decoded.dtype == bool and decoded.shape == shape
    assert (decoded == mask).all()


def test_rle_accepts_non_bool_masks_as_nonzero():
    assert rle_encode(np.array([[0, 7], [255, 0]], dtype=np.uint8))["counts"] == [1, 2, 1]


@pytest.mark.parametrize(
    "rle",
    [
        None,
        {"counts": [1]},
        {"size": [2, 2], "counts": [1, 2]},  # 3 pixels for 4
        {"size": [2, 2], "counts": [1, -1, 4]},
        {"size": [2, 2], "counts": "PPYo0"},  # compressed form
        {"size": [2], "counts": [2]},
        {"size": [2, 2], "counts": [1.5, 2.5]},
        {"size": [2, True], "counts": [2]},
    ],
)
def test_malformed_rle_is_invalid_mask(rle):
    with pytest.raises(InvalidMask) as info:
        rle_decode(rle)
    assert info.value.code == "invalid_mask"


# --- mask PNGs ------------------------------------------------------------------------------


def test_mask_png_is_one_bit_and_round_trips():
    mask = np.random.default_rng(3).random((37, 53)) < 0.4
    data = mask_to_png(mask)
    assert png_header(data) == (53, 37, 1, 0)
    assert Image.open(io.BytesIO(data)).mode == "1"
    back = mask_from_png(data, expected_size=(37, 53))
    assert back.dtype == bool and (back == mask).all()


@pytest.mark.parametrize("inside", [1, 255])
def test_eight_bit_binary_masks_are_read(inside):
    mask = np.random.default_rng(4).random((9, 11)) < 0.5
    data = images.encode(Image.fromarray(mask.astype(np.uint8) * inside), "PNG")
    assert (mask_from_png(data) == mask).all()


@pytest.mark.parametrize(
    "data",
    [
        images.encode(Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)), "PNG"),
        images.encode(Image.new("RGB", (4, 3), (255, 255, 255)), "PNG"),
        images.encode(Image.new("1", (4, 3)), "JPEG"),
        b"not a png",
        images.truncated(mask_to_png(np.random.default_rng(5).random((64, 64)) < 0.5), 0.6),
    ],
    ids=["many-levels", "rgb", "jpeg", "garbage", "truncated"],
)
def test_non_masks_are_invalid_mask(data):
    with pytest.raises(InvalidMask):
        mask_from_png(data)


def test_mask_of_another_size_is_refused_before_decoding():
    data = mask_to_png(np.ones((3, 4), dtype=bool))
    with pytest.raises(InvalidMask, match="4x3 but should be 5x3"):
        mask_from_png(data, expected_size=(3, 5))
    # A huge declared canvas with a fragment of data: the size is what gets reported (past
    # Pillow's own limit, which segq leaves to the process, in Pillow's words).
    with pytest.raises(InvalidMask, match="900000000 pixels"):
        mask_from_png(png_bomb(30000, 30000), expected_size=(3, 4))
    with pytest.raises(InvalidMask, match="9000x9000 but should be 4x3"):
        mask_from_png(png_bomb(9000, 9000), expected_size=(3, 4))


@pytest.mark.timeout(10)
def test_mask_bombs_are_refused_from_the_header_without_an_expected_size():
    with pytest.raises(InvalidMask, match="900000000 pixels"):
        mask_from_png(png_bomb(30000, 30000))
    with pytest.raises(InvalidMask, match="9000x9000, over the limit of 1000000 pixels"):
        mask_from_png(png_bomb(9000, 9000), max_pixels=1_000_000)
    with pytest.raises(InvalidMask, match="over the limit of 100 pixels"):
        label_map_from_png(label_map_to_png(np.zeros((10, 11), np.int32)), max_pixels=100)


# --- label maps -----------------------------------------------------------------------------


def test_label_map_png_is_16_bit_and_round_trips():
    labels = np.random.default_rng(6).integers(0, 65536, (21, 34), dtype=np.int32)
    labels[0, 0], labels[0, 1] = 0, 65535
    data = label_map_to_png(labels)
    assert png_header(data) == (34, 21, 16, 0)
    back = label_map_from_png(data, expected_size=(21, 34))
    assert back.dtype == np.int32 and (back == labels).all()


@pytest.mark.parametrize(
    "bad", [np.array([[-1, 0]]), np.array([[0, 65536]]), np.zeros((2, 2), np.float32)]
)
def test_label_maps_that_do_not_fit_16_bits_are_refused(bad):
    with pytest.raises(InvalidMask):
        label_map_to_png(bad)
