"""Tiny ONNX models with the real input and output names, whose outputs are known functions
of their inputs, laid out like the hub repos. They check coordinate mapping, resizing and
label logic exactly without any weights (DESIGN.md section 5).

``build_sam2_repo(dir)`` -> ``dir/encoder.onnx``, ``dir/decoder.onnx``:
- encoder: channel mean of the image, average-pooled to each output's grid and broadcast to
  its channels (a few ms, no weights);
- decoder, on a 256x256 low-resolution grid where the 1024-frame coordinate ``q`` (the
  graph adds the half pixel, as the real one does) lies at grid index ``(q + 0.5) / 4 - 0.5``:
  candidate 0: a disk of radius ``SAM2_DISK_RADIUS`` around the mean of the foreground
  (label 1) points; candidate 1: the box between the points labelled 2 and 3; candidate 2:
  the complement of the disk. Logits are signed distances in grid pixels, so bilinear
  upsampling keeps the edges exact. IoU predictions are ``SAM2_SCORES`` without a box and
  ``SAM2_SCORES_WITH_BOX`` with one, plus 1000 x the sum of ``|mask_input|`` and
  ``has_mask_input``, so feeding anything but zeros there shows in the scores.

``build_detr_repo(dir, id2label=...)`` -> ``dir/onnx/model.onnx``, ``dir/config.json``: a
DETR whose queries (``DETR_QUERIES``) predict fixed classes with known logits and masks
covering known rectangles, in coordinates normalised to the image, at ``ceil(H/4) x
ceil(W/4)`` of whatever input size it gets.

The fixtures ``sam2_repo`` and ``detr_repo`` build each once per test session.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

SAM2_LOWRES = 256
SAM2_DISK_RADIUS = 12.0  # grid pixels
SAM2_SCORES = (0.5, 0.3, 0.1)
SAM2_SCORES_WITH_BOX = (0.5, 0.9, 0.1)

DETR_NUM_LABELS = 250  # logits are 251 wide; the last one is no-object
DETR_MASK_GAIN = 16.0  # mask logit per low-resolution pixel of distance inside the rectangle


@dataclass(frozen=True)
class DetrQuery:
    label_id: int  # DETR_NUM_LABELS = no-object
    logit: float  # the class logit; all the others are 0
    rect: tuple[float, float, float, float]  # x0, y0, x1, y1, normalised to the image
    cap: float = 30.0  # mask logits are clipped here; a negative cap makes a faint mask

    @property
    def score(self) -> float:
        """The class probability the softmax gives."""
        return math.exp(self.logit) / (math.exp(self.logit) + DETR_NUM_LABELS)


SKY, PERSON, CAR, BICYCLE, DOG, WALL = 187, 1, 3, 2, 18, 199
DETR_QUERIES: tuple[DetrQuery, ...] = (
    # faint everywhere: claims the pixels nobody else wants, then fails the mask test -> 0
    DetrQuery(WALL, 6.2, (-10, -10, 10, 10), cap=0.7),
    DetrQuery(DETR_NUM_LABELS, 12.0, (0.0, 0.0, 1.0, 1.0)),  # no-object: dropped
    # two overlapping skies: one segment. The first wins 0.5 / 0.55 of its area, over the
    # 0.8 overlap threshold; a larger overlap would drop it rather than fuse it.
    DetrQuery(SKY, 6.0, (0.0, 0.0, 0.55, 0.3)),
    DetrQuery(SKY, 7.0, (0.5, 0.0, 1.0, 0.3)),
    DetrQuery(PERSON, 9.0, (0.05, 0.4, 0.35, 0.9)),  # two persons: two segments
    DetrQuery(PERSON, 8.0, (0.6, 0.4, 0.95, 0.9)),
    DetrQuery(CAR, 10.0, (0.4, 0.45, 0.52, 0.85)),  # config says LABEL_3: COCO's "car"
    DetrQuery(BICYCLE, 0.0, (0.4, 0.9, 0.6, 1.0)),  # score ~0.004: under the threshold
    DetrQuery(DOG, 6.5, (0.05, 0.4, 0.35, 0.9)),  # hidden behind the first person
)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _const(name: str, value) -> onnx.TensorProto:
    array = np.asarray(value)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return numpy_helper.from_array(array, name)


def _f32(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --- SAM 2 -----------------------------------------------------------------------------


def sam2_encoder_graph() -> onnx.GraphProto:
    n = helper.make_node
    nodes = [n("ReduceMean", ["image"], ["gray"], axes=[1], keepdims=1)]
    outputs = []
    for name, channels, stride in (
        ("high_res_feats_0", 32, 4),
        ("high_res_feats_1", 64, 8),
        ("image_embed", 256, 16),
    ):
        grid = 1024 // stride
        nodes += [
            n(
                "AveragePool",
                ["gray"],
                [f"{name}_pooled"],
                kernel_shape=[stride, stride],
                strides=[stride, stride],
            ),
            n("Expand", [f"{name}_pooled", f"{name}_shape"], [name]),
        ]
        outputs.append(_f32(name, [1, channels, grid, grid]))
    inits = [
        _const("high_res_feats_0_shape", np.array([1, 32, 256, 256], np.int64)),
        _const("high_res_feats_1_shape", np.array([1, 64, 128, 128], np.int64)),
        _const("image_embed_shape", np.array([1, 256, 64, 64], np.int64)),
    ]
    return helper.make_graph(
        nodes, "sam2_encoder", [_f32("image", [1, 3, 1024, 1024])], outputs, inits
    )


def sam2_decoder_graph() -> onnx.GraphProto:
    n = helper.make_node
    grid = np.arange(SAM2_LOWRES, dtype=np.float32)
    inits = [
        _const("grid_x", grid.reshape(1, 1, SAM2_LOWRES)),
        _const("grid_y", grid.reshape(1, SAM2_LOWRES, 1)),
        _const("radius", np.float32(SAM2_DISK_RADIUS)),
        _const("one", np.float32(1.0)),
        _const("two", np.float32(2.0)),
        _const("three", np.float32(3.0)),
        _const("half", np.float32(0.5)),
        _const("quarter", np.float32(0.25)),
        _const("thousand", np.float32(1000.0)),
        _const("axis1", np.array([1], np.int64)),
        _const("axis_last", np.array([-1], np.int64)),
        _const("x_index", np.array([0], np.int64)),
        _const("y_index", np.array([1], np.int64)),
        _const("base_scores", np.array([SAM2_SCORES], np.float32)),
        _const("box_bonus", np.array([np.subtract(SAM2_SCORES_WITH_BOX, SAM2_SCORES)], np.float32)),
    ]
    nodes = [
        # 1024-frame coordinates -> low-resolution grid indices: (q + 0.5) / 4 - 0.5
        n("Add", ["point_coords", "half"], ["coords_shifted"]),
        n("Mul", ["coords_shifted", "quarter"], ["coords_quartered"]),
        n("Sub", ["coords_quartered", "half"], ["grid_coords"]),  # [B, N, 2]
    ]

    def weighted_point(label: str, out: str) -> None:
        """The mean grid position of the points with ``label`` (0, 0 when there are none)."""
        nodes.extend(
            [
                n("Equal", ["point_labels", label], [f"{out}_is"]),
                n("Cast", [f"{out}_is"], [f"{out}_w"], to=TensorProto.FLOAT),  # [B, N]
                n("Unsqueeze", [f"{out}_w", "axis_last"], [f"{out}_w3"]),
                n("Mul", ["grid_coords", f"{out}_w3"], [f"{out}_wc"]),
                n("ReduceSum", [f"{out}_wc", "axis1"], [f"{out}_sum"], keepdims=0),  # [B, 2]
                n("ReduceSum", [f"{out}_w", "axis1"], [f"{out}_count"], keepdims=1),  # [B, 1]
                n("Max", [f"{out}_count", "one"], [f"{out}_denominator"]),
                n("Div", [f"{out}_sum", f"{out}_denominator"], [out]),
                n("Gather", [out, "x_index"], [f"{out}_x2"], axis=1),  # [B, 1]
                n("Gather", [out, "y_index"], [f"{out}_y2"], axis=1),
                n("Unsqueeze", [f"{out}_x2", "axis_last"], [f"{out}_x"]),  # [B, 1, 1]
                n("Unsqueeze", [f"{out}_y2", "axis_last"], [f"{out}_y"]),
            ]
        )

    weighted_point("one", "fg")
    weighted_point("two", "tl")
    weighted_point("three", "br")
    nodes += [
        # candidate 0: radius - distance to the foreground centre
        n("Sub", ["grid_x", "fg_x"], ["dx"]),
        n("Sub", ["grid_y", "fg_y"], ["dy"]),
        n("Mul", ["dx", "dx"], ["dx2"]),
        n("Mul", ["dy", "dy"], ["dy2"]),
        n("Add", ["dx2", "dy2"], ["d2"]),
        n("Sqrt", ["d2"], ["distance"]),
        n("Sub", ["radius", "distance"], ["disk"]),  # [B, 256, 256]
        # candidate 1: inside the box by this many grid pixels
        n("Sub", ["grid_x", "tl_x"], ["left"]),
        n("Sub", ["br_x", "grid_x"], ["right"]),
        n("Sub", ["grid_y", "tl_y"], ["top"]),
        n("Sub", ["br_y", "grid_y"], ["bottom"]),
        n("Min", ["left", "right", "top", "bottom"], ["box"]),
        # candidate 2: outside the disk
        n("Neg", ["disk"], ["outside"]),
        n("Unsqueeze", ["disk", "axis1"], ["disk4"]),
        n("Unsqueeze", ["box", "axis1"], ["box4"]),
        n("Unsqueeze", ["outside", "axis1"], ["outside4"]),
        n("Concat", ["disk4", "box4", "outside4"], ["masks"], axis=1),
        # scores: fixed, better for the box when there is one, spoilt by a non-zero mask input
        n("ReduceMax", ["tl_w"], ["has_box"], axes=[1], keepdims=1),  # [B, 1]
        n("Mul", ["has_box", "box_bonus"], ["bonus"]),
        n("Abs", ["mask_input"], ["mask_abs"]),
        n("ReduceSum", ["mask_abs"], ["mask_sum"], keepdims=0),
        n("ReduceSum", ["has_mask_input"], ["has_mask_sum"], keepdims=0),
        n("Add", ["mask_sum", "has_mask_sum"], ["spoil_raw"]),
        n("Mul", ["spoil_raw", "thousand"], ["spoil"]),
        n("Add", ["base_scores", "bonus"], ["clean_scores"]),
        n("Add", ["clean_scores", "spoil"], ["iou_predictions"]),
    ]
    inputs = [
        _f32("image_embed", [1, 256, 64, 64]),
        _f32("high_res_feats_0", [1, 32, 256, 256]),
        _f32("high_res_feats_1", [1, 64, 128, 128]),
        _f32("point_coords", ["num_labels", "num_points", 2]),
        _f32("point_labels", ["num_labels", "num_points"]),
        _f32("mask_input", ["num_labels", 1, 256, 256]),
        _f32("has_mask_input", ["num_labels"]),
    ]
    outputs = [
        _f32("masks", ["num_labels", 3, 256, 256]),
        _f32("iou_predictions", ["num_labels", 3]),
    ]
    return helper.make_graph(nodes, "sam2_decoder", inputs, outputs, inits)


def build_sam2_repo(directory: Path) -> Path:
    """``directory`` with ``encoder.onnx`` and ``decoder.onnx`` (a few KB each)."""
    directory = Path(directory)
    _save(sam2_encoder_graph(), directory / "encoder.onnx")
    _save(sam2_decoder_graph(), directory / "decoder.onnx")
    return directory


def sam2_expected_centre(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    """Where the test decoder's disk for a point at (x, y) is centred, in output pixel
    indices, after the pipeline's mapping and upsampling."""

    def axis(v: float, size: int) -> float:
        grid = (v * 1024 / size + 0.5) / 4 - 0.5
        return (grid + 0.5) * size / SAM2_LOWRES - 0.5

    return axis(x, width), axis(y, height)


