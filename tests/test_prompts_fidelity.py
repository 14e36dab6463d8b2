"""Refinement and batched prompts match transformers' ``Sam2Model`` on the same weights.

The models are real-architecture, random-weight exports (``bench.export_models``, the
exporter of ``../shared/tools/refmodels``): ONNX files plus the same weights in transformers'
format (``sam2/hf``). Both sides get the same preprocessed image (segq's, which matches
transformers' processor to ~1e-7; DESIGN.md section 3), so what is compared is the prompt
path: several boxes in one batched decoder call against transformers' ``input_boxes`` of the
same boxes, and a click refining an earlier job's mask (segq's ``refine``: that job's best
low-resolution logits as ``mask_input``) against transformers' ``input_masks``. Masks at the
original size must agree with IoU >= 0.995.

Models: ``SEGQ_MODELS`` or ``/tmp/segq-models`` when they hold ``sam2/hf`` (``make
export-models``), else a ``--tiny`` export made here. Needs torch and transformers: long.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config.contract import Prompt
from config.settings import Settings
from worker.imaging import masks as maskio
from worker.pipelines import Pipelines

pytestmark = pytest.mark.long

ROOT = Path(__file__).resolve().parents[1]
SIZE = (640, 480)
BOXES = [(40, 60, 200, 180), (300, 100, 260, 300), (120, 250, 180, 200)]  # x, y, w, h
CLICKS = [(250, 200), (330, 260)]
MIN_IOU = 0.995


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    for candidate in (os.environ.get("SEGQ_MODELS"), "/tmp/segq-models"):
        if candidate and (Path(candidate) / "sam2" / "hf" / "model.safetensors").is_file():
            return Path(candidate)
    out = tmp_path_factory.mktemp("models")
    done = subprocess.run(
        [sys.executable, "-m", "bench.export_models", "--out", str(out), "--tiny"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def torch_model(models: Path):
    from bench import export_models

    export_models._import_transformers()  # noqa: SLF001  (no torchvision needed: tensors in)
    return export_models.build_sam2(checkpoint=str(models / "sam2" / "hf"))


@pytest.fixture(scope="module")
def pipes(models: Path) -> Pipelines:
    return Pipelines(Settings(sam2_dir=models / "sam2", providers=["CPUExecutionProvider"]))


@pytest.fixture(scope="module")
def photo() -> bytes:
    from bench.pipeline import photo_jpeg

    return photo_jpeg(*SIZE, seed=3)


@pytest.fixture(scope="module")
def features(torch_model, pipes: Pipelines, photo: bytes):
    import torch

    image = Image.open(io.BytesIO(photo)).convert("RGB")
    pixels = torch.from_numpy(pipes.sam2().preprocess(image))
    with torch.no_grad():
        return torch_model.get_image_embeddings(pixels)


def _torch_best_masks(torch_model, features, **prompts) -> list[np.ndarray]:
    """transformers' forward from the image embeddings; per prompt the best candidate's
    ±32-clamped logits (as the ONNX decoder returns them) upsampled and thresholded."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out = torch_model(image_embeddings=features, multimask_output=True, **prompts)
    logits = out.pred_masks[0].clamp(-32, 32)  # [prompts, 3, 256, 256]
    best = out.iou_scores[0].argmax(-1)
    chosen = logits[torch.arange(len(best)), best][:, None]
    big = F.interpolate(chosen, size=(SIZE[1], SIZE[0]), mode="bilinear", align_corners=False)
    return [m[0].numpy() > 0 for m in big]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _to_1024(x: float, y: float) -> list[float]:
    return [x * 1024 / SIZE[0], y * 1024 / SIZE[1]]


def test_batched_boxes_match_transformers_input_boxes(pipes, photo, torch_model, features) -> None:
    import torch

    out = pipes.segment(photo, prompts=[{"box": list(b)} for b in BOXES], mask_formats=["png"])
    ours = [maskio.mask_from_png(out.files[f"prompt_{i}_mask_0.png"][0]) for i in range(len(BOXES))]
    boxes = [[*_to_1024(x, y), *_to_1024(x + w, y + h)] for x, y, w, h in BOXES]
    theirs = _torch_best_masks(torch_model, features, input_boxes=torch.tensor([boxes]))
    ious = [_iou(a, b) for a, b in zip(ours, theirs)]
    print(f"batched boxes: mask IoU against transformers {[round(i, 5) for i in ious]}")
    assert all(a.any() for a in ours)  # not trivially equal
    assert min(ious) >= MIN_IOU


def test_refinement_matches_transformers_input_masks(pipes, photo, torch_model, features) -> None:
    import torch

    first, second = CLICKS
    pipes.segment(photo, {"point": list(first)}, image_id="photo", job_id="click-1")
    out = pipes.segment(
        photo, {"point": list(second), "refine": "click-1"}, image_id="photo", mask_formats=["png"]
    )
    ours = maskio.mask_from_png(out.files["mask_0.png"][0])
    model = pipes.sam2()
    embedding = pipes.cache.peek(model.cache_key("photo"))
    previous = model.predict_many(embedding, [Prompt(point=first)])[0].best_logits
    theirs = _torch_best_masks(
        torch_model, features,
        input_points=torch.tensor([[[_to_1024(*second)]]]),
        input_labels=torch.tensor([[[1]]]),
        input_masks=torch.from_numpy(previous)[None, None],
    )[0]  # fmt: skip
    plain = maskio.mask_from_png(
        pipes.segment(photo, {"point": list(second)}, image_id="photo", mask_formats=["png"]).files["mask_0.png"][0]
    )
    iou = _iou(ours, theirs)
    print(f"refined click: mask IoU against transformers {iou:.5f}; against the unrefined click "
          f"{_iou(ours, plain):.3f}")  # fmt: skip
    assert ours.any() and iou >= MIN_IOU
    assert not np.array_equal(ours, plain)  # the mask input changed the answer
