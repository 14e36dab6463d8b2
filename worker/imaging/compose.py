"""Pictures made from an image and its masks: cutouts (RGBA) and colour overlays (RGB)."""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from config.errors import InvalidMask
from worker.imaging import accel, png
from worker.imaging.decode import DecodedImage
from worker.imaging.encode import encode_png
from worker.imaging.masks import MAX_LABEL, as_mask, bbox, require_shape

RGB = tuple[int, int, int]
Masks = Union[Sequence[np.ndarray], np.ndarray]

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
OUTLINE_WIDTH = 2
STRIP_ROWS = 32  # rows of the image read out of Pillow at a time: they stay in cache


def palette_color(index: int) -> RGB:
    """The colour of segment ``index`` (label id ``index + 1``), the same in every run.

    Hues step round the circle by the golden ratio, so neighbouring indices land far apart
    and any first few segments are evenly spread, at a saturation and brightness that keep
    the image readable underneath.
    """
    hue = (0.1 + index * _GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def cutout(image: DecodedImage, mask: np.ndarray, *, crop: bool = False) -> Image.Image:
    """The image's own pixels with ``mask`` as alpha (255 inside, 0 outside), RGBA.

    An image that already has alpha keeps it inside the mask (``mask * 255 * alpha / 255``,
    which is exact for a binary mask). ``crop`` cuts the result to the mask's bounding box;
    an empty mask has none, so that is ``InvalidMask`` rather than a silent 1x1 image.
    """
    source, mask, alpha, (x, y, w, h) = _cutout_parts(image, mask, crop)
    if _cut_rows is None:
        return cutout_reference(source, mask, alpha, (x, y, w, h))
    # Compiled: each strip of the picture read out of Pillow and written with its alpha into
    # one RGBA array, which the returned image shares (Image.fromarray maps RGBA arrays).
    out = np.empty((h, w, 4), np.uint8)
    mask = mask[y : y + h, x : x + w]
    alpha = alpha[y : y + h, x : x + w] if alpha is not None else np.empty((0, 0), np.uint8)

    def rows(top: int, bottom: int) -> None:
        for start in range(top, bottom, STRIP_ROWS):
            stop = min(start + STRIP_ROWS, bottom)
            pixels = np.asarray(source.crop((x, y + start, x + w, y + stop)))
            _cut_rows(pixels, mask, alpha, out, start, stop)

    accel.split_rows(rows, h)
    picture = Image.fromarray(out)  # RGBA, sharing the array's memory
    picture.info = source.info.copy()  # as convert() keeps it: an ICC profile goes along
    png.share_pixels(picture, out)  # so the PNG writer reads the array itself
    return picture


def cutout_png(
    image: DecodedImage, mask: np.ndarray, *, crop: bool = False
) -> tuple[bytes, tuple[int, int]]:
    """``(encode_png(cutout(image, mask, crop=crop)), its size)`` without the full-size
    RGBA picture: each strip is composed where the PNG writer filters and deflates it, on
    its threads. The same pixels (tested)."""
    source, mask, alpha, (x, y, w, h) = _cutout_parts(image, mask, crop)
    if _cut_rows is None:
        return encode_png(cutout_reference(source, mask, alpha, (x, y, w, h))), (w, h)
    mask = mask[y : y + h, x : x + w]
    alpha = alpha[y : y + h, x : x + w] if alpha is not None else np.empty((0, 0), np.uint8)

    def read(top: int, bottom: int) -> np.ndarray:
        pixels = np.asarray(source.crop((x, y + top, x + w, y + bottom)))
        out = png.strip_buffer((bottom - top, w, 4))
        strip_alpha = alpha[top:bottom] if alpha.shape[0] else alpha
        _cut_rows(pixels, mask[top:bottom], strip_alpha, out, 0, bottom - top)
        return out

    source.load()  # before the writer's threads read it
    data = png.write_png(png.Source("RGBA", w, h, read), icc_profile=_icc(source))
    return data, (w, h)


def _cutout_parts(image: DecodedImage, mask: np.ndarray, crop: bool):
    """(picture, mask, alpha or None, (x, y, width, height) of the cutout)."""
    _require_full_resolution(image)
    mask = as_mask(mask, (image.height, image.width))
    source = image.rgba if image.rgba is not None else image.rgb
    if crop:
        box = bbox(mask)
        if box is None:
            raise InvalidMask("the mask is empty, so there is nothing to crop to")
        return source, mask, image.alpha, tuple(box)
    return source, mask, image.alpha, (0, 0, image.width, image.height)


def _icc(img: Image.Image) -> Optional[bytes]:
    """The ICC profile Pillow's PNG encoder would carry over from ``img``."""
    return img.info.get("icc_profile")


def cutout_reference(
    source: Image.Image, mask: np.ndarray, alpha: Optional[np.ndarray], box: Sequence[int]
) -> Image.Image:
    """``cutout`` with Pillow and numpy on whole planes: the reference for the kernel."""
    x, y, w, h = box
    if (x, y, w, h) != (0, 0, *source.size):
        source = source.crop((x, y, x + w, y + h))
        mask = mask[y : y + h, x : x + w]
        alpha = alpha[y : y + h, x : x + w] if alpha is not None else None
    if alpha is None:
        cut_alpha = mask.view(np.uint8) * np.uint8(255)
    else:
        cut_alpha = np.where(mask, alpha, np.uint8(0))
    out = source.convert("RGBA")
    out.putalpha(Image.fromarray(cut_alpha))
    return out


def _cut_rows_py(pixels, mask, alpha, out, start, stop):  # pragma: no cover - numba
    """Rows ``start:stop`` of the cutout: the strip's colours (RGB or RGBA ``pixels``, row 0
    = ``start``) and, as alpha, 255 (or the image's own ``alpha``) inside ``mask``, else 0."""
    own_alpha = alpha.shape[0] > 0
    for y in range(start, stop):
        src, dst = pixels[y - start], out[y]
        for x in range(dst.shape[0]):
            dst[x, 0] = src[x, 0]
            dst[x, 1] = src[x, 1]
            dst[x, 2] = src[x, 2]
            inside = mask[y, x]
            if own_alpha:
                dst[x, 3] = alpha[y, x] if inside else 0
            else:
                dst[x, 3] = 255 if inside else 0


def overlay(
    image: DecodedImage,
    masks: Masks,
    *,
    alpha: float = 0.5,
    outline: bool = False,
    colors: Optional[Sequence[RGB]] = None,
) -> Image.Image:
    """The image with each segment tinted in its own colour, RGB.

    ``masks`` is a list of masks (segment ``i`` is ``masks[i]``; where masks overlap the
    later one is drawn) or a label map (segment ``i`` is label id ``i + 1``, 0 is none).
    Inside segment ``i`` each channel is ``floor(base * (1 - alpha) + colour * alpha + 0.5)``,
    computed in float64 (rounding half up); elsewhere the image is unchanged. ``colors[i]``
    replaces ``palette_color(i)``. ``outline`` paints the 2 pixels inside each segment's
    border in its full colour.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within 0..1, got {alpha}")
    _require_full_resolution(image)
    labels, count = _label_map(masks, (image.height, image.width))
    palette = _palette(count, colors)
    tinted = _blend_tables(palette, alpha)
    if _tint_rows is None:
        out = _tint_reference(tinted, labels, np.asarray(image.rgb))
    else:
        out = _tint(tinted, labels, image.rgb)
    if outline:
        border = _borders(labels)
        out[border] = palette[labels[border]]
    return Image.fromarray(out)


def overlay_png(
    image: DecodedImage,
    masks: Masks,
    *,
    alpha: float = 0.5,
    outline: bool = False,
    colors: Optional[Sequence[RGB]] = None,
) -> bytes:
    """``encode_png(overlay(...))`` without the full-size picture: each strip is tinted
    where the PNG writer filters and deflates it, on its threads. The same pixels
    (tested). With ``outline`` (borders need neighbouring rows) it composes first."""
    if outline or _tint_rows is None:
        return encode_png(overlay(image, masks, alpha=alpha, outline=outline, colors=colors))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within 0..1, got {alpha}")
    _require_full_resolution(image)
    labels, count = _label_map(masks, (image.height, image.width))
    tables = np.ascontiguousarray(_blend_tables(_palette(count, colors), alpha).reshape(3, -1))
    rgb, width = image.rgb, image.width

    def read(top: int, bottom: int) -> np.ndarray:
        base = np.asarray(rgb.crop((0, top, width, bottom)))
        out = png.strip_buffer((bottom - top, width, 3))
        _tint_rows(tables, labels[top:bottom], base, out, 0, bottom - top)
        return out

    rgb.load()
    return png.write_png(png.Source("RGB", width, image.height, read))


def _tint_reference(tinted: np.ndarray, labels: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Each output value a table lookup at (segment, channel, base value): exact, and one
    gather per channel instead of float arithmetic on every pixel. The reference."""
    row = labels.astype(np.intp) << 8
    out = np.empty_like(base)
    for channel in range(3):
        out[..., channel] = tinted[channel].ravel()[row | base[..., channel]]
    return out


def _tint(tinted: np.ndarray, labels: np.ndarray, rgb: Image.Image) -> np.ndarray:
    """``_tint_reference`` compiled, a strip of rows at a time on a thread per core, the
    picture read out of Pillow a strip at a time (never as a whole-image copy)."""
    height, width = labels.shape
    tables = np.ascontiguousarray(tinted.reshape(3, -1))
    out = np.empty((height, width, 3), np.uint8)

    def rows(top: int, bottom: int) -> None:
        for start in range(top, bottom, STRIP_ROWS):
            stop = min(start + STRIP_ROWS, bottom)
            base = np.asarray(rgb.crop((0, start, width, stop)))
            _tint_rows(tables, labels, base, out, start, stop)

    accel.split_rows(rows, height)
    return out


def _tint_rows_py(tables, labels, base, out, start, stop):  # pragma: no cover - numba
    for y in range(start, stop):
        src, dst, ids = base[y - start], out[y], labels[y]
        for x in range(dst.shape[0]):
            row = np.intp(ids[x]) << 8
            dst[x, 0] = tables[0, row + src[x, 0]]
            dst[x, 1] = tables[1, row + src[x, 1]]
            dst[x, 2] = tables[2, row + src[x, 2]]


_cut_rows = accel.kernel(_cut_rows_py)
_tint_rows = accel.kernel(_tint_rows_py)


def _require_full_resolution(image: DecodedImage) -> None:
    if image.is_reduced:
        raise ValueError(
            f"image was decoded at {image.rgb.width}x{image.rgb.height} (reduce_to) but is "
            f"{image.width}x{image.height}; cutouts and overlays need a full decode"
        )


def _label_map(masks: Masks, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """(HxW map of segment index + 1, 0 for none; number of segment rows the tables need)."""
    if isinstance(masks, np.ndarray) and masks.ndim == 2 and masks.dtype != bool:
        if not np.issubdtype(masks.dtype, np.integer):
            raise InvalidMask(f"a label map must hold integer ids, got {masks.dtype}")
        require_shape(masks, shape, "label map")
        labels = masks
        low, high = value_range(labels)
        if low < 0 or high > MAX_LABEL:
            raise InvalidMask(f"segment ids must be within 0..{MAX_LABEL}")
        return labels, high
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
    labels = np.zeros(shape, dtype=np.uint16)
    for index, mask in enumerate(masks):
        labels[as_mask(mask, shape)] = index + 1
    return labels, len(masks)


def value_range(values: np.ndarray) -> tuple[int, int]:
    """(min, max) of a 2-D integer array, (0, 0) when empty: one pass on a thread per core
    with numba, numpy's two otherwise."""
    if values.size == 0:
        return 0, 0
    if _range_rows is None:
        return int(values.min()), int(values.max())
    parts = accel.split_rows(lambda y0, y1: _range_rows(values, y0, y1), values.shape[0])
    return int(min(p[0] for p in parts)), int(max(p[1] for p in parts))


def _range_rows_py(values, y0, y1):  # pragma: no cover - numba
    low = high = values[y0, 0]
    for y in range(y0, y1):
        row = values[y]
        for x in range(row.shape[0]):
            v = row[x]
            low = min(low, v)
            high = max(high, v)
    return low, high


_range_rows = accel.kernel(_range_rows_py)


def _palette(count: int, colors: Optional[Sequence[RGB]]) -> np.ndarray:
    """(count + 1, 3) uint8: row ``i + 1`` is segment ``i``'s colour; row 0 is unused."""
    if colors is not None and len(colors) < count:
        raise ValueError(f"{len(colors)} colours given for {count} segments")
    chosen = [colors[i] if colors is not None else palette_color(i) for i in range(count)]
    return np.array([(0, 0, 0), *chosen], dtype=np.uint8).reshape(count + 1, 3)


def _blend_tables(palette: np.ndarray, alpha: float) -> np.ndarray:
    """(3, segments + 1, 256) uint8: the blended value of each base value per segment."""
    base = np.arange(256, dtype=np.float64)
    colour = palette.T.astype(np.float64)[..., None]
    tables = np.floor(base * (1.0 - alpha) + colour * alpha + 0.5).astype(np.uint8)
    tables[:, 0, :] = np.arange(256, dtype=np.uint8)  # no segment: the base itself
    return tables


def _borders(labels: np.ndarray) -> np.ndarray:
    """Pixels of a segment within OUTLINE_WIDTH of a different label, along rows or columns."""
    near_change = np.zeros(labels.shape, dtype=bool)
    for d in range(1, OUTLINE_WIDTH + 1):
        across = labels[:, d:] != labels[:, :-d]
        near_change[:, d:] |= across
        near_change[:, :-d] |= across
        down = labels[d:, :] != labels[:-d, :]
        near_change[d:, :] |= down
        near_change[:-d, :] |= down
    return near_change & (labels > 0)
