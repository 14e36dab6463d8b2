"""DETR's mask head run a chunk of queries at a time (worker/inference/maskhead.py): the cut
model gives the whole file's outputs bit for bit, and a file that cannot be cut runs whole."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from config.errors import ModelIncompatible
from config.settings import Settings
from tests.support.onnx_models import build_detr_mask_head_repo
from worker.inference.maskhead import CannotChunk, ChunkedDetr, head_nodes, load_chunked
from worker.inference.registry import ModelRegistry
from worker.inference.sessions import create_detr_session, create_session

QUERIES = 12


@pytest.fixture(scope="module")
def head_repo(tmp_path_factory) -> Path:
    return build_detr_mask_head_repo(tmp_path_factory.mktemp("detr_head"), queries=QUERIES)


def feeds(height: int, width: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pixel_values": rng.standard_normal((1, 3, height, width), dtype=np.float32),
        "pixel_mask": np.ones((1, 64, 64), np.int64),
    }


@pytest.mark.parametrize("chunk", [2, 5, QUERIES, 50])
@pytest.mark.parametrize("size", [(64, 96), (200, 152), (800, 1064)])
def test_the_cut_model_gives_the_whole_files_outputs_bit_for_bit(head_repo, chunk, size) -> None:
    path = head_repo / "onnx" / "model.onnx"
    whole = create_session(path, Settings())
    chunked = create_detr_session(path, Settings(detr_mask_chunk=chunk))
    assert isinstance(chunked, ChunkedDetr) and chunked.chunk == chunk
    names = ["logits", "pred_boxes", "pred_masks"]
    want = whole.run(names, feeds(*size))
    got = chunked.run(names, feeds(*size))
    for name, a, b in zip(names, want, got):
        assert a.shape == b.shape and np.array_equal(a, b), name
    assert want[2].shape == (1, QUERIES, size[0] // 4, size[1] // 4)
    assert not np.allclose(want[2][0, 0], want[2][0, 1])  # the queries' masks differ


def test_a_chunk_that_changes_the_arithmetic_is_refused(head_repo, caplog) -> None:
    """One query per run takes onnxruntime's batch-of-one convolution path, whose float sums
    differ in the last bits here: the probe at load sees it, and the file runs whole."""
    path = head_repo / "onnx" / "model.onnx"
    with caplog.at_level(logging.WARNING, logger="worker.inference.sessions"):
        session = create_detr_session(path, Settings(detr_mask_chunk=1))
    if isinstance(session, ChunkedDetr):  # another onnxruntime build may sum alike
        assert not caplog.text
    else:
        assert "differs from the whole model" in caplog.text
    want = create_session(path, Settings()).run(None, feeds(200, 152))
    assert all(np.array_equal(a, b) for a, b in zip(want, session.run(None, feeds(200, 152))))


def test_per_image_work_runs_once_and_only_query_work_in_chunks(head_repo) -> None:
    """The cut: the head reads the decoder's states sliced per chunk; the image-level parts of
    the mask head (the keys, the FPN adapter) run in the trunk, once per image."""
    chunked = create_detr_session(head_repo / "onnx" / "model.onnx", Settings(detr_mask_chunk=4))
    assert chunked.queries == ["states"]
    assert {"k_flat", "adapted_1"} <= set(chunked.shared)
    trunk_outputs = {o.name for o in chunked.trunk.get_outputs()}
    assert "pred_masks" not in trunk_outputs and {"logits", "pred_boxes"} <= trunk_outputs
    assert [o.name for o in chunked.head.get_outputs()] == ["pred_masks"]
    # the public face is the file's: same inputs, same outputs
    whole = create_session(head_repo / "onnx" / "model.onnx", Settings())
    assert [i.name for i in chunked.get_inputs()] == [i.name for i in whole.get_inputs()]
    assert [o.name for o in chunked.get_outputs()] == [o.name for o in whole.get_outputs()]
    # and it is called the way a session is: every output when none is named
    assert len(chunked.run(None, feeds(64, 64))) == 3


def test_the_query_count_the_tracer_baked_in_is_read_from_the_chunk(head_repo) -> None:
    """The file tiles the features by [1, 12, 1, 1, 1] and reshapes to [1, 12, h, w]: run on
    5 queries (and on the last 2), the head takes the chunk's count instead of the 12."""
    model = onnx.load(str(head_repo / "onnx" / "model.onnx"))
    only_masks, _ = head_nodes(model)
    assert {"Tile", "Reshape"} <= {model.graph.node[i].op_type for i in only_masks}
    chunked = create_detr_session(head_repo / "onnx" / "model.onnx", Settings(detr_mask_chunk=5))
    head_shapes = []
    real_run = chunked.head.run
    chunked.head = type("Spy", (), {"run": lambda self, names, f, o=None: head_shapes.append(
        f["states"].shape) or real_run(names, f, o)})()  # fmt: skip
    masks = chunked.run(["pred_masks"], feeds(96, 128))[0]
    assert masks.shape == (1, QUERIES, 24, 32)
    assert head_shapes == [(1, 5, 8), (1, 5, 8), (1, 2, 8)]


