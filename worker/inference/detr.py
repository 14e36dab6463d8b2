"""DETR panoptic over onnxruntime (Xenova layout: ``onnx/model.onnx`` plus ``config.json``).

Preprocessing and postprocessing follow transformers' ``DetrImageProcessor`` (PIL backend)
and its ``post_process_panoptic_segmentation``: queries predicting no-object or scoring
under ``threshold`` are dropped; each kept query's mask probabilities are resized to the
image, weighted by the query's score, and every pixel goes to the query with the highest
weighted probability; a query becomes a segment if it won more than ``overlap_threshold``
of the pixels where its weighted probability reaches ``mask_threshold``. Stuff classes
(COCO ``isthing`` 0) fuse into one segment per class; things stay one segment per query.

Where transformers is surprising we differ on purpose, and only there:
- it can give two segments the same id when a fused stuff segment is followed by a new
  one (its id counter restarts from the stuff id); ids here are always distinct;
- with no query kept it returns a map of -1; here it is 0 (unassigned) like any other gap;
- it lists a fused segment once per query; here once, with the best of their scores.
Pixels are assigned a block of rows at a time, so memory stays a few blocks however many
queries are kept.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from worker.imaging import accel
from worker.inference.labels import label_name
from worker.inference.sessions import input_shape, ort, provider, require_io
from worker.inference.transforms import (
    ROWS_PER_BLOCK,
    BilinearRows,
    axis_weights,
    bilinear_columns,
    to_model_input,
    upsample_mask,
)

SHORTEST_EDGE = 800
LONGEST_EDGE = 1333


@dataclass(frozen=True)
class PanopticSegment:
    id: int  # its value in ``PanopticResult.segmentation``
    label_id: int
    label: str
    score: float  # class probability
    isthing: bool
    area: int  # pixels
    bbox: tuple[int, int, int, int]  # x, y, width, height in pixels


@dataclass(frozen=True)
class PanopticResult:
    segmentation: np.ndarray  # int32 (height, width): segment ids from 1, 0 = unassigned
    segments: list[PanopticSegment]


def model_input_size(
    width: int, height: int, shortest: int = SHORTEST_EDGE, longest: int = LONGEST_EDGE
) -> tuple[int, int]:
    """``(width, height)`` to resize to: shortest edge ``shortest`` unless the longest would
    pass ``longest``; transformers' ``get_size_with_aspect_ratio`` arithmetic, truncation
    included (640x480 -> 1066x800)."""
    short, long = min(width, height), max(width, height)
    exact_short = None
    if long / short * shortest > longest:
        exact_short = longest * short / long
        shortest = int(round(exact_short))
    if short == shortest:
        return width, height
    scaled_long = int((exact_short if exact_short is not None else shortest) * long / short)
    return (scaled_long, shortest) if width > height else (shortest, scaled_long)


class DetrPanopticModel:
    def __init__(
        self,
        session: ort.InferenceSession,
        id2label: Mapping[int, str],
        thing_ids: Collection[int],
        *,
        name: str = "detr",
    ) -> None:
        require_io(
            session, inputs=["pixel_values"], outputs=["logits", "pred_masks"], model_name=name
        )
        self.session = session
        self.id2label = dict(id2label)
        self.thing_ids = frozenset(thing_ids)
        self.name = name
        self._wants_pixel_mask = any(i.name == "pixel_mask" for i in session.get_inputs())
        warm_kernels()  # compiled (or loaded from numba's cache) before the first job

    @property
    def provider(self) -> str:
        return provider(self.session)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """float32 ``[1, 3, h, w]``: the image resized per ``model_input_size`` and normalised."""
        return to_model_input(image, *model_input_size(*image.size))

    def predict(
        self,
        image: Image.Image,
        *,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_threshold: float = 0.8,
        min_score: Optional[float] = None,
        size: Optional[tuple[int, int]] = None,
    ) -> PanopticResult:
        """Segments of ``image``, at ``size`` (width, height) when ``image`` is a reduced
        decode of a larger picture (default: its own size)."""
        pixel_values = self.preprocess(image)
        feeds = {"pixel_values": pixel_values}
        if self._wants_pixel_mask:
            # The public export fixes this at [1, 64, 64] (the graph resizes it); a
            # symbolic size means the model wants it at the input's size.
            shape = input_shape(self.session, "pixel_mask", (1, *pixel_values.shape[2:]))
            feeds["pixel_mask"] = np.ones(shape, np.int64)
        logits, pred_masks = self.session.run(["logits", "pred_masks"], feeds)
        return postprocess(
            logits[0],
            pred_masks[0],
            size or image.size,
            id2label=self.id2label,
            thing_ids=self.thing_ids,
            threshold=threshold,
            mask_threshold=mask_threshold,
            overlap_threshold=overlap_threshold,
            min_score=min_score,
        )


def postprocess(
    logits: np.ndarray,
    pred_masks: np.ndarray,
    size: tuple[int, int],
    *,
    id2label: Mapping[int, str],
    thing_ids: Collection[int],
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    min_score: Optional[float] = None,
) -> PanopticResult:
    """Segments at ``size`` (width, height) from one image's ``logits`` ``[Q, C+1]`` (last
    class: no-object) and ``pred_masks`` ``[Q, h, w]`` (mask logits)."""
    width, height = size
    probs = _softmax(logits.astype(np.float32))
    scores, labels = probs.max(-1), probs.argmax(-1)
    kept = np.flatnonzero((labels != logits.shape[-1] - 1) & (scores > threshold))
    if kept.size == 0:
        return PanopticResult(np.zeros((height, width), np.int32), [])
    scores, labels = scores[kept], labels[kept]
    fast = _assign_pixels_fast(pred_masks[kept], scores, height, width, mask_threshold)
    if fast is not None:
        owner, confident, won, boxes = fast
    else:
        owner, confident = _assign_pixels(pred_masks[kept], scores, height, width, mask_threshold)
        won, boxes = np.bincount(owner.ravel(), minlength=kept.size), None

    segment_of = np.zeros(kept.size, np.int32)  # per kept query; 0 = not a segment
    stuff_segment: dict[int, int] = {}
    parts: dict[int, list[int]] = {}
    for k in range(kept.size):
        if not (won[k] > 0 and confident[k] > 0 and won[k] / confident[k] > overlap_threshold):
            continue
        if min_score is not None and scores[k] < min_score:
            continue
        label_id = int(labels[k])
        fuse = label_id not in thing_ids
        segment_id = stuff_segment.get(label_id) if fuse else None
        if segment_id is None:
            segment_id = len(parts) + 1
            if fuse:
                stuff_segment[label_id] = segment_id
        segment_of[k] = segment_id
        parts.setdefault(segment_id, []).append(k)

    segmentation = _segment_map(segment_of, owner)
    segments = []
    for segment_id, ks in parts.items():
        label_id = int(labels[ks[0]])
        if boxes is not None:  # the union of its queries' boxes: the same pixels
            y0, x0 = boxes[ks, 0].min(), boxes[ks, 1].min()
            y1, x1 = boxes[ks, 2].max(), boxes[ks, 3].max()
            bbox = (int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1))
        else:
            bbox = _bbox(segmentation == segment_id)
        segments.append(
            PanopticSegment(
                id=segment_id,
                label_id=label_id,
                label=label_name(label_id, id2label),
                score=float(scores[ks].max()),
                isthing=label_id in thing_ids,
                area=int(won[ks].sum()),
                bbox=bbox,
            )
        )
    return PanopticResult(segmentation, segments)


def _assign_pixels(
    mask_logits: np.ndarray, scores: np.ndarray, height: int, width: int, mask_threshold: float
) -> tuple[np.ndarray, list[int]]:
    """For each pixel, the index of the query whose score-weighted mask probability is
    highest there (the first on ties, like argmax); and for each query, how many pixels
    reach ``mask_threshold``. A block of rows at a time, every query's values for the block
    while it is in cache: the same arithmetic as whole planes (12 MP, 15 queries: 345 ->
    191 ms), and memory stays a few blocks."""
    planes = [BilinearRows(_sigmoid(logits), height, width) for logits in mask_logits]
    owner = np.zeros((height, width), np.min_scalar_type(len(scores)))
    confident = np.zeros(len(scores), np.int64)
    best, value, scratch = (np.empty((ROWS_PER_BLOCK, width), np.float32) for _ in range(3))
    ahead = np.empty((ROWS_PER_BLOCK, width), np.bool_)
    for start in range(0, height, ROWS_PER_BLOCK):
        stop = min(start + ROWS_PER_BLOCK, height)
        n = stop - start
        for k, (plane, score) in enumerate(zip(planes, scores)):
            weighted = plane.block(start, stop, out=(best if k == 0 else value)[:n],
                                   scratch=scratch[:n])
            weighted *= score
            confident[k] += np.count_nonzero(weighted >= mask_threshold)
            if k:
                np.greater(weighted, best[:n], out=ahead[:n])
                owner[start:stop][ahead[:n]] = k
                np.maximum(best[:n], weighted, out=best[:n])
    return owner, confident.tolist()


def _assign_pixels_fast(
    mask_logits: np.ndarray, scores: np.ndarray, height: int, width: int, mask_threshold: float
) -> Optional[tuple[np.ndarray, list[int], np.ndarray, np.ndarray]]:
    """``_assign_pixels`` in one compiled pass per output row, on a thread per core, with
    the pixels each query won and their bounding box ((y0, x0, y1, x1) per query) counted
    on the way; None without numba (or for more than 255 kept queries). The same float32
    operations in the same order, so the same owners, bit for bit (tested)."""
    count = len(scores)
    if _assign_rows is None or count > 255:
        return None
    planes = np.stack([_sigmoid(logits) for logits in mask_logits])
    cols = bilinear_columns(planes, width)  # (queries, in_h, width), as BilinearRows.cols
    r0, r1, rw0, rw1 = axis_weights(planes.shape[1], height)
    owner = np.empty((height, width), np.uint8)
    scores32 = np.asarray(scores, np.float32)
    # numpy compares float32 values with a Python float threshold in float32 (NEP 50)
    threshold = np.float32(mask_threshold)

    def rows(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        confident, won = np.zeros(count, np.int64), np.zeros(count, np.int64)
        row_span = np.full((count, 2), -1, np.int64)
        columns = np.zeros((count, width), np.bool_)
        _assign_rows(cols, r0, r1, rw0, rw1, scores32, threshold, y0, y1, owner, confident,
                     won, row_span, columns)
        return confident, won, row_span, columns

    parts = accel.split_rows(rows, height, pieces=2 * accel.THREADS)
    confident = sum(p[0] for p in parts)
    won = sum(p[1] for p in parts)
    spans = np.stack([p[2] for p in parts])  # rows are split in order: first and last
    columns = np.logical_or.reduce([p[3] for p in parts])
    boxes = np.zeros((count, 4), np.int64)
    for k in range(count):
        found = spans[:, k, 0] >= 0
        if found.any():
            cols_k = np.flatnonzero(columns[k])
            boxes[k] = (spans[found, k, 0].min(), cols_k[0], spans[found, k, 1].max(), cols_k[-1])
    return owner, confident.tolist(), won, boxes


def _assign_rows_py(cols, r0, r1, rw0, rw1, scores, threshold, y0, y1, owner, confident,
                    won, row_span, columns):  # pragma: no cover - compiled by numba
    """Rows ``y0:y1`` of ``_assign_pixels``: each value is ``(cols[k, r0] * rw0 + cols[k,
    r1] * rw1) * score``, as ``BilinearRows.block`` then ``*= score`` compute it; the first
    query with the highest value owns the pixel. Branch-free inner loops (vectorised)."""
    count, width = cols.shape[0], cols.shape[2]
    best = np.empty(width, np.float32)
    own = np.zeros(width, np.uint8)
    for y in range(y0, y1):
        a, b, w0, w1 = r0[y], r1[y], rw0[y], rw1[y]
        for k in range(count):
            ca, cb, score = cols[k, a], cols[k, b], scores[k]
            kk = np.uint8(k)
            reached = 0
            if k == 0:
                for x in range(width):
                    v = (ca[x] * w0 + cb[x] * w1) * score
                    reached += v >= threshold
                    best[x] = v
                    own[x] = 0
            else:
                for x in range(width):
                    v = (ca[x] * w0 + cb[x] * w1) * score
                    reached += v >= threshold
                    ahead = v > best[x]
                    best[x] = v if ahead else best[x]
                    own[x] = kk if ahead else own[x]
            confident[k] += reached
        seen = np.zeros(count, np.bool_)
        for x in range(width):
            o = own[x]
            owner[y, x] = o
            won[o] += 1
            columns[o, x] = True
            seen[o] = True
        for k in range(count):
            if seen[k]:
                if row_span[k, 0] < 0:
                    row_span[k, 0] = y
                row_span[k, 1] = y


_assign_rows = accel.kernel(_assign_rows_py)


def warm_kernels() -> None:
    """Compile the post-processing and imaging kernels now (a no-op without numba): the
    first job should not pay numba's compile time (seconds; less from its disk cache)."""
    scores = np.array([0.9, 0.8], np.float32)
    masks = np.zeros((2, 2, 2), np.float32)
    if _assign_pixels_fast(masks, scores, 3, 3, 0.5) is not None:
        _segment_map(np.arange(2, dtype=np.int32), np.zeros((3, 3), np.uint8))
    upsample_mask(masks[0], 3, 3)
    accel.warm_imaging_kernels()


def _segment_map(segment_of: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """``segment_of[owner]`` (int32), gathered on a thread per core with numba."""
    if _gather_rows is None:
        return segment_of[owner]
    out = np.empty(owner.shape, np.int32)
    accel.split_rows(lambda y0, y1: _gather_rows(segment_of, owner, out, y0, y1),
                     owner.shape[0])
    return out


def _gather_rows_py(table, index, out, y0, y1):  # pragma: no cover - compiled by numba
    for y in range(y0, y1):
        for x in range(index.shape[1]):
            out[y, x] = table[index[y, x]]


_gather_rows = accel.kernel(_gather_rows_py)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflows to inf for very negative logits: 1/inf = 0
        return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
