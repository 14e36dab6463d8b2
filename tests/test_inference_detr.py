"""DETR-panoptic pipeline against the tiny model whose queries cover known rectangles:
sizing, thresholds, fusion of stuff, separate things, labels and the COCO fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config.errors import ModelIncompatible
from config.settings import Settings
from tests.support.onnx_models import CAR, DETR_QUERIES, PERSON, SKY, DetrQuery, rename_io
from worker.inference.detr import DetrPanopticModel, PanopticResult
from worker.inference.registry import ModelRegistry
from worker.inference.detr import model_input_size, postprocess
from worker.inference.labels import COCO_PANOPTIC, COCO_STUFF, COCO_THINGS, load_labels

SIZES = [(640, 427), (301, 517)]
# transformers' reference.py list of COCO panoptic stuff ids (isthing == 0)
# fmt: off
STUFF_IDS = [
    92, 93, 95, 100, 107, 109, 112, 118, 119, 122, 125, 128, 130, 133, 138, 141,
    144, 145, 147, 148, 149, 151, 154, 155, 156, 159, 161, 166, 168, 171, 175, 176,
    177, 178, 180, 181, 184, 185, 186, 187, 188, 189, 190, 191, 192, 193, 194, 195,
    196, 197, 198, 199, 200
]
# fmt: on


@pytest.fixture(scope="module")
def model(detr_repo: Path) -> DetrPanopticModel:
    return ModelRegistry(Settings(detr_dir=detr_repo, providers=["CPUExecutionProvider"])).detr()


def rect_mask(rect: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Pixels whose centres lie inside a normalised rectangle."""
    x0, y0, x1, y1 = rect
    xs = (np.arange(width) + 0.5) / width
    ys = (np.arange(height) + 0.5) / height
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def edge_band(mask: np.ndarray, px: int = 2) -> np.ndarray:
    """Pixels within ``px`` of the mask's boundary, where sub-pixel edges may fall either way."""
    band = np.zeros_like(mask)
    for dy in range(-px, px + 1):
        for dx in range(-px, px + 1):
            band |= np.roll(mask, (dy, dx), axis=(0, 1)) != mask
    return band


def assert_mask_is(actual: np.ndarray, expected: np.ndarray) -> None:
    wrong = (actual != expected) & ~edge_band(expected)
    assert not wrong.any(), f"{int(wrong.sum())} pixels away from the edges differ"


