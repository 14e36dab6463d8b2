"""Correct to the model: our pipelines on random-weight, real-architecture exports against
oracle outputs of transformers' PyTorch models with the same weights, from an independent
reference pipeline kept outside this repository. ``SEGQ_REFERENCE_DIR`` names its output
folder; skipped where it is not set.

SAM 2 is compared with the masks from the decoder's ±32-clamped logits (what the ONNX
decoder returns); DETR with transformers' PIL-backend processor, whose resize is Pillow's
like ours. Measured here: pixel_values within 2.4e-7 for both, SAM 2 masks within 1 pixel
of 307,200 per candidate, DETR segmentation within 5 pixels with the same two segments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from PIL import Image

from config.contract import Prompt
from config.settings import Settings
from worker.inference.detr import DetrPanopticModel
from worker.inference.registry import ModelRegistry
from worker.inference.sam2 import Sam2Embedding, Sam2Model
from worker.inference.detr import postprocess

REF = Path(os.environ.get("SEGQ_REFERENCE_DIR", "/nonexistent"))
IMAGE = REF / "ref" / "synthetic640x480.png"
SAM2_ORACLE = REF / "ref" / "sam2_synthetic640x480.npz"
DETR_ORACLE = REF / "ref" / "detr_synthetic640x480_pil.npz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (REF / "sam2" / "encoder.onnx").is_file(),
        reason="SEGQ_REFERENCE_DIR names no reference exports",
    ),
]


def oracle(path: Path) -> tuple[Any, dict]:
    if not path.is_file():
        pytest.skip(f"the reference folder has no {path.name}")
    return np.load(path), json.loads(path.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def ref_settings() -> Settings:
    return Settings(
        sam2_dir=REF / "sam2",
        detr_dir=REF / "detr",
        detr_model_file="model.onnx",  # the exporter's layout, not the hub's onnx/model.onnx
        detr_config_file="hf/config.json",
        providers=["CPUExecutionProvider"],
    )


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.open(IMAGE).convert("RGB")


@pytest.fixture(scope="module")
def sam2(ref_settings: Settings) -> Sam2Model:
    return ModelRegistry(ref_settings).sam2()


@pytest.fixture(scope="module")
def sam2_embedding(sam2: Sam2Model, image: Image.Image) -> Sam2Embedding:
    return sam2.encode(image)


def as_prompt(spec: dict) -> Optional[Prompt]:
    if spec["kind"] == "center":
        return None
    fields: dict[str, Any] = {}
    if spec["points"] is not None:
        fields.update(points=[tuple(p) for p in spec["points"]], labels=spec["labels"])
    if spec["box"] is not None:
        x0, y0, x1, y1 = spec["box"]
        fields["box"] = (x0, y0, x1 - x0, y1 - y0)
    return Prompt(**fields)


def test_sam2_preprocessing_and_embedding(
    sam2: Sam2Model, image: Image.Image, sam2_embedding: Sam2Embedding
) -> None:
    ref, _ = oracle(SAM2_ORACLE)
    np.testing.assert_allclose(sam2.preprocess(image), ref["pixel_values"], atol=1e-5)
    for name in sam2_embedding.features:
        np.testing.assert_allclose(sam2_embedding.numpy(name), ref[name], atol=1e-4, err_msg=name)


def test_sam2_masks_match_the_oracle(sam2: Sam2Model, sam2_embedding: Sam2Embedding) -> None:
    ref, meta = oracle(SAM2_ORACLE)
    assert (
        len(meta["prompts"]) == 5
    )  # centre, point, points with a background one, box, box + point
    for i, entry in enumerate(meta["prompts"]):
        prompt = as_prompt(entry["prompt"])
        coords, labels = sam2.prompt_arrays(prompt, *sam2_embedding.image_size)
        np.testing.assert_allclose(coords, ref[f"p{i}_onnx_point_coords"], rtol=1e-6)
        np.testing.assert_array_equal(labels, ref[f"p{i}_onnx_point_labels"])

        candidates = sam2.predict(sam2_embedding, prompt, multimask=True)
        oracle_masks = ref[f"p{i}_masks_from_clamped"][0]
        for c in candidates:
            assert abs(c.score - ref[f"p{i}_iou_scores"][0, c.index]) < 1e-5
            np.testing.assert_allclose(
                c.logits_lowres, ref[f"p{i}_low_res_logits_clamped"][0, c.index], atol=1e-3
            )
            assert (c.mask != oracle_masks[c.index]).sum() <= 5, f"prompt {i} candidate {c.index}"

        (best,) = sam2.predict(sam2_embedding, prompt)
        assert best.index == int(ref[f"p{i}_best_index"])
        assert (best.mask != ref[f"p{i}_best_mask"]).sum() <= 5


@pytest.fixture(scope="module")
def detr(ref_settings: Settings) -> DetrPanopticModel:
    return ModelRegistry(ref_settings).detr()


def test_detr_panoptic_matches_the_oracle(detr: DetrPanopticModel, image: Image.Image) -> None:
    ref, meta = oracle(DETR_ORACLE)
    assert meta["backend"] == "pil"
    pixel_values = detr.preprocess(image)
    np.testing.assert_allclose(pixel_values, ref["pixel_values"], atol=1e-5)

    result = detr.predict(image)
    # the oracle's "stuff" variant fuses the COCO stuff categories, as we do
    expected = meta["postprocess_variants"]["stuff"]
    assert [(s.id, s.label_id) for s in result.segments] == [
        (s["id"], s["label_id"]) for s in expected["segments_info"]
    ]
    for ours, theirs in zip(result.segments, expected["segments_info"]):
        assert ours.score == pytest.approx(theirs["score"], abs=1e-4)
        assert abs(ours.area - expected["areas"][str(ours.id)]) <= 20
    assert (result.segmentation != ref["stuff_segmentation"]).sum() <= 20

    # the postprocessing alone, on the oracle's own model outputs
    labels = {"id2label": detr.id2label, "thing_ids": detr.thing_ids}
    alone = postprocess(ref["logits"][0], ref["pred_masks"][0], image.size, **labels)
    assert (alone.segmentation != ref["stuff_segmentation"]).sum() <= 5
    loose = postprocess(
        ref["logits"][0],
        ref["pred_masks"][0],
        image.size,
        threshold=0.3,
        overlap_threshold=0.5,
        **labels,
    )
    assert (loose.segmentation != ref["loose_segmentation"]).sum() <= 5
