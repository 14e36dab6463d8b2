"""Click sessions on one image: ``refine`` feeds an earlier job's best low-resolution mask
logits to SAM 2's decoder as ``mask_input`` (``has_mask_input`` 1), and ``prompts`` runs
several prompts as one batched decoder call with one mask set per prompt. In-process, with
the tiny test models (whose IoU predictions show what went into ``mask_input``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from config import Settings
from config.contract import MAX_PROMPTS, Prompt, parse_request
from config.errors import InvalidPrompt, RefineUnavailable
from tests.support.onnx_models import SAM2_SCORES, SAM2_SCORES_WITH_BOX, sam2_expected_centre
from worker.imaging import masks as maskio
from worker.inference.registry import ModelRegistry
from worker.inference.sam2 import Sam2Model
from worker.pipelines import Pipelines

LIMITS = dict(max_bytes=65536, max_points=64)


@pytest.fixture()
def pipes(sam2_repo) -> Pipelines:
    return Pipelines(Settings(sam2_dir=sam2_repo, providers=["CPUExecutionProvider"]))


def _png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class CountingDecoder:
    """The decoder session, counting its runs and the batch size of each."""

    def __init__(self, session) -> None:
        self.session = session
        self.batches: list[int] = []

    def io_binding(self):
        return self.session.io_binding()

    def run_with_iobinding(self, binding) -> None:
        self.session.run_with_iobinding(binding)
        self.batches.append(binding.copy_outputs_to_cpu()[1].shape[0])

    def __getattr__(self, name):
        return getattr(self.session, name)


# --- contract ---------------------------------------------------------------------------


def test_the_contract_takes_refine_and_prompts() -> None:
    req = parse_request(
        {"task": "segment", "image": "s3://b/k.jpg", "image_id": "photo-7",
         "prompts": [{"box": [1, 2, 30, 40]}, {"point": [5, 6], "refine": "job-1:2"}]},
        **LIMITS,
    )  # fmt: skip
    assert [p.box for p in req.prompts] == [(1, 2, 30, 40), None]
    assert req.prompts[1].refine_key == ("job-1", 2)
    assert Prompt(point=(1, 1), refine="abc").refine_key == ("abc", 0)
    assert req.affinity_id == "id:photo-7" and req.uses_sam
    plain = parse_request({"task": "cutout", "image": "s3://b/k.jpg", "version_id": "v1"}, **LIMITS)
    assert plain.affinity_id == "s3://b/k.jpg?versionId=v1"
    assert not parse_request({"task": "overlay", "image": "s3://b/k.jpg"}, **LIMITS).uses_sam


@pytest.mark.parametrize(
    "raw",
    [
        {"task": "segment", "prompt": {"point": [1, 2], "refine": "not a job id"}},
        {"task": "segment", "prompt": {"refine": "job-1"}},  # refine needs the new click
        {"task": "segment", "prompt": {"point": [1, 2]}, "prompts": [{"point": [1, 2]}]},
        {"task": "segment", "prompts": []},
        {"task": "segment", "prompts": [{"point": [1, 2]}] * (MAX_PROMPTS + 1)},
        {"task": "segment", "prompts": [None]},
        {"task": "cutout", "prompts": [{"point": [1, 2]}]},  # one mask: one prompt
    ],
)
def test_bad_refine_and_prompts_are_invalid_prompts(raw) -> None:
    with pytest.raises(InvalidPrompt):
        parse_request({"image": "s3://b/k.jpg", **raw}, **LIMITS)


# --- batched prompts ---------------------------------------------------------------------


def test_prompts_run_as_one_batched_decoder_call_and_match_single_calls(pipes: Pipelines) -> None:
    data = _png(320, 200)
    boxes = [{"box": [10, 10, 100, 80]}, {"box": [150, 40, 120, 100]}, {"box": [5, 120, 60, 70]}]
    model = pipes.sam2()
    counting = CountingDecoder(model.decoder)
    model.decoder = counting
    try:
        out = pipes.segment(data, prompts=boxes, image_id="img", job_id="batch-job", mask_formats=["png"])
        assert counting.batches == [3]  # one decoder call for all three boxes
        singles = [pipes.segment(data, b, image_id="img") for b in boxes]
    finally:
        model.decoder = counting.session
    sets = out.result["prompts"]
    assert [s["index"] for s in sets] == [0, 1, 2] and "masks" not in out.result
    for i, (entry, single) in enumerate(zip(sets, singles)):
        assert entry["masks"][0]["png"] == f"prompt_{i}_mask_0.png"
        got = maskio.mask_from_png(out.files[f"prompt_{i}_mask_0.png"][0])
        want = maskio.mask_from_png(single.files["mask_0.png"][0])
        np.testing.assert_array_equal(got, want)
        assert entry["masks"][0]["score"] == pytest.approx(SAM2_SCORES_WITH_BOX[1])
        assert entry["masks"][0]["bbox"] == single.result["masks"][0]["bbox"]


def test_prompts_of_different_shapes_each_get_their_own_masks(pipes: Pipelines) -> None:
    data = _png(300, 300)
    prompts = [{"point": [50, 60]}, {"box": [100, 100, 80, 90]}, {"point": [250, 40]}]
    out = pipes.segment(data, prompts=prompts, multimask=True, mask_formats=["rle"])
    sets = out.result["prompts"]
    assert [len(s["masks"]) for s in sets] == [3, 3, 3]
    for i in (0, 2):  # the points' disks sit around their points
        disk = maskio.rle_decode(sets[i]["masks"][0]["rle"])
        ys, xs = np.nonzero(disk)
        ex, ey = sam2_expected_centre(*prompts[i]["point"], 300, 300)
        assert abs(xs.mean() - ex) < 1 and abs(ys.mean() - ey) < 1
        assert [m["score"] for m in sets[i]["masks"]] == pytest.approx(sorted(SAM2_SCORES, reverse=True))
    assert sets[1]["masks"][0]["score"] == pytest.approx(SAM2_SCORES_WITH_BOX[1])


def test_a_decoder_that_cannot_batch_runs_prompt_by_prompt(sam2_repo: Path, tmp_path: Path) -> None:
    """samexporter's public decoder breaks on more than one label: same answers, one call each."""
    repo = tmp_path / "sam2"
    repo.mkdir()
    (repo / "encoder.onnx").write_bytes((sam2_repo / "encoder.onnx").read_bytes())
    decoder = onnx.load(str(sam2_repo / "decoder.onnx"))
    for value in decoder.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "num_labels":
                dim.dim_value = 1  # fixed batch of one
    onnx.save(decoder, str(repo / "decoder.onnx"))
    model: Sam2Model = ModelRegistry(Settings(sam2_dir=repo, providers=["CPUExecutionProvider"])).sam2()
    embedding = model.encode(Image.new("RGB", (200, 100), (20, 40, 60)))
    prompts = [Prompt(box=(10, 10, 50, 40)), Prompt(box=(100, 20, 60, 60))]
    found = model.predict_many(embedding, prompts)
    alone = [model.predict(embedding, p)[0] for p in prompts]
    for got, want in zip(found, alone):
        np.testing.assert_array_equal(got.masks[0].mask, want.mask)
    assert model._batches is False  # noqa: SLF001


