"""The job queue end to end: a real worker process, real Redis, real S3 (``weed mini``
with signature checks), the tiny test models loaded through the worker's own model path."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

from config.contract import JobState
from config.errors import JobFailed, JobNotFound, UnknownTask
from tests.support.images import oriented_jpeg, sample_jpeg, truncated
from worker.pipelines import Pipelines


def _png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(width * height)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PHOTOS = {
    "sample.jpg": sample_jpeg(),  # 1280x853 photo-like JPEG
    "tall.png": _png(301, 517),
    "rotated.jpg": oriented_jpeg(6, width=120, height=200),  # EXIF: displayed 120x200
}


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_all_four_job_types_succeed_and_match_the_in_process_pipeline(stack, name):
    data = PHOTOS[name]
    uri = stack.upload(data, name)
    client = stack.client
    jobs = {
        "segment": client.segment(uri, {"point": [20, 30]}, multimask=True),
        "panoptic": client.panoptic(uri),
        "cutout": client.cutout(uri, None),
        "overlay": client.overlay(uri),
    }
    local = Pipelines(stack.settings)
    expected = {
        "segment": local.segment(data, {"point": [20, 30]}, multimask=True),
        "panoptic": local.panoptic(data),
        "cutout": local.cutout(data, None),
        "overlay": local.overlay(data),
    }
    for kind, job in jobs.items():
        st = job.wait(timeout=60)
        assert st.state is JobState.succeeded, st
        assert st.attempts == 1 and st.worker and st.created_at <= st.started_at <= st.finished_at
        assert {"download", "upload"} <= set(st.timings)
        outputs = st.result["outputs"]
        assert set(outputs) == set(expected[kind].files)
        for out_name, (data_expected, _) in expected[kind].files.items():
            assert job.output(out_name) == data_expected, f"{kind}/{out_name} differs from in-process"
        manifest = json.loads(job.output("manifest.json"))
        assert manifest["job_id"] == job.id and manifest["result"]["outputs"] == outputs
        assert all(key.startswith(stack.settings.output_prefix + job.id + "/") for key in outputs.values())


def test_status_moves_queued_running_succeeded(stack):
    """With the worker's consumer paused the job is visibly queued; resumed, it runs."""
    uri = stack.upload(PHOTOS["tall.png"], "tall.png")
    with stack.paused(stack.settings.queue_interactive):
        job = stack.client.segment(uri, {"box": [10, 10, 100, 200]})
        assert job.status().state is JobState.queued
    seen: list[str] = []
    st = job.wait(timeout=60, on_update=lambda s: seen.append(s.state.value))
    assert seen[0] == "queued" and seen[-1] == "succeeded"
    assert st.result["masks"][0]["bbox"] is not None


def test_bad_jobs_fail_with_their_code_and_the_next_job_succeeds(stack):
    client = stack.client
    good = stack.upload(PHOTOS["tall.png"], "good.png")
    cases = {
        "object_not_found": client.segment("s3://segq-input/no/such/key.jpg"),
        "invalid_image": client.segment(stack.upload(truncated(PHOTOS["sample.jpg"]), "cut.jpg")),
        "prompt_out_of_bounds": client.segment(good, {"point": [5000, 10]}),
        "forbidden_location": client.panoptic("s3://segq-output/somebody-elses.jpg"),
    }
    for code, job in cases.items():
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=60)
        assert info.value.job_code == code, info.value
        assert job.status().error.message
    assert client.segment(good, None).wait(timeout=60).state is JobState.succeeded


def test_unknown_job_ids_are_reported_as_unknown(stack):
    with pytest.raises(JobNotFound):
        stack.client.status("no-such-job")
    with pytest.raises(UnknownTask):
        stack.client.submit("colourise", "s3://segq-input/x.jpg")


def test_idempotency_key_yields_one_job(stack):
    uri = stack.upload(PHOTOS["tall.png"])
    a = stack.client.cutout(uri, {"point": [50, 50]}, idempotency_key="upload-42")
    b = stack.client.cutout(uri, {"point": [50, 50]}, idempotency_key="upload-42")
    assert a.id == b.id and a.created and not b.created
    assert a.wait(timeout=60).attempts == 1


def test_cancelled_job_never_runs(stack):
    uri = stack.upload(PHOTOS["tall.png"])
    client = stack.client
    with stack.paused(stack.settings.queue_batch):
        job = client.panoptic(uri)
        assert job.cancel().state is JobState.cancelled
    after = client.panoptic(uri).wait(timeout=60)  # the queue moved past the cancelled job
    assert after.state is JobState.succeeded
    st = job.status()
    assert st.state is JobState.cancelled and st.attempts == 0 and st.started_at is None


def test_presigned_urls_fetch_the_outputs(stack):
    job = stack.client.cutout(stack.upload(PHOTOS["sample.jpg"]), {"point": [600, 500]})
    job.wait(timeout=60)
    urls = job.urls()
    assert set(urls) == {"cutout.png", "mask.png", "manifest.json"}
    with urllib.request.urlopen(urls["cutout.png"], timeout=10) as resp:
        assert resp.read() == job.output("cutout.png")


def test_cli_submit_status_wait_through_the_entry_point(stack):
    uri = stack.upload(PHOTOS["tall.png"])
    env = stack.env()
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "api_client.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )
    done = run("submit", "segment", uri, "--point", "40,60", "--point", "10,10", "--label", "1",
               "--label", "0", "--multimask", "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.splitlines()[0]
    assert json.loads(done.stdout[len(job_id):])["state"] == "succeeded"
    status = run("status", job_id)
    assert json.loads(status.stdout)["result"]["masks"]
    waited = run("wait", job_id, "--urls")
    assert waited.returncode == 0 and "mask_0.png: http://127.0.0.1" in waited.stdout
    refined = run("submit", "segment", uri, "--point", "30,50", "--refine", job_id, "--image-id", "tall",
                  "--wait", "--timeout", "60")
    assert refined.returncode == 0, refined.stderr
    assert json.loads(refined.stdout[len(refined.stdout.splitlines()[0]):])["result"]["refined"] == [job_id]
    bad = run("submit", "segment", uri, "--point", "99999,1", "--wait", "--timeout", "60")
    assert bad.returncode == 2 and "prompt_out_of_bounds" in bad.stderr
    unknown = run("status", "nope")
    assert unknown.returncode == 2 and "job_not_found" in unknown.stderr


def test_async_client_submits_and_waits(stack):
    import asyncio

    from api_client.client import AsyncSegmentationClient

    uri = stack.upload(PHOTOS["tall.png"])

    async def main():
        client = AsyncSegmentationClient(stack.settings)
        jobs = await asyncio.gather(*(client.segment(uri, {"point": [x, 40]}) for x in (10, 50, 90)))
        done = await asyncio.gather(*(client.wait(j.id, timeout=60) for j in jobs))
        return jobs, done, await client.presigned_urls(jobs[0].id)

    jobs, done, urls = asyncio.run(main())
    assert len({j.id for j in jobs}) == 3
    assert all(st.state is JobState.succeeded for st in done)
    assert "mask_0.png" in urls


def test_client_refuses_job_ids_that_are_not_plain(stack):
    from config.errors import InvalidPayload

    with pytest.raises(InvalidPayload):
        stack.client.segment("s3://segq-input/x.jpg", job_id="../../etc")
