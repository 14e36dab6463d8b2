"""Binary masks and label maps: measures, COCO RLE and PNG in both directions.

A mask is a 2-D numpy array, True (or non-zero) inside the segment, shaped (height, width)
like the image. A label map is a 2-D integer array of segment ids, 0 where no segment is.
Sizes follow numpy and COCO, (height, width), wherever a size is a pair of numbers here.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np
from PIL import Image

from config.errors import InvalidMask
from config.settings import Settings
from worker.imaging import accel, png

MAX_LABEL = 0xFFFF  # a 16-bit PNG holds the ids
# No mask can be larger than the largest image a deployment accepts by default.
DEFAULT_MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default


def as_mask(mask: Any, shape: Optional[tuple[int, int]] = None) -> np.ndarray:
    """``mask`` as a 2-D bool array (non-zero is inside), checked against ``shape``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InvalidMask(f"a mask must be 2-D (height, width), got shape {mask.shape}")
    if shape is not None:
        require_shape(mask, shape)
    return mask if mask.dtype == bool else mask != 0


def require_shape(array: np.ndarray, shape: tuple[int, int], what: str = "mask") -> None:
    """``InvalidMask`` unless ``array`` is exactly (height, width) = ``shape``: a mask of
    another size is a mistake upstream, never something to pad or stretch."""
    if array.shape != tuple(shape):
        raise InvalidMask(
            f"{what} is {_wxh(array.shape)} but the image is {_wxh(shape)}; "
            "it must match the image exactly",
            mask_shape=list(array.shape),
            image_shape=list(shape),
        )


def _wxh(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape[1::-1]) if len(shape) == 2 else f"shape {shape}"


def bbox(mask: np.ndarray) -> Optional[list[int]]:
    """[x, y, width, height] of the smallest box holding the mask, or None when empty."""
    mask = as_mask(mask)
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    x, y = int(cols[0]), int(rows[0])
    return [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1]


def area(mask: np.ndarray) -> int:
    """Pixels inside the mask."""
    return int(np.count_nonzero(mask))


def rle_encode(mask: np.ndarray) -> dict[str, list[int]]:
    """Uncompressed COCO RLE: ``{"size": [h, w], "counts": [...]}``.

    As COCO defines it: pixels in column-major (Fortran) order, counts of alternating runs
    starting with a run of zeros (0 when the first pixel is set).
    """
    mask = as_mask(mask)
    height, width = mask.shape
    if _count_changes is None or mask.size == 0:
        return rle_encode_reference(mask)
    positions, _, _ = _changes(mask.view(np.uint8))
    return {"size": [height, width], "counts": _runs(positions, mask.size, bool(mask[0, 0]))}


def rle_encode_reference(mask: np.ndarray) -> dict[str, list[int]]:
    """``rle_encode`` on the transposed, flattened mask: the reference."""
    mask = as_mask(mask)
    height, width = mask.shape
    flat = mask.ravel(order="F")
    if flat.size == 0:
        return {"size": [height, width], "counts": []}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(edges)
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [height, width], "counts": counts.tolist()}


def rle_encode_labels(labels: np.ndarray, ids: Any) -> dict[int, dict[str, list[int]]]:
    """``rle_encode(labels == i)`` for each ``i`` in ``ids``, from one pass over the label
    map: every place where the label changes (in COCO's column-major order) is a run
    boundary of the segments on either side of it."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidMask(f"a label map must be a 2-D integer array, got {labels.dtype}")
    ids = [int(i) for i in ids]
    if _count_changes is None or labels.size == 0:
        return {i: rle_encode_reference(labels == i) for i in ids}
    height, width = labels.shape
    positions, before, after = _changes(labels)
    out = {}
    for i in ids:
        at = positions[(before == i) | (after == i)]
        out[i] = {"size": [height, width], "counts": _runs(at, labels.size, labels[0, 0] == i)}
    return out


def _runs(positions: np.ndarray, total: int, first_set: bool) -> list[int]:
    """COCO counts from the sorted positions where the value changes."""
    edges = np.empty(positions.size + 2, np.int64)
    edges[0], edges[-1] = 0, total
    edges[1:-1] = positions
    counts = np.diff(edges)
    return ([0] if first_set else []) + counts.tolist()


def _changes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions in column-major order where ``values`` differs from the value before,
    ascending; the value before; the value there). Counted per column, then written per
    column in row order, so no transposed copy of the image is made."""
    height, width = values.shape
    per_column = np.zeros(width, np.int64)
    _count_changes(values, per_column)
    offsets = np.zeros(width + 1, np.int64)
    np.cumsum(per_column, out=offsets[1:])
    n = int(offsets[-1])
    positions = np.empty(n, np.int64)
    before, after = np.empty(n, values.dtype), np.empty(n, values.dtype)
    _fill_changes(values, offsets, positions, before, after)
    return positions, before, after


def _count_changes_py(values, per_column):  # pragma: no cover - numba
    height, width = values.shape
    for x in range(1, width):  # a column's first pixel against the previous column's last
        per_column[x] += values[0, x] != values[height - 1, x - 1]
    for y in range(1, height):
        above, row = values[y - 1], values[y]
        for x in range(width):
            per_column[x] += above[x] != row[x]