# --- refinement ---------------------------------------------------------------------------


def test_refine_feeds_the_earlier_jobs_best_logits_as_mask_input(pipes: Pipelines) -> None:
    data = _png(240, 160)
    first = pipes.segment(data, {"point": [60, 50]}, image_id="img", job_id="click-1")
    assert first.result["masks"][0]["score"] == pytest.approx(SAM2_SCORES[0])
    model = pipes.sam2()
    embedding = pipes.cache.peek(model.cache_key("img"))
    best = model.predict_many(embedding, [Prompt(point=(60, 50))])[0].best_logits
    second = pipes.segment(
        data, {"point": [100, 70], "refine": "click-1"}, image_id="img", job_id="click-2"
    )
    assert second.result["embedding_cache"] == "hit" and second.result["refined"] == ["click-1"]
    # the test decoder adds 1000 x (sum |mask_input| + has_mask_input) to every score
    spoil = 1000 * (float(np.abs(best.astype(np.float64)).sum()) + 1)
    assert second.result["masks"][0]["score"] == pytest.approx(SAM2_SCORES[0] + spoil, rel=1e-5)
    # and a third click refines the second, whose logits were kept in turn
    third = pipes.segment(data, {"point": [90, 60], "refine": "click-2"}, image_id="img")
    assert third.result["masks"][0]["score"] > SAM2_SCORES[0] + 1000


def test_refine_a_prompt_of_a_batched_job(pipes: Pipelines) -> None:
    data = _png(240, 160)
    pipes.segment(data, prompts=[{"point": [30, 30]}, {"box": [100, 50, 60, 60]}], image_id="img", job_id="many")
    out = pipes.segment(data, {"box": [95, 45, 70, 70], "refine": "many:1"}, image_id="img")
    assert out.result["refined"] == ["many:1"]
    assert out.result["masks"][0]["score"] > 1000


def test_refine_of_a_mask_not_held_says_so(pipes: Pipelines) -> None:
    data = _png(240, 160)
    with pytest.raises(RefineUnavailable) as caught:
        pipes.segment(data, {"point": [10, 10], "refine": "never-ran"}, image_id="img")
    assert caught.value.code == "refine_unavailable"
    pipes.segment(data, {"point": [10, 10]}, image_id="img", job_id="on-img")
    with pytest.raises(RefineUnavailable):
        pipes.segment(data, {"point": [10, 10], "refine": "on-img:3"}, image_id="img")
    with pytest.raises(InvalidPrompt, match="another image"):
        pipes.segment(_png(240, 160, seed=1), {"point": [10, 10], "refine": "on-img"}, image_id="other")
    pipes.cache.clear()  # evicted with the embeddings
    with pytest.raises(RefineUnavailable):
        pipes.segment(data, {"point": [10, 10], "refine": "on-img"}, image_id="img")


def test_overlay_draws_the_best_mask_of_each_prompt(pipes: Pipelines) -> None:
    data = _png(200, 150)
    out = pipes.overlay(data, prompts=[{"point": [40, 40]}, {"box": [100, 60, 80, 70]}], image_id="img")
    legend = out.result["segments"]
    assert [(s["index"], s["prompt"]) for s in legend] == [(0, 0), (1, 1)]
    assert legend[1]["score"] == pytest.approx(SAM2_SCORES_WITH_BOX[1])
    assert "overlay.png" in out.files