# --- DETR ------------------------------------------------------------------------------


def detr_graph(queries: tuple[DetrQuery, ...] = DETR_QUERIES) -> onnx.GraphProto:
    n = helper.make_node
    count = len(queries)
    logits = np.zeros((1, count, DETR_NUM_LABELS + 1), np.float32)
    for i, q in enumerate(queries):
        logits[0, i, q.label_id] = q.logit
    rects = np.array([q.rect for q in queries], np.float32).reshape(count, 4, 1, 1)
    inits = [
        _const("logits_value", logits),
        _const("boxes_value", np.full((1, count, 4), 0.5, np.float32)),
        _const("x0", rects[:, 0]),
        _const("y0", rects[:, 1]),
        _const("x1", rects[:, 2]),
        _const("y1", rects[:, 3]),
        _const("caps", np.array([q.cap for q in queries], np.float32).reshape(count, 1, 1)),
        _const("gain", np.float32(DETR_MASK_GAIN)),
        _const("half", np.float32(0.5)),
        _const("i0", np.int64(0)),
        _const("i1", np.int64(1)),
        _const("i2", np.array(2, np.int64)),
        _const("i3", np.array(3, np.int64)),
        _const("four", np.int64(4)),
        _const("axis0", np.array([0], np.int64)),
        _const("axis_hw", np.array([0, 2], np.int64)),
    ]
    nodes = [
        n("Shape", ["pixel_values"], ["input_shape"]),
        # every pixel_mask value must be 1: the logits are multiplied by its minimum
        n("ReduceMin", ["pixel_mask"], ["mask_min"], keepdims=0),
        n("Cast", ["mask_min"], ["mask_min_f"], to=TensorProto.FLOAT),
        n("Mul", ["logits_value", "mask_min_f"], ["logits"]),
        n("Identity", ["boxes_value"], ["pred_boxes"]),
    ]
    for axis, index, lo, hi, unsq in (
        ("y", "i2", "y0", "y1", "axis_hw"),
        ("x", "i3", "x0", "x1", None),
    ):
        nodes += [
            n("Gather", ["input_shape", index], [f"{axis}_in"], axis=0),
            n("Add", [f"{axis}_in", "i3"], [f"{axis}_ceil_num"]),
            n("Div", [f"{axis}_ceil_num", "four"], [f"{axis}_cells"]),  # ceil(size / 4)
            n("Range", ["i0", f"{axis}_cells", "i1"], [f"{axis}_range"]),
            n("Cast", [f"{axis}_range"], [f"{axis}_index"], to=TensorProto.FLOAT),
            n("Add", [f"{axis}_index", "half"], [f"{axis}_centre"]),  # grid pixel centres
            n("Cast", [f"{axis}_cells"], [f"{axis}_cells_f"], to=TensorProto.FLOAT),
            n("Mul", [lo, f"{axis}_cells_f"], [f"{axis}_lo"]),  # [Q, 1, 1]
            n("Mul", [hi, f"{axis}_cells_f"], [f"{axis}_hi"]),
        ]
        centre = f"{axis}_centre"
        if unsq:  # y runs down the rows: [h] -> [1, h, 1]
            nodes.append(n("Unsqueeze", [centre, unsq], [f"{axis}_grid"]))
        else:  # x runs along a row: [w] -> [1, 1, w] by broadcasting
            nodes.append(n("Identity", [centre], [f"{axis}_grid"]))
        nodes += [
            n("Sub", [f"{axis}_grid", f"{axis}_lo"], [f"{axis}_from_lo"]),
            n("Sub", [f"{axis}_hi", f"{axis}_grid"], [f"{axis}_from_hi"]),
        ]
    nodes += [
        n("Min", ["y_from_lo", "y_from_hi", "x_from_lo", "x_from_hi"], ["inside"]),  # [Q, h, w]
        n("Mul", ["inside", "gain"], ["mask_raw"]),
        n("Min", ["mask_raw", "caps"], ["mask_capped"]),
        n("Unsqueeze", ["mask_capped", "axis0"], ["pred_masks"]),
    ]
    inputs = [
        _f32("pixel_values", ["batch_size", "num_channels", "height", "width"]),
        helper.make_tensor_value_info("pixel_mask", TensorProto.INT64, ["batch_size", 64, 64]),
    ]
    outputs = [
        _f32("logits", ["batch_size", count, DETR_NUM_LABELS + 1]),
        _f32("pred_boxes", ["batch_size", count, 4]),
        _f32("pred_masks", ["batch_size", count, "mask_height", "mask_width"]),
    ]
    return helper.make_graph(nodes, "detr_panoptic", inputs, outputs, inits)