def _fill_changes_py(values, offsets, positions, before, after):  # pragma: no cover
    height, width = values.shape
    slot = offsets[:-1].copy()
    for x in range(1, width):
        if values[0, x] != values[height - 1, x - 1]:
            i = slot[x]
            positions[i] = x * height
            before[i], after[i] = values[height - 1, x - 1], values[0, x]
            slot[x] = i + 1
    for y in range(1, height):
        above, row = values[y - 1], values[y]
        for x in range(width):
            if above[x] != row[x]:
                i = slot[x]
                positions[i] = x * height + y
                before[i], after[i] = above[x], row[x]
                slot[x] = i + 1


_count_changes = accel.kernel(_count_changes_py)
_fill_changes = accel.kernel(_fill_changes_py)


def rle_decode(rle: Any) -> np.ndarray:
    """Inverse of ``rle_encode``; a malformed RLE is ``InvalidMask``."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise InvalidMask("an RLE must be an object with 'size' [height, width] and 'counts'")
    size, counts = rle["size"], rle["counts"]
    if isinstance(counts, (str, bytes)):
        raise InvalidMask("compressed RLE strings are not supported; send counts as a list")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(_is_count(v) for v in size)
    ):
        raise InvalidMask(f"RLE 'size' must be [height, width] of non-negative ints, got {size!r}")
    if not isinstance(counts, (list, tuple)) or not all(_is_count(c) for c in counts):
        raise InvalidMask("RLE 'counts' must be a list of non-negative ints")
    height, width = int(size[0]), int(size[1])
    runs = np.asarray(counts, dtype=np.int64)
    if int(runs.sum()) != height * width:
        raise InvalidMask(
            f"RLE counts add up to {int(runs.sum())} pixels, but size {height}x{width} "
            f"has {height * width}"
        )
    values = np.arange(runs.size) % 2 == 1
    flat = np.repeat(values, runs)
    return np.ascontiguousarray(flat.reshape(width, height).T)


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def mask_to_png(mask: np.ndarray) -> bytes:
    """The mask as a 1-bit PNG (white inside)."""
    return png.write_png(png.Source.from_array(as_mask(mask), "1"))


def mask_from_png(
    data: bytes,
    expected_size: Optional[tuple[int, int]] = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """A bool mask from a PNG: 1-bit, or 8-bit gray with one level besides black (a 0/255
    or 0/1 mask). ``expected_size`` is (height, width); any other size, or more than
    ``max_pixels``, is ``InvalidMask``, found from the header before any pixel is decoded."""
    img = _open_png(data, expected_size, max_pixels, what="mask")
    if img.mode == "1":
        return np.asarray(img).copy()
    if img.mode != "L":
        raise InvalidMask(f"a mask PNG must be 1-bit or 8-bit grayscale, got mode {img.mode}")
    values = np.asarray(img)
    levels = np.unique(values)
    if levels.size > 2 or (levels.size == 2 and levels[0] != 0):
        raise InvalidMask(
            f"not a binary mask: {levels.size} gray levels; expected black and one other"
        )
    return values != 0


def label_map_to_png(segmentation: np.ndarray) -> bytes:
    """Segment ids (0..65535, 0 for no segment) as a 16-bit grayscale PNG."""
    labels = np.asarray(segmentation)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidMask(
            f"a label map must be a 2-D integer array, got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > MAX_LABEL):
        raise InvalidMask(f"segment ids must be within 0..{MAX_LABEL} to fit a 16-bit PNG")
    # rows are cast to 16 bits a strip at a time, never as a second full-size array
    return png.write_png(png.Source.from_array(labels, "I;16"))


def label_map_from_png(
    data: bytes,
    expected_size: Optional[tuple[int, int]] = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """The int32 label map from a 16-bit (or 8-bit) grayscale PNG; sizes as for masks."""
    img = _open_png(data, expected_size, max_pixels, what="label map")
    if img.mode not in ("I;16", "I;16B", "I", "L"):
        raise InvalidMask(f"a label map PNG must be grayscale, got mode {img.mode}")
    return np.asarray(img).astype(np.int32)


def _open_png(
    data: bytes, expected_size: Optional[tuple[int, int]], max_pixels: int, *, what: str
) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=["PNG"])
        if img.width * img.height > max_pixels:
            raise InvalidMask(
                f"{what} PNG is {img.width}x{img.height}, over the limit of {max_pixels} pixels"
            )
        if expected_size is not None and (img.height, img.width) != tuple(expected_size):
            height, width = expected_size
            raise InvalidMask(
                f"{what} PNG is {img.width}x{img.height} but should be {width}x{height} "
                "(width x height)"
            )
        img.load()
    except InvalidMask:
        raise
    except Exception as e:  # not a PNG, truncated or corrupt, in any of Pillow's types
        raise InvalidMask(f"{what} is not a readable PNG: {e}") from None
    return img
