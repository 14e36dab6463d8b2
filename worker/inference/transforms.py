"""Array transforms around the models: images into normalised NCHW tensors, and model
outputs resized back to the original image size.

Inputs: Pillow's bilinear ``resize`` of the 8-bit RGB image (it antialiases when shrinking,
as SAM2Transforms and transformers' processors do), scaled to [0, 1], normalised with the
ImageNet mean and std.

Outputs: bilinear like ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` (no antialias): half-pixel centres, edges clamped, width first and
then height. It is separable, so each axis needs two source indices and two weights per
output position; those are computed once per size pair and the work is two row gathers and
a blend per block of rows.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from config.errors import InvalidImage
from worker.imaging import accel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ROWS_PER_BLOCK = 64  # one block of temporaries stays in cache at 4000 px wide


def to_model_input(image: Image.Image, width: int, height: int) -> np.ndarray:
    """``image`` (8-bit RGB) resized to ``width`` x ``height`` as a normalised float32
    ``[1, 3, height, width]`` tensor."""
    if image.mode != "RGB":
        raise InvalidImage(f"the model needs an 8-bit RGB image, got mode {image.mode!r}")
    out = np.empty((1, 3, height, width), np.float32)

    def rows(top: int, bottom: int) -> None:
        box = None
        if (top, bottom) != (0, height):
            box = (0.0, top * image.height / height, float(image.width),
                   bottom * image.height / height)
        pixels = np.asarray(image.resize((width, bottom - top), Image.BILINEAR, box=box))
        for c in range(3):
            np.take(_NORMALISED[c], pixels[:, :, c], out=out[0, c, top:bottom])

    split = resize_split(image.size, (width, height))
    accel.run_all([lambda a=a, b=b: rows(a, b) for a, b in zip(split, split[1:])])
    return out


def to_model_input_reference(image: Image.Image, width: int, height: int) -> np.ndarray:
    """``to_model_input`` with one resize of the whole image: the reference."""
    pixels = np.asarray(image.resize((width, height), Image.BILINEAR))
    out = np.empty((1, 3, height, width), np.float32)
    for c in range(3):
        np.take(_NORMALISED[c], pixels[:, :, c], out=out[0, c])
    return out


def resize_split(in_size: tuple[int, int], out_size: tuple[int, int]) -> list[int]:
    """Output row bounds at which Pillow's bilinear ``resize`` can be cut into bands (each
    band resized from the full image with ``box``) giving exactly the pixels of one resize:
    ``[0, height]`` (no cut) unless it provably does. Pillow releases the GIL while it
    resamples, so the bands run on a thread per core (12 MP to SAM's 1024x1024 or DETR's
    1066x800: ~48 -> ~28 ms on 2 cores).

    Pillow (``precompute_coeffs`` in Resample.c) places output row ``y`` of a band at
    ``in0 + (y + 0.5) * scale``, with ``in0`` a C float and ``scale = (in1 - in0) / rows``
    computed from float box edges; a cut is exact when every band's scale and every row's
    centre equal those of the whole resize, bit for bit, and both resize in the same pass
    order. Checked here with the same arithmetic; where the scale is not a short binary
    fraction (e.g. 480 -> 800 rows) there is no cut."""
    (in_w, in_h), (out_w, out_h) = in_size, out_size
    pieces = accel.THREADS
    if pieces < 2 or out_h < 2 * pieces or in_h == out_h or in_w == out_w:
        return [0, out_h]
    bounds = [0]
    for i in range(1, pieces):
        target = round(i * out_h / pieces)
        # a cut where the band's top edge is an integer row of the image
        step = out_h // np.gcd(out_h, in_h)
        cut = int(round(target / step) * step)
        if not bounds[-1] < cut < out_h:
            return [0, out_h]
        bounds.append(cut)
    bounds.append(out_h)
    if all(_band_is_exact(in_w, in_h, out_w, out_h, a, b) for a, b in zip(bounds, bounds[1:])):
        return bounds
    return [0, out_h]


def _horizontal_first(in_w: int, in_h: int, out_w: int, rows: int) -> bool:
    return not ((in_h - rows) > 0 and (in_h - rows) > (in_w - out_w) * 2)


def _band_is_exact(in_w: int, in_h: int, out_w: int, out_h: int, top: int, bottom: int) -> bool:
    if _horizontal_first(in_w, in_h, out_w, out_h) != _horizontal_first(
        in_w, in_h, out_w, bottom - top
    ):
        return False
    f32 = np.float32
    scale = float(f32(in_h) - f32(0.0)) / out_h
    in0, in1 = f32(top * in_h / out_h), f32(bottom * in_h / out_h)
    band_scale = float(f32(in1 - in0)) / (bottom - top)
    if band_scale != scale:
        return False
    rows = np.arange(bottom - top, dtype=np.float64)
    band = float(in0) + (rows + 0.5) * band_scale
    whole = 0.0 + ((rows + top) + 0.5) * scale
    return bool(np.array_equal(band, whole))


def _normalised_levels() -> np.ndarray:
    # 8-bit input has only 256 levels per channel, so normalising is a table look-up
    levels = np.arange(256, dtype=np.float64) / 255.0
    table = [(levels - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    return np.stack(table).astype(np.float32)


_NORMALISED = _normalised_levels()


@lru_cache(maxsize=64)
def axis_weights(
    in_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(i0, i1, w0, w1)``: output position ``j`` reads ``w0[j]*x[i0[j]] + w1[j]*x[i1[j]]``."""
    # torch keeps the scale in float32 but its compiled kernel fuses the multiply-add, so the
    # source position is rounded once; float64 arithmetic reproduces that rounding.
    scale = np.float64(np.float32(in_size / out_size))
    src = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    for a in (i0, i1, w0, w1):
        a.setflags(write=False)
    return i0, i1, w0, w1


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D float array to ``height`` x ``width`` (float32)."""
    return _resize(np.asarray(x, np.float32), height, width, threshold=None)


def upsample_mask(
    logits: np.ndarray, height: int, width: int, threshold: float = 0.0
) -> np.ndarray:
    """``resize_bilinear(logits, height, width) > threshold`` as a bool mask, computed in
    row blocks so the float image never exists at full size (compiled, on a thread per
    core, where numba is installed; ``upsample_mask_reference`` is the numpy path, and tests
    hold the two equal)."""
    logits = np.asarray(logits, np.float32)
    if _threshold_rows is None or logits.ndim != 2:
        return upsample_mask_reference(logits, height, width, threshold)
    cols = bilinear_columns(logits[None], width)[0]
    r0, r1, rw0, rw1 = axis_weights(logits.shape[0], height)
    out = np.empty((height, width), np.bool_)
    # numpy compares a float32 array with a Python float in float32 (NEP 50)
    limit = np.float32(threshold)
    accel.split_rows(
        lambda y0, y1: _threshold_rows(cols, r0, r1, rw0, rw1, limit, out, y0, y1), height
    )
    return out


def upsample_mask_reference(
    logits: np.ndarray, height: int, width: int, threshold: float = 0.0
) -> np.ndarray:
    """``upsample_mask`` in numpy, a block of rows at a time: the reference."""
    return _resize(np.asarray(logits, np.float32), height, width, threshold=threshold)


def bilinear_columns(planes: np.ndarray, width: int) -> np.ndarray:
    """``(n, h, w)`` float32 planes resized along their rows to ``width``: each plane's
    ``BilinearRows.cols``, ``x[:, c0] * cw0 + x[:, c1] * cw1`` in float32 (compiled, on a
    thread per core, with numba; the same two products and sum, rounded the same)."""
    planes = np.ascontiguousarray(planes, np.float32)
    c0, c1, cw0, cw1 = axis_weights(planes.shape[2], width)
    if _column_rows is None:
        return np.ascontiguousarray(planes[:, :, c0] * cw0 + planes[:, :, c1] * cw1)
    n, h, _ = planes.shape
    out = np.empty((n, h, width), np.float32)
    flat_in, flat_out = planes.reshape(n * h, -1), out.reshape(n * h, width)
    accel.split_rows(
        lambda a, b: _column_rows(flat_in, c0, c1, cw0, cw1, flat_out, a, b),
        n * h,
        min_rows=16,
    )
    return out


def _column_rows_py(x, c0, c1, cw0, cw1, out, y0, y1):  # pragma: no cover - numba
    for y in range(y0, y1):
        row, dst = x[y], out[y]
        for j in range(dst.shape[0]):
            dst[j] = row[c0[j]] * cw0[j] + row[c1[j]] * cw1[j]


def _threshold_rows_py(cols, r0, r1, rw0, rw1, limit, out, y0, y1):  # pragma: no cover
    for y in range(y0, y1):
        a, b, w0, w1 = cols[r0[y]], cols[r1[y]], rw0[y], rw1[y]
        dst = out[y]
        for x in range(dst.shape[0]):
            dst[x] = a[x] * w0 + b[x] * w1 > limit


_column_rows = accel.kernel(_column_rows_py)
_threshold_rows = accel.kernel(_threshold_rows_py)


class BilinearRows:
    """``resize_bilinear(x, height, width)`` a block of output rows at a time, so a caller
    can finish with a block while it is still in cache. The columns are blended once
    (``x``'s rows at the output width), each block of rows from them."""

    def __init__(self, x: np.ndarray, height: int, width: int) -> None:
        x = np.asarray(x, np.float32)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D array, got shape {x.shape}")
        c0, c1, cw0, cw1 = axis_weights(x.shape[1], width)
        self.rows = axis_weights(x.shape[0], height)
        # C order matters: the row gathers below are ~30x slower on the F-ordered fancy-index result
        self.cols = np.ascontiguousarray(x[:, c0] * cw0 + x[:, c1] * cw1)  # (in_h, width)

    def block(self, start: int, stop: int, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """Output rows ``start:stop`` into ``out`` ((stop - start, width) float32), with
        ``scratch`` of the same shape for the second source row."""
        r0, r1, rw0, rw1 = self.rows
        np.take(self.cols, r0[start:stop], axis=0, out=out, mode="clip")
        out *= rw0[start:stop, None]
        np.take(self.cols, r1[start:stop], axis=0, out=scratch, mode="clip")
        scratch *= rw1[start:stop, None]
        out += scratch
        return out


def _resize(x: np.ndarray, height: int, width: int, threshold: float | None) -> np.ndarray:
    rows = BilinearRows(x, height, width)
    out = np.empty((height, width), np.float32 if threshold is None else np.bool_)
    top = np.empty((ROWS_PER_BLOCK, width), np.float32)
    bottom = np.empty_like(top)
    for start in range(0, height, ROWS_PER_BLOCK):
        stop = min(start + ROWS_PER_BLOCK, height)
        n = stop - start
        target = out[start:stop] if threshold is None else top[:n]
        blend = rows.block(start, stop, target, bottom[:n])
        if threshold is not None:
            np.greater(blend, threshold, out=out[start:stop])
    return out
