"""The model exporter (``bench.export_models``).

A ``--tiny`` export (shrunken networks, same inputs and outputs) must give files with the
exact names, shapes, IR version and opsets of the public exports, load in the worker through
``SEGQ_SAM2_DIR`` / ``SEGQ_DETR_DIR``, match transformers' forward, and give non-degenerate
outputs. The export needs torch and transformers, which the default environment lacks: those
tests are marked ``long`` and run by ``make test-long``, which installs them (or under the
interpreter ``SEGQ_EXPORT_PYTHON`` names). Without torch the command must say what to install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from config.settings import Settings
from worker.inference.registry import ModelRegistry
from worker.inference.labels import COCO_PANOPTIC

ROOT = Path(__file__).resolve().parents[1]
EXPORT_PYTHON = os.environ.get("SEGQ_EXPORT_PYTHON", sys.executable)


def _has_export_deps(python: str) -> bool:
    probe = "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('transformers')))"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def _run(python: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [python, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    assert _has_export_deps(EXPORT_PYTHON), (
        f"{EXPORT_PYTHON} lacks torch/transformers: run `make test-long` (it installs them) "
        "or set SEGQ_EXPORT_PYTHON"
    )
    out = tmp_path_factory.mktemp("models")
    done = _run(EXPORT_PYTHON, "-m", "bench.export_models", "--out", str(out), "--tiny", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max |onnxruntime - torch forward|" in done.stdout
    return out


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _io(session: ort.InferenceSession) -> tuple[dict, dict]:
    return (
        {i.name: (i.type, i.shape) for i in session.get_inputs()},
        {o.name: (o.type, o.shape) for o in session.get_outputs()},
    )


@pytest.mark.long
def test_sam2_files_have_the_samexporter_io(tiny_models):
    encoder = _session(tiny_models / "sam2" / "encoder.onnx")
    decoder = _session(tiny_models / "sam2" / "decoder.onnx")
    enc_in, enc_out = _io(encoder)
    assert enc_in == {"image": ("tensor(float)", [1, 3, 1024, 1024])}
    assert list(enc_out) == ["high_res_feats_0", "high_res_feats_1", "image_embed"]
    dec_in, dec_out = _io(decoder)
    assert list(dec_in) == [
        "image_embed", "high_res_feats_0", "high_res_feats_1",
        "point_coords", "point_labels", "mask_input", "has_mask_input",
    ]
    assert list(dec_out) == ["masks", "iou_predictions"]

    image = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    feats = dict(zip(enc_out, encoder.run(None, {"image": image})))
    assert {k: v.shape for k, v in feats.items()} == {
        "high_res_feats_0": (1, 32, 256, 256),
        "high_res_feats_1": (1, 64, 128, 128),
        "image_embed": (1, 256, 64, 64),
    }
    for points in (1, 4):  # the prompt length is dynamic
        masks, ious = decoder.run(None, {
            **feats,
            "point_coords": np.full((1, points, 2), 500.0, np.float32),
            "point_labels": np.ones((1, points), np.float32),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
        })
        assert masks.shape == (1, 3, 256, 256) and ious.shape == (1, 3)
        assert np.abs(masks).max() <= 32.0  # clamped like the public decoder


@pytest.mark.long
def test_detr_file_has_the_optimum_io(tiny_models):
    session = _session(tiny_models / "detr" / "onnx" / "model.onnx")
    inputs, outputs = _io(session)
    assert list(inputs) == ["pixel_values", "pixel_mask"]
    assert inputs["pixel_mask"][0] == "tensor(int64)" and inputs["pixel_mask"][1][1:] == [64, 64]
    assert list(outputs) == ["logits", "pred_boxes", "pred_masks"]
    for height, width in [(66, 97), (128, 96)]:  # any size; masks at ceil(H/4) x ceil(W/4)
        logits, boxes, masks = session.run(None, {
            "pixel_values": np.zeros((1, 3, height, width), np.float32),
            "pixel_mask": np.ones((1, 64, 64), np.int64),
        })
        assert logits.shape == (1, 100, 251) and boxes.shape == (1, 100, 4)
        assert masks.shape == (1, 100, -(-height // 4), -(-width // 4))


@pytest.mark.long
def test_files_load_in_onnxruntime_gpu_builds(tiny_models):
    limits = {"sam2/encoder.onnx": 17, "sam2/decoder.onnx": 17, "detr/onnx/model.onnx": 12}
    for name, opset in limits.items():
        model = onnx.load(str(tiny_models / name), load_external_data=False)
        assert model.ir_version <= 10, name
        assert {o.domain: o.version for o in model.opset_import}.get("", 0) == opset, name


@pytest.mark.long
def test_detr_config_names_labels_like_the_public_one(tiny_models):
    config = json.loads((tiny_models / "detr" / "config.json").read_text())
    id2label = {int(k): v for k, v in config["id2label"].items()}
    assert sorted(id2label) == list(range(250))
    assert id2label[1] == "person" and id2label[187] == "sky-other-merged"
    assert id2label[0] == id2label[12] == id2label[249] == "N/A"
    assert {v for v in id2label.values() if v != "N/A"} == set(COCO_PANOPTIC.values())


@pytest.mark.long
def test_export_matches_torch_and_is_not_degenerate(tiny_models):
    sam2 = json.loads((tiny_models / "sam2" / "export.json").read_text())
    detr = json.loads((tiny_models / "detr" / "export.json").read_text())
    for report in (sam2, detr):
        for key, diff in report["max_abs_diff"].items():
            limit = 0 if "flips" in key else 5e-3
            assert diff <= limit, (key, diff)
    assert all(v > 2.0 for k, v in sam2["onnx_outputs"].items() if "mask logit std" in k)
    assert detr["onnx_outputs"]["800x1066: queries scoring over 0.5"] == 8
    assert (tiny_models / "sam2" / "hf" / "config.json").exists()  # the same weights for torch


@pytest.mark.long
def test_checkpoint_export_reproduces_the_saved_weights(tiny_models, tmp_path):
    # hf/ beside a random export is a transformers checkpoint of exactly those weights, so
    # exporting it as "real weights" must give a model with the same outputs.
    done = _run(
        EXPORT_PYTHON, "-m", "bench.export_models", "--out", str(tmp_path),
        "--checkpoint-sam2", str(tiny_models / "sam2" / "hf"),
        "--checkpoint-detr", str(tiny_models / "detr" / "hf"),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "sam2" / "hf").exists()  # nothing to save: the user has them
    image = np.random.default_rng(2).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    pixels = image[:, :, :96, :128]
    mask = np.ones((1, 64, 64), np.int64)
    for name, feeds in [
        ("sam2/encoder.onnx", {"image": image}),
        ("detr/onnx/model.onnx", {"pixel_values": pixels, "pixel_mask": mask}),
    ]:
        want = _session(tiny_models / name).run(None, feeds)
        got = _session(tmp_path / name).run(None, feeds)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, atol=1e-5)
    labels = [json.loads((d / "detr" / "config.json").read_text())["id2label"] for d in (tmp_path, tiny_models)]
    assert labels[0] == labels[1]


@pytest.fixture(scope="module")
def full_size_detr(tmp_path_factory) -> Path:
    """The full-size DETR export: ``SEGQ_MODELS`` or ``/tmp/segq-models`` when they hold it
    (bench/README.md's block makes it earlier in the long run), else exported here."""
    for candidate in (os.environ.get("SEGQ_MODELS"), "/tmp/segq-models"):
        if candidate and (Path(candidate) / "detr" / "onnx" / "model.onnx").is_file():
            return Path(candidate) / "detr"
    out = tmp_path_factory.mktemp("full")
    done = _run(EXPORT_PYTHON, "-m", "bench.export_models", "--out", str(out), "--detr", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "detr"


def _cut_and_whole(path: Path, chunk: int) -> tuple[Any, ort.InferenceSession]:
    from worker.inference.sessions import create_detr_session, create_session

    settings = Settings(providers=["CPUExecutionProvider"], detr_mask_chunk=chunk)
    return create_detr_session(path, settings), create_session(path, settings)


def _same_outputs(cut: Any, whole: ort.InferenceSession, sizes: list[tuple[int, int]]) -> None:
    names = [o.name for o in whole.get_outputs()]
    rng = np.random.default_rng(2)
    for height, width in sizes:
        feeds = {
            "pixel_values": rng.standard_normal((1, 3, height, width), dtype=np.float32),
            "pixel_mask": np.ones((1, 64, 64), np.int64),
        }
        for name, want, got in zip(names, whole.run(names, feeds), cut.run(names, feeds)):
            assert want.shape == got.shape and np.array_equal(want, got), (name, height, width)


@pytest.mark.long
def test_the_full_size_detr_is_cut_and_gives_the_files_outputs_bit_for_bit(full_size_detr):
    """DETR's real architecture at full size, exported as the public file is: the worker cuts
    its mask head off at the decoder's query states and runs it 10 queries at a time; every
    output equals the whole file's at three input sizes (the shapes the pipeline feeds)."""
    from worker.inference.maskhead import ChunkedDetr

    cut, whole = _cut_and_whole(full_size_detr / "onnx" / "model.onnx", 10)
    assert isinstance(cut, ChunkedDetr), "the full-size DETR could not be cut (see the log)"
    assert len(cut.queries) == 1 and "decoder" in cut.queries[0]
    _same_outputs(cut, whole, [(800, 1066), (800, 800), (1333, 750)])


@pytest.mark.long
def test_the_tiny_detr_answers_like_the_file_cut_or_not(tiny_models, caplog):
    """The ``--tiny`` architecture's mask head narrows to 4 channels, where onnxruntime's
    blocked-layout convolutions are chosen by context: cut, one of them takes the plain path
    and sums in another order (1e-5 apart). The probe at load must see that and keep the file
    whole; either way the worker answers exactly as the file does."""
    from worker.inference.maskhead import ChunkedDetr

    with caplog.at_level("WARNING", logger="worker.inference.sessions"):
        cut, whole = _cut_and_whole(tiny_models / "detr" / "onnx" / "model.onnx", 10)
    if not isinstance(cut, ChunkedDetr):
        assert "differs from the whole model" in caplog.text
    _same_outputs(cut, whole, [(800, 1066), (480, 640)])


@pytest.mark.long
def test_worker_runs_the_exported_files(tiny_models):
    settings = Settings(
        sam2_dir=tiny_models / "sam2", detr_dir=tiny_models / "detr", offline=True,
        providers=["CPUExecutionProvider"],
    )
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "RGB")
    sam2 = ModelRegistry(settings).sam2()
    (best,) = sam2.predict(sam2.encode(image), None)
    assert best.mask.shape == (90, 120) and best.mask.dtype == bool
    result = ModelRegistry(settings).detr().predict(image)
    assert result.segmentation.shape == (90, 120)
    assert {s.label for s in result.segments} <= set(COCO_PANOPTIC.values())


def test_without_torch_the_command_says_what_to_install(tmp_path):
    # Hide torch even where it is installed: the message, not the environment, is under test.
    hide_torch = (
        "import runpy, sys; sys.modules['torch'] = None; "
        "runpy.run_module('bench.export_models', run_name='__main__')"
    )
    done = _run(sys.executable, "-c", hide_torch, "--out", str(tmp_path / "m"), timeout=60)
    assert done.returncode == 2
    assert "pip install 'segq[export]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "m").exists()
