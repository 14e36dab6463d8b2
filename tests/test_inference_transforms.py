"""The fast separable bilinear resize against a plain per-pixel reference of
``align_corners=False`` (half-pixel centres, edges clamped, no antialias)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.inference.transforms import resize_bilinear, upsample_mask


def reference_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    in_h, in_w = x.shape
    out = np.empty((height, width))
    for j in range(height):
        sy = max((j + 0.5) * in_h / height - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), in_h - 1)
        y1 = min(y0 + 1, in_h - 1)
        ly = sy - y0
        for i in range(width):
            sx = max((i + 0.5) * in_w / width - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), in_w - 1)
            x1 = min(x0 + 1, in_w - 1)
            lx = sx - x0
            top = (1 - lx) * x[y0, x0] + lx * x[y0, x1]
            bottom = (1 - lx) * x[y1, x0] + lx * x[y1, x1]
            out[j, i] = (1 - ly) * top + ly * bottom
    return out


@pytest.mark.parametrize(
    "in_shape,out_shape",
    [
        ((16, 16), (75, 43)),
        ((16, 16), (43, 75)),
        ((9, 13), (9, 13)),
        ((20, 30), (7, 11)),
        ((5, 7), (64, 3)),
    ],
)
def test_matches_the_reference(in_shape: tuple[int, int], out_shape: tuple[int, int]) -> None:
    x = np.random.default_rng(1).uniform(-1, 1, in_shape).astype(np.float32)
    got = resize_bilinear(x, *out_shape)
    assert got.shape == out_shape and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_bilinear(x.astype(np.float64), *out_shape), atol=1e-5)


def test_mask_is_the_thresholded_resize_across_row_blocks() -> None:
    x = np.random.default_rng(2).normal(size=(32, 32)).astype(np.float32)
    resized = resize_bilinear(x, 300, 200)  # more rows than one block
    mask = upsample_mask(x, 300, 200)
    assert mask.dtype == np.bool_
    assert np.array_equal(mask, resized > 0)
    assert np.array_equal(upsample_mask(x, 300, 200, threshold=0.5), resized > 0.5)


def test_constant_and_linear_inputs_are_reproduced() -> None:
    assert np.all(resize_bilinear(np.full((8, 8), 3.0), 50, 30) == np.float32(3.0))
    ramp = np.tile(np.arange(8, dtype=np.float32), (4, 1))  # x[i] = i along columns
    up = resize_bilinear(ramp, 4, 32)
    centres = (np.arange(32) + 0.5) * 8 / 32 - 0.5
    np.testing.assert_allclose(up[0], np.clip(centres, 0, 7), atol=1e-6)


def test_rejects_non_2d_input() -> None:
    with pytest.raises(ValueError):
        resize_bilinear(np.zeros((2, 3, 4)), 4, 4)