def test_a_head_whose_queries_see_each_other_runs_whole(tmp_path, caplog) -> None:
    """A softmax across the queries: a chunk would give other masks, the probe at load says
    so, and the worker loads the file whole (and logs why) rather than answer differently."""
    repo = build_detr_mask_head_repo(tmp_path, queries=QUERIES, mix_queries=True)
    path = repo / "onnx" / "model.onnx"
    with pytest.raises(CannotChunk, match="differs from the whole model"):
        load_chunked(path, lambda model: create_session_bytes(model), chunk=5)
    with caplog.at_level(logging.WARNING, logger="worker.inference.sessions"):
        session = create_detr_session(path, Settings(detr_mask_chunk=5))
    assert not isinstance(session, ChunkedDetr)
    assert "the mask head runs whole" in caplog.text and "differs" in caplog.text
    # one chunk as large as the queries is the whole head: that one cuts
    assert isinstance(create_detr_session(path, Settings(detr_mask_chunk=QUERIES)), ChunkedDetr)


def test_a_file_without_a_per_query_head_runs_whole(detr_repo, caplog) -> None:
    """The test suite's small DETR draws its masks from constants: nothing to cut."""
    with caplog.at_level(logging.WARNING, logger="worker.inference.sessions"):
        session = create_detr_session(detr_repo / "onnx" / "model.onnx", Settings())
    assert not isinstance(session, ChunkedDetr)
    assert "queries on its axis 1" in caplog.text


def test_a_file_that_is_no_onnx_fails_as_any_model_load_does(tmp_path) -> None:
    """The cut reads the file with onnx first; a broken file must still end in the worker's
    ModelIncompatible (from onnxruntime's own load), not in a protobuf error."""
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelIncompatible):
        create_detr_session(broken, Settings())


def test_zero_runs_the_file_whole(head_repo) -> None:
    session = create_detr_session(head_repo / "onnx" / "model.onnx", Settings(detr_mask_chunk=0))
    assert not isinstance(session, ChunkedDetr)


def test_the_worker_serves_panoptic_jobs_through_the_cut_model(head_repo, sam2_repo) -> None:
    """The registry loads DETR cut by default; the panoptic answer is the whole file's."""
    image = Image.effect_noise((150, 110), 60).convert("RGB")
    answers = []
    for chunk in (10, 0):
        registry = ModelRegistry(Settings(detr_dir=head_repo, sam2_dir=sam2_repo, detr_mask_chunk=chunk))
        model = registry.detr()
        assert isinstance(model.session, ChunkedDetr) == bool(chunk)
        result = model.predict(image, threshold=0.0, mask_threshold=0.005, overlap_threshold=0.0)
        answers.append(result)
    cut, whole = answers
    assert np.array_equal(cut.segmentation, whole.segmentation)
    assert cut.segments == whole.segments and len(cut.segments) > 1


def create_session_bytes(model: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])