def default_id2label() -> dict[int, str]:
    """Like the public config: real names for COCO ids, placeholders elsewhere, and the
    car (3) left as ``LABEL_3`` so the COCO fallback shows; sky named plainly "sky"."""
    from worker.inference.labels import COCO_PANOPTIC

    names = {i: COCO_PANOPTIC.get(i, f"LABEL_{i}") for i in range(DETR_NUM_LABELS)}
    names[CAR] = "LABEL_3"
    names[SKY] = "sky"
    return names


def build_detr_repo(
    directory: Path,
    id2label: Optional[dict[int, str]] = None,
    queries: tuple[DetrQuery, ...] = DETR_QUERIES,
) -> Path:
    """``directory`` with ``onnx/model.onnx`` and ``config.json`` (``id2label``)."""
    directory = Path(directory)
    _save(detr_graph(queries), directory / "onnx" / "model.onnx")
    labels = default_id2label() if id2label is None else id2label
    config = {"model_type": "detr", "id2label": {str(k): v for k, v in labels.items()}}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def rename_io(path: Path, old: str, new: str) -> Path:
    """Rename a graph input or output of the model at ``path`` in place (an incompatible
    export for tests)."""
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def sam2_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sam2_repo(tmp_path_factory.mktemp("sam2_repo"))