@pytest.mark.parametrize(
    "size,expected",
    [
        ((640, 480), (1066, 800)),
        ((480, 640), (800, 1066)),
        ((640, 427), (1199, 800)),
        ((800, 600), (1066, 800)),
        ((1000, 800), (1000, 800)),  # shortest edge already 800
        ((4000, 1000), (1333, 333)),  # longest edge capped
        ((301, 517), (776, 1333)),  # the cap rounds the short edge to 776
        ((517, 301), (1333, 776)),
        ((4000, 3000), (1066, 800)),
    ],
)
def test_model_input_size_follows_transformers(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert model_input_size(*size) == expected


def test_preprocess_resizes_and_normalises(model: DetrPanopticModel) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), np.uint8), "RGB")
    tensor = model.preprocess(image)
    assert tensor.shape == (1, 3, 800, 1066) and tensor.dtype == np.float32
    resized = np.asarray(image.resize((1066, 800), Image.BILINEAR), np.float64) / 255
    expected = (resized - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
    np.testing.assert_allclose(tensor[0].transpose(1, 2, 0), expected, atol=1e-6)


@pytest.mark.parametrize("width,height", SIZES)
def test_panoptic_segments(model: DetrPanopticModel, width: int, height: int) -> None:
    result = model.predict(Image.new("RGB", (width, height), (40, 80, 120)))
    seg = result.segmentation
    assert seg.shape == (height, width) and seg.dtype == np.int32

    by_label: dict[int, list] = {}
    for s in result.segments:
        by_label.setdefault(s.label_id, []).append(s)
    assert sorted(by_label) == sorted([SKY, PERSON, CAR])  # no-object, faint, low and hidden gone
    assert [s.id for s in result.segments] == [1, 2, 3, 4]

    (sky,) = by_label[SKY]  # two sky queries fused into one segment
    sky_queries = [q for q in DETR_QUERIES if q.label_id == SKY]
    assert sky.label == "sky" and not sky.isthing  # the config's real name wins
    assert sky.score == pytest.approx(max(q.score for q in sky_queries), rel=1e-5)
    assert_mask_is(result.segmentation == sky.id, rect_mask((0.0, 0.0, 1.0, 0.3), width, height))

    persons = by_label[PERSON]  # two persons stay two segments
    assert len(persons) == 2 and all(p.isthing and p.label == "person" for p in persons)
    for segment, query in zip(persons, [q for q in DETR_QUERIES if q.label_id == PERSON]):
        assert segment.score == pytest.approx(query.score, rel=1e-5)
        expected = rect_mask(query.rect, width, height)
        assert_mask_is(result.segmentation == segment.id, expected)
        ys, xs = np.nonzero(expected)
        x, y, w, h = segment.bbox
        assert abs(x - xs.min()) <= 1 and abs(y - ys.min()) <= 1
        assert abs(x + w - 1 - xs.max()) <= 1 and abs(y + h - 1 - ys.max()) <= 1

    (car,) = by_label[CAR]
    assert car.label == "car" and car.isthing  # LABEL_3 in the config: COCO's name

    for s in result.segments:
        assert s.area == int((seg == s.id).sum())
    assigned = seg > 0
    assert assigned.sum() == sum(s.area for s in result.segments)  # no pixel in two segments
    assert_mask_is(
        ~assigned, ~np.any([rect_mask(q.rect, width, height) for q in DETR_QUERIES[2:7]], axis=0)
    )


def test_min_score_and_threshold(model: DetrPanopticModel) -> None:
    image = Image.new("RGB", (320, 240))
    strict = model.predict(image, min_score=0.95)
    assert sorted(s.label_id for s in strict.segments) == sorted([PERSON, CAR])
    assert set(np.unique(strict.segmentation)) == {0} | {s.id for s in strict.segments}
    nothing = model.predict(image, threshold=0.995)
    assert nothing.segments == [] and not nothing.segmentation.any()


def test_postprocess_matches_transformers_on_a_tie_and_overlap() -> None:
    """Hand-made outputs: query 1 wins its pixels only where it beats query 0's weighted
    probability; with the overlap threshold above its share it is no segment at all."""
    labels = {"id2label": {1: "person"}, "thing_ids": {1}}
    logits = np.full((2, 251), -20.0, np.float32)
    logits[0, 1] = logits[1, 1] = 10.0
    masks = np.full((2, 4, 4), -10.0, np.float32)
    masks[0, :, :2] = 10.0  # query 0: left half
    masks[1, :, 1:] = 10.0  # query 1: right three quarters, overlapping one column
    result = postprocess(logits, masks, (4, 4), overlap_threshold=0.5, **labels)
    assert [s.id for s in result.segments] == [1, 2]
    strict = postprocess(logits, masks, (4, 4), overlap_threshold=0.8, **labels)
    assert [s.id for s in strict.segments] == [1]  # query 1 won only 2/3 of its pixels
    assert (strict.segmentation[:, 2:] == 0).all()


def test_pixel_mask_shape_comes_from_the_model(model: DetrPanopticModel) -> None:
    declared = {i.name: i.shape for i in model.session.get_inputs()}["pixel_mask"]
    assert declared[1:] == [64, 64]
    assert model.predict(
        Image.new("RGB", (50, 70))
    ).segments  # a mask of ones, else nothing is kept


def test_renamed_output_is_incompatible(detr_repo: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(detr_repo, tmp_path / "detr")
    rename_io(tmp_path / "detr" / "onnx" / "model.onnx", "pred_masks", "masks")
    with pytest.raises(ModelIncompatible, match="pred_masks"):
        ModelRegistry(Settings(detr_dir=tmp_path / "detr", providers=["CPUExecutionProvider"])).detr()


def test_coco_table() -> None:
    assert len(COCO_PANOPTIC) == 133 and len(COCO_THINGS) == 80 and len(COCO_STUFF) == 53
    assert sorted(COCO_STUFF) == STUFF_IDS
    assert COCO_PANOPTIC[1] == "person" and COCO_PANOPTIC[90] == "toothbrush"
    assert COCO_PANOPTIC[184] == "tree-merged" and COCO_PANOPTIC[187] == "sky-other-merged"
    assert (
        COCO_PANOPTIC[200] == "rug-merged" and 12 not in COCO_PANOPTIC and 91 not in COCO_PANOPTIC
    )


def test_load_labels_falls_back_to_coco(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"id2label": {"1": "human", "3": "LABEL_3", "12": "N/A", "211": "LABEL_211"}})
    )
    id2label, thing_ids = load_labels(config)
    assert id2label[1] == "human" and id2label[3] == "car" and id2label[187] == "sky-other-merged"
    assert id2label[211] == "LABEL_211" and id2label[12] == "N/A"
    assert thing_ids == frozenset(COCO_THINGS)
    only_coco, _ = load_labels(None)
    assert only_coco == COCO_PANOPTIC
    config.write_text("{not json")
    with pytest.raises(ModelIncompatible):
        load_labels(config)


def test_no_config_json_means_coco_labels(tmp_path: Path) -> None:
    from tests.support.onnx_models import build_detr_repo

    repo = build_detr_repo(tmp_path / "detr", queries=(DetrQuery(SKY, 9.0, (0.0, 0.0, 1.0, 0.5)),))
    (repo / "config.json").unlink()
    result: PanopticResult = ModelRegistry(
        Settings(detr_dir=repo, providers=["CPUExecutionProvider"])
    ).detr().predict(Image.new("RGB", (100, 80)))
    assert [s.label for s in result.segments] == ["sky-other-merged"]
