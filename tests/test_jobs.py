"""A job's whole life in-process, the way rq runs a burst worker: ``worker.jobs.execute``
with a ``Runtime`` of the test's own, against real Redis and S3 and the tiny models, no
Celery and no subprocess. Every outcome a delivery can have: success, each failure code,
a retry then success, retries used up, the time limit, a cancelled job, a redelivery after
a lost worker, the delivery cap, and the webhook that reports it.

What needs a real worker process (SIGKILL, prefork, Celery's own redelivery) stays in
``test_faults.py``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from config.contract import JobState
from config.settings import Settings
from tests.support.images import encode, noise_rgb
from tests.support.receiver import Receiver
from tests.support.services import INPUT_BUCKET
from worker.jobs import Delivery, RetryLater, execute
from worker.runtime import Runtime
from worker.webhooks import verify_signature

SECRET = "whsec-jobs"


@pytest.fixture
def runtime(settings: Settings, sam2_repo, detr_repo) -> Runtime:
    return Runtime(
        settings.model_copy(
            update=dict(sam2_dir=sam2_repo, detr_dir=detr_repo, providers=["CPUExecutionProvider"],
                        webhook_secret=SecretStr(SECRET), webhook_allow_private=True,
                        retry_backoff_s=0.01, retry_backoff_max_s=0.05, retry_budget_s=1.5)
        )
    )  # fmt: skip


@pytest.fixture
def image(runtime: Runtime) -> str:
    return runtime.storage.upload_input(
        f"jobs-test/{uuid.uuid4().hex[:8]}.jpg",
        encode(Image.fromarray(noise_rgb(320, 240)), "JPEG"),
        "image/jpeg",
    )


def submit(runtime: Runtime, payload: dict[str, Any]) -> str:
    """What a producer does before a worker sees the job: a queued record."""
    job_id = uuid.uuid4().hex
    runtime.status.create(job_id, payload.get("task", "unknown"), payload.get("image"))
    return job_id


def job(image: str, task: str = "segment", **fields: Any) -> dict[str, Any]:
    return {"task": task, "image": image, "prompt": {"point": [160, 120]}, **fields}


def test_success_writes_outputs_then_manifest_then_status(runtime: Runtime, image: str) -> None:
    job_id = submit(runtime, job(image))
    result = execute(runtime, job(image), Delivery(job_id))
    st = runtime.status.get(job_id)
    assert st.state is JobState.succeeded and st.attempts == 1 and st.result == result
    assert set(result["outputs"]) == {"mask_0.png"} and result["masks"][0]["area"] > 0
    manifest = json.loads(runtime.storage.read_output(result["manifest"]))
    assert manifest["job_id"] == job_id and manifest["result"]["outputs"] == result["outputs"]
    assert set(st.timings) >= {"download", "encode_image", "decode_prompt", "upload"}


@pytest.mark.parametrize(
    "change, code",
    [
        (lambda p: "{not json", "invalid_payload"),
        (lambda p: {**p, "task": "classify"}, "unknown_task"),
        (lambda p: {**p, "options": {"colour": "red"}}, "unknown_option"),
        (lambda p: {**p, "prompt": {"point": [5000, 5]}}, "prompt_out_of_bounds"),
        (lambda p: {**p, "prompt": {"points": [[1, 1]] * 65}}, "invalid_prompt"),
        (lambda p: {**p, "image": p["image"] + ".missing"}, "object_not_found"),
        (lambda p: {**p, "image": "s3://elsewhere/x.jpg"}, "forbidden_location"),
    ],
)
def test_a_bad_job_fails_at_once_with_its_code(runtime: Runtime, image: str, change, code: str) -> None:
    payload = change(job(image))
    job_id = uuid.uuid4().hex
    assert execute(runtime, payload, Delivery(job_id)) is None  # never raises for its own faults
    st = runtime.status.get(job_id)  # a record even for a message no client created
    assert st.state is JobState.failed and st.error.code == code, st.error


def test_an_image_that_is_not_one_fails_invalid_image(runtime: Runtime) -> None:
    uri = runtime.storage.upload_input(f"jobs-test/{uuid.uuid4().hex}.jpg", b"GIF89a garbage", "image/gif")
    job_id = submit(runtime, job(uri))
    execute(runtime, job(uri), Delivery(job_id))
    assert runtime.status.get(job_id).error.code == "invalid_image"


def unreachable_s3(runtime: Runtime, free_port: int) -> Runtime:
    """The same deployment while S3 refuses connections: a transient fault."""
    return Runtime(
        runtime.settings.model_copy(
            update=dict(s3_endpoint_url=f"http://127.0.0.1:{free_port}", s3_max_attempts=1)
        ),
        models=runtime.models,
    )


def test_a_transient_fault_is_retried_and_the_retry_succeeds(runtime: Runtime, image: str) -> None:
    from api_client.dev.localstack import free_ports

    job_id = submit(runtime, job(image))
    with pytest.raises(RetryLater) as later:
        execute(unreachable_s3(runtime, free_ports(1)[0]), job(image), Delivery(job_id))
    assert later.value.error.code == "storage_unavailable"
    assert 0 <= later.value.countdown <= runtime.settings.retry_backoff_s
    st = runtime.status.get(job_id)
    assert st.state is JobState.queued and st.stage.startswith("retrying: storage_unavailable")
    execute(runtime, job(image), Delivery(job_id, retries=1))  # Celery's next delivery
    st = runtime.status.get(job_id)
    assert st.state is JobState.succeeded and st.attempts == 2


def test_retries_stop_when_the_time_budget_is_spent_and_say_how_long(
    runtime: Runtime, image: str
) -> None:
    from api_client.dev.localstack import free_ports

    job_id = submit(runtime, job(image))
    down = unreachable_s3(runtime, free_ports(1)[0])
    retries = 0
    started = time.monotonic()
    while True:  # Celery's deliveries, one after another, with no real countdown between
        try:
            execute(down, job(image), Delivery(job_id, retries=retries))
            break
        except RetryLater:
            retries += 1
            time.sleep(0.1)
    spent = time.monotonic() - started
    st = runtime.status.get(job_id)
    assert st.state is JobState.failed and st.error.code == "storage_unavailable"
    assert "gave up after retrying for" in st.error.message and "SEGQ_RETRY_BUDGET_S=1.5" in st.error.message
    assert spent >= runtime.settings.retry_budget_s and retries >= 3  # a budget, not a count


def test_a_job_over_its_time_limit_fails_with_timeout(runtime: Runtime, image: str) -> None:
    late = Runtime(runtime.settings.model_copy(update={"soft_time_limit_s": 0}), models=runtime.models)
    job_id = submit(runtime, job(image))
    execute(late, job(image), Delivery(job_id))
    st = runtime.status.get(job_id)
    assert st.state is JobState.failed and st.error.code == "timeout"


def test_a_cancelled_job_is_skipped_and_writes_nothing(runtime: Runtime, image: str) -> None:
    job_id = submit(runtime, job(image))
    runtime.status.cancel(job_id)
    assert execute(runtime, job(image), Delivery(job_id)) is None
    st = runtime.status.get(job_id)
    assert st.state is JobState.cancelled and st.attempts == 0 and st.result is None


def test_a_redelivery_after_a_lost_worker_runs_the_job_again(runtime: Runtime, image: str) -> None:
    job_id = submit(runtime, job(image))
    runtime.status.start(job_id, "lost-worker@node")  # it died right after this
    execute(runtime, job(image), Delivery(job_id, worker="second@node"))
    st = runtime.status.get(job_id)
    assert st.state is JobState.succeeded and st.attempts == 2 and st.worker == "second@node"


def test_a_job_whose_worker_dies_every_time_ends_worker_lost(runtime: Runtime, image: str) -> None:
    job_id = submit(runtime, job(image))
    for _ in range(runtime.settings.max_deliveries):
        runtime.status.start(job_id, "crashing@node")
    execute(runtime, job(image), Delivery(job_id))
    st = runtime.status.get(job_id)
    assert st.state is JobState.failed and st.error.code == "worker_lost"


@pytest.mark.parametrize("good", [True, False])
def test_the_outcome_is_posted_to_the_webhook_and_recorded(
    runtime: Runtime, image: str, receiver: Receiver, good: bool
) -> None:
    payload = job(image, callback_url=receiver.url)
    if not good:
        payload["prompt"] = {"point": [-1, 0]}
    job_id = submit(runtime, payload)
    execute(runtime, payload, Delivery(job_id))
    runtime.webhooks.shutdown(wait=True)  # deliveries run beside the jobs; let them finish
    headers, body = receiver.requests[0]
    assert verify_signature(SECRET, headers["X-Segq-Timestamp"], body, headers["X-Segq-Signature"])
    event = json.loads(body)
    assert event["job_id"] == job_id
    assert event["event"] == ("job.succeeded" if good else "job.failed")
    st = runtime.status.get(job_id)
    assert st.webhook["delivered"] is True and st.webhook["status_code"] == 200
    if not good:
        assert event["error"]["code"] == "prompt_out_of_bounds"


def test_outputs_land_only_under_the_jobs_own_folder(runtime: Runtime, image: str) -> None:
    job_id = submit(runtime, job(image))
    result = execute(runtime, job(image), Delivery(job_id))
    prefix = f"{runtime.settings.output_prefix}{job_id}/"
    assert all(key.startswith(prefix) for key in [*result["outputs"].values(), result["manifest"]])
    assert INPUT_BUCKET not in result["bucket"]


def test_a_multi_page_tiff_is_segmented_on_its_first_page_and_the_result_says_so(
    runtime: Runtime,
) -> None:
    pages = [Image.fromarray(noise_rgb(64, 48, seed=s)) for s in range(3)]
    uri = runtime.storage.upload_input(
        f"jobs-test/{uuid.uuid4().hex}.tiff",
        encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
        "image/tiff",
    )
    payload = {"task": "cutout", "image": uri, "prompt": {"point": [30, 20]}}
    job_id = submit(runtime, payload)
    result = execute(runtime, payload, Delivery(job_id))
    assert result["frames"] == 3 and result["frame_used"] == 0
    assert runtime.status.get(job_id).state is JobState.succeeded