@pytest.fixture(scope="session")
def detr_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_detr_repo(tmp_path_factory.mktemp("detr_repo"))


# --- DETR with a mask head -------------------------------------------------------------
# The shape of the public export where the memory goes: decoder states per query, logits
# from them, and a mask head that attends each query to the image features, repeats those
# features once per query and runs convolutions with a per-sample norm over every query.
# The query count is baked in as torch's tracer bakes it: a Tile by [1, Q, 1, 1, 1] and a
# Reshape to [1, Q, h, w] from Constant nodes.


def detr_mask_head_graph(queries: int = 12, *, mix_queries: bool = False, seed: int = 0) -> onnx.GraphProto:
    """Random weights; ``mix_queries``: the attention's softmax runs across the queries
    (a head whose queries are not independent, which cannot be run in chunks)."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    d, labels = 8, DETR_NUM_LABELS + 1

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32)

    def constant(name: str, value: list[int]) -> onnx.NodeProto:
        return n("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int64)))

    inits = [
        _const("backbone_w", w(d, 3, 4, 4)),
        _const("query_embed", rng.standard_normal((1, queries, d)).astype(np.float32)),
        _const("decoder_w", w(d, d)),
        _const("class_w", w(d, labels) * 4),
        _const("box_w", w(d, 4)),
        _const("q_w", w(d, d)),
        _const("k_w", w(d, d, 1, 1)),
        _const("adapter_w", w(d, d, 1, 1)),
        _const("conv1_w", w(4, d + 1, 3, 3)),
        _const("conv1_b", w(4)),
        _const("norm_scale", np.ones(4, np.float32)),
        _const("norm_bias", np.zeros(4, np.float32)),
        _const("out_w", w(1, 4, 1, 1) * 8),
        _const("out_b", np.array([0.5], np.float32)),
        _const("attention_gain", np.float32(400.0)),
        _const("axis1", np.array([1], np.int64)),
        _const("hw_index", np.array([2, 3], np.int64)),
    ]
    nodes = [
        # trunk: a stride-4 "backbone", decoder states from learnt queries and the image
        n("Conv", ["pixel_values", "backbone_w"], ["features"], strides=[4, 4]),
        n("ReduceMean", ["features"], ["pooled"], axes=[2, 3], keepdims=0),  # opset 17
        n("Unsqueeze", ["pooled", "axis1"], ["pooled_q"]),
        n("Add", ["query_embed", "pooled_q"], ["states_in"]),
        n("MatMul", ["states_in", "decoder_w"], ["states_lin"]),
        n("Tanh", ["states_lin"], ["states"]),  # [1, Q, d]
        n("MatMul", ["states", "class_w"], ["logits_raw"]),
        n("ReduceMin", ["pixel_mask"], ["mask_min"], keepdims=0),
        n("Cast", ["mask_min"], ["mask_min_f"], to=TensorProto.FLOAT),
        n("Mul", ["logits_raw", "mask_min_f"], ["logits"]),
        n("MatMul", ["states", "box_w"], ["boxes_raw"]),
        n("Sigmoid", ["boxes_raw"], ["pred_boxes"]),
        # mask head: each query's attention map over the image features
        n("Shape", ["features"], ["features_shape"]),
        n("Gather", ["features_shape", "hw_index"], ["hw"]),
        n("MatMul", ["states", "q_w"], ["q"]),  # [1, Q, d]
        n("Conv", ["features", "k_w"], ["k"]),  # [1, d, h, w]
        constant("flat_shape", [1, d, -1]),
        n("Reshape", ["k", "flat_shape"], ["k_flat"]),
        n("MatMul", ["q", "k_flat"], ["scores"]),  # [1, Q, h*w]
        n("Softmax", ["scores"], ["attention_p"], axis=1 if mix_queries else -1),
        n("Mul", ["attention_p", "attention_gain"], ["attention"]),  # weigh in beside the features
        constant("q_count", [queries]),
        constant("one", [1]),
        n("Concat", ["q_count", "one", "hw"], ["attention_shape"], axis=0),
        n("Reshape", ["attention", "attention_shape"], ["attention_maps"]),  # [Q, 1, h, w]
        # the image's features repeated once per query, as torch's tracer writes repeat()
        n("Conv", ["features", "adapter_w"], ["adapted"]),
        n("Unsqueeze", ["adapted", "axis1"], ["adapted_1"]),
        constant("repeats", [1, queries, 1, 1, 1]),
        n("Tile", ["adapted_1", "repeats"], ["adapted_q"]),  # [1, Q, d, h, w]
        constant("minus_one_d", [-1, d]),
        n("Concat", ["minus_one_d", "hw"], ["per_query_shape"], axis=0),
        n("Reshape", ["adapted_q", "per_query_shape"], ["per_query"]),  # [Q, d, h, w]
        n("Concat", ["per_query", "attention_maps"], ["head_in"], axis=1),
        n("Conv", ["head_in", "conv1_w", "conv1_b"], ["conv1"], pads=[1, 1, 1, 1]),
        n("InstanceNormalization", ["conv1", "norm_scale", "norm_bias"], ["norm1"]),
        n("Relu", ["norm1"], ["relu1"]),
        n("Conv", ["relu1", "out_w", "out_b"], ["masks_q"]),  # [Q, 1, h, w]
        constant("batch_one", [1]),
        n("Concat", ["batch_one", "q_count", "hw"], ["masks_shape"], axis=0),
        n("Reshape", ["masks_q", "masks_shape"], ["pred_masks"]),
    ]
    inputs = [
        _f32("pixel_values", ["batch_size", "num_channels", "height", "width"]),
        helper.make_tensor_value_info("pixel_mask", TensorProto.INT64, ["batch_size", 64, 64]),
    ]
    outputs = [
        _f32("logits", ["batch_size", queries, labels]),
        _f32("pred_boxes", ["batch_size", queries, 4]),
        _f32("pred_masks", ["batch_size", queries, "mask_height", "mask_width"]),
    ]
    return helper.make_graph(nodes, "detr_mask_head", inputs, outputs, inits)


def build_detr_mask_head_repo(directory: Path, **options) -> Path:
    """``directory`` with a ``detr_mask_head_graph`` model and the test labels."""
    directory = Path(directory)
    _save(detr_mask_head_graph(**options), directory / "onnx" / "model.onnx")
    labels = {str(k): v for k, v in default_id2label().items()}
    (directory / "config.json").write_text(json.dumps({"model_type": "detr", "id2label": labels}))
    return directory
