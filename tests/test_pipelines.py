"""The in-process pipelines (no Celery, S3 or Redis) with the tiny test models: what a
job writes is what the model layer and imaging layer compute, end to end."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from config import Settings
from config.errors import InvalidPayload, PromptOutOfBounds, UnknownOption
from tests.support.images import oriented_jpeg, sample_jpeg
from tests.support.onnx_models import sam2_expected_centre
from worker.imaging import masks as maskio
from worker.pipelines import Pipelines


@pytest.fixture()
def pipes(sam2_repo, detr_repo) -> Pipelines:
    return Pipelines(Settings(sam2_dir=sam2_repo, detr_dir=detr_repo, providers=["CPUExecutionProvider"]))


def _jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_segment_writes_mask_pngs_and_rle_at_full_size(pipes):
    data = _jpeg(301, 517)
    out = pipes.segment(data, {"point": [100, 400]}, multimask=True)
    masks = out.result["masks"]
    assert [m["png"] for m in masks] == ["mask_0.png", "mask_1.png", "mask_2.png"]
    scores = [m["score"] for m in masks]
    assert scores == sorted(scores, reverse=True)
    best = maskio.mask_from_png(out.files["mask_0.png"][0])
    assert best.shape == (517, 301)
    np.testing.assert_array_equal(maskio.rle_decode(masks[0]["rle"]), best)
    assert masks[0]["area"] == int(best.sum())
    cx, cy = _centroid(best)
    ex, ey = sam2_expected_centre(100, 400, 301, 517)
    assert abs(cx - ex) < 1 and abs(cy - ey) < 1
    assert set(out.timings) >= {"decode", "encode_image", "decode_prompt", "encode_output"}


def test_second_prompt_on_the_same_image_hits_the_embedding_cache(pipes):
    data = _jpeg(200, 120)
    first = pipes.segment(data, {"point": [20, 30]})
    second = pipes.segment(data, {"box": [10, 10, 50, 40]})
    assert first.result["embedding_cache"] == "miss"
    assert second.result["embedding_cache"] == "hit"
    third = pipes.segment(data, None, image_id="s3://b/k#etag1")
    assert third.result["embedding_cache"] == "miss"  # a caller identity is its own key


def test_exif_rotated_image_prompts_are_in_displayed_pixels(pipes):
    data = oriented_jpeg(6, width=48, height=64)  # displayed 48x64, stored 64x48
    assert Image.open(io.BytesIO(data)).size == (64, 48)
    out = pipes.segment(data, {"point": [10, 50]})
    assert (out.result["width"], out.result["height"]) == (48, 64)
    mask = maskio.mask_from_png(out.files["mask_0.png"][0])
    assert mask.shape == (64, 48)
    cx, cy = _centroid(mask)
    ex, ey = sam2_expected_centre(10, 50, 48, 64)
    assert abs(cx - ex) < 1 and abs(cy - ey) < 1
    with pytest.raises(PromptOutOfBounds):
        pipes.segment(data, {"point": [60, 10]})  # inside the stored frame, not the displayed


def test_cutout_alpha_is_the_mask(pipes):
    data = sample_jpeg()
    out = pipes.cutout(data, {"point": [640, 500]})
    rgba = Image.open(io.BytesIO(out.files["cutout.png"][0]))
    assert rgba.mode == "RGBA" and rgba.size == (1280, 853)
    mask = maskio.mask_from_png(out.files["mask.png"][0])
    np.testing.assert_array_equal(np.asarray(rgba)[..., 3], mask.astype(np.uint8) * 255)
    cropped = pipes.cutout(data, {"point": [640, 500]}, crop=True)
    x, y, w, h = cropped.result["mask"]["bbox"]
    assert cropped.result["cutout_size"] == [w, h]
    with pytest.raises(InvalidPayload):
        pipes.cutout(data, None, multimask=True)


def test_panoptic_segments_do_not_overlap_and_carry_labels(pipes):
    data = _jpeg(640, 427)
    out = pipes.panoptic(data)
    segs = out.result["segments"]
    assert segs, "the test DETR has confident queries"
    labels = {s["label"] for s in segs}
    assert "car" in labels  # LABEL_3 in config.json falls back to the COCO name
    idmap = maskio.label_map_from_png(out.files["segments.png"][0])
    assert idmap.shape == (427, 640)
    for s in segs:
        m = maskio.rle_decode(s["rle"])
        np.testing.assert_array_equal(m, idmap == s["id"])
        assert s["area"] == int(m.sum())
    total = sum(maskio.rle_decode(s["rle"]).astype(int) for s in segs)
    assert total.max() <= 1


def test_overlay_blends_panoptic_segments_with_the_legend_colours(pipes):
    data = _jpeg(320, 200)
    out = pipes.overlay(data, alpha=0.5, format="png")
    picture = np.asarray(Image.open(io.BytesIO(out.files["overlay.png"][0])).convert("RGB")).astype(float)
    pan = pipes.panoptic(data)
    base = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
    for seg, legend in zip(pan.result["segments"], out.result["segments"]):
        m = maskio.rle_decode(seg["rle"])
        expected = np.floor(base[m] * 0.5 + np.array(legend["color"]) * 0.5 + 0.5)
        np.testing.assert_array_equal(picture[m], expected)
    untouched = sum(maskio.rle_decode(s["rle"]) for s in pan.result["segments"]) == 0
    np.testing.assert_array_equal(picture[untouched], base[untouched])


def test_overlay_of_prompt_masks_and_jpeg_output(pipes):
    out = pipes.overlay(_jpeg(160, 90), {"point": [80, 45]}, multimask=True, format="jpeg")
    assert "overlay.jpg" in out.files and len(out.result["segments"]) == 3
    json.dumps(out.result)  # everything in a result is JSON


def test_unknown_option_is_refused(pipes):
    with pytest.raises(UnknownOption):
        pipes.segment(_jpeg(20, 20), None, multimask=True, colour="red")
