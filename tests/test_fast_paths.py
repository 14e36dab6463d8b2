"""The speed paths of the pipelines give the same answers as the plain ones: a cached
SAM 2 embedding needs only the image header, a reduced JPEG decode (SEGQ_FAST_JPEG_DECODE)
still answers in the full image's pixels, and stage timings add up instead of overlapping."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from config import Settings
from config.errors import ImageTooLarge, ImageTooSmall, InvalidImage
from tests.support.images import jpeg_declaring, oriented_jpeg, sample_scene
from tests.support.onnx_models import sam2_expected_centre
from worker import pipelines as pipelines_module
from worker.imaging import masks as maskio
from worker.imaging.decode import load_image, read_size
from worker.pipelines import Pipelines, Timer

LIMITS = dict(max_pixels=50_000_000, max_bytes=1 << 26)


def photo(width: int, height: int) -> bytes:
    out = io.BytesIO()
    sample_scene(width, height).save(out, format="JPEG", quality=90)
    return out.getvalue()


def pipes(sam2_repo, detr_repo, **settings) -> Pipelines:
    return Pipelines(
        Settings(
            sam2_dir=sam2_repo, detr_dir=detr_repo, providers=["CPUExecutionProvider"], **settings
        )
    )


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_read_size_is_the_displayed_size_of_a_full_decode(orientation: int) -> None:
    data = oriented_jpeg(orientation, width=64, height=48)
    assert read_size(data, **LIMITS) == load_image(data, **LIMITS).size


def test_read_size_refuses_what_load_image_refuses() -> None:
    with pytest.raises(ImageTooLarge):
        read_size(jpeg_declaring(60_000, 60_000), **LIMITS)
    with pytest.raises(ImageTooSmall):
        read_size(photo(40, 1), **LIMITS)
    with pytest.raises(InvalidImage):
        read_size(b"not an image", **LIMITS)


def test_a_cached_embedding_needs_no_pixel_decode(sam2_repo, detr_repo, monkeypatch) -> None:
    p = pipes(sam2_repo, detr_repo)
    data = photo(640, 480)
    decodes = []
    real = pipelines_module.load_image
    monkeypatch.setattr(
        pipelines_module, "load_image", lambda *a, **k: decodes.append(1) or real(*a, **k)
    )
    first = p.segment(data, {"point": [100, 200]})
    second = p.segment(data, {"point": [500, 300]})
    assert [first.result["embedding_cache"], second.result["embedding_cache"]] == ["miss", "hit"]
    assert len(decodes) == 1
    mask = maskio.mask_from_png(second.files["mask_0.png"][0])
    assert mask.shape == (480, 640)
    ex, ey = sam2_expected_centre(500, 300, 640, 480)
    cx, cy = centroid(mask)
    assert abs(cx - ex) < 1 and abs(cy - ey) < 1


@pytest.mark.parametrize("fast", [False, True])
def test_reduced_jpeg_decode_answers_in_full_size_pixels(sam2_repo, detr_repo, fast: bool) -> None:
    """A 2400x1800 JPEG decodes at half scale for both models when allowed; prompts,
    masks and segments are still in the pixels of the whole image."""
    p = pipes(sam2_repo, detr_repo, fast_jpeg_decode=fast)
    data = photo(2400, 1800)
    out = p.segment(data, {"point": [1800, 450]})
    mask = maskio.mask_from_png(out.files["mask_0.png"][0])
    assert mask.shape == (1800, 2400)
    ex, ey = sam2_expected_centre(1800, 450, 2400, 1800)
    cx, cy = centroid(mask)
    assert abs(cx - ex) < 2 and abs(cy - ey) < 2
    panoptic = p.panoptic(data)
    labels = maskio.label_map_from_png(panoptic.files["segments.png"][0])
    assert labels.shape == (1800, 2400) and panoptic.result["segments"]
    cutout = p.cutout(data, {"point": [1800, 450]})
    assert Image.open(io.BytesIO(cutout.files["cutout.png"][0])).size == (2400, 1800)


def test_nested_stages_count_once() -> None:
    timings: dict[str, float] = {}
    timer = Timer(timings)
    start = time.perf_counter()
    with timer.stage("encode_image"):
        with timer.stage("decode"):
            time.sleep(0.02)
        time.sleep(0.01)
    total = time.perf_counter() - start
    assert set(timings) == {"encode_image", "decode"}
    # each sleep counts for its own stage, and nothing twice
    assert timings["decode"] >= 0.02 and timings["encode_image"] >= 0.01
    assert timings["decode"] + timings["encode_image"] <= total


@pytest.mark.parametrize("height,width", [(150, 97), (64, 300), (1, 5), (200, 130)])
def test_panoptic_pixels_block_by_block_equal_whole_planes(height: int, width: int) -> None:
    """The blocked pixel assignment against the plain statement of transformers' order of
    operations: sigmoid, resize every query to full size, times its score, argmax."""
    from worker.inference.detr import _assign_pixels, _sigmoid
    from worker.inference.transforms import resize_bilinear

    rng = np.random.default_rng(height * width)
    logits = rng.normal(0, 3, (6, 23, 31)).astype(np.float32)
    logits[:, :4] = -200.0  # every probability underflows to 0 there: ties go to query 0
    scores = rng.uniform(0.5, 1.0, 6).astype(np.float32)
    weighted = np.stack(
        [resize_bilinear(_sigmoid(m), height, width) * s for m, s in zip(logits, scores)]
    )
    owner, confident = _assign_pixels(logits, scores, height, width, 0.3)
    np.testing.assert_array_equal(owner, weighted.argmax(0))
    assert confident == [int(n) for n in (weighted >= 0.3).sum((1, 2))]
