"""Webhooks against a real HTTP receiver on loopback (so these settings allow private
addresses, except in the test that checks the refusal)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from config.contract import JobErrorInfo, JobState, JobStatus
from config.settings import Settings
from tests.support.receiver import Receiver
from worker.webhooks import deliver_for_job, sign, verify_signature

SECRET = "whsec-test"


def webhook_settings(**overrides: object) -> Settings:
    base = dict(
        webhook_secret=SECRET,
        webhook_allow_private=True,
        webhook_max_attempts=3,
        webhook_timeout_s=2.0,
        retry_backoff_s=0.01,
        retry_backoff_max_s=0.05,
    )
    return Settings(**{**base, **overrides})


def final_status(state: JobState = JobState.succeeded) -> JobStatus:
    now = time.time()
    extra: dict = (
        {"result": {"outputs": {"mask.png": "jobs/j1/mask.png"}, "scores": [0.93]}}
        if state is JobState.succeeded
        else {"error": JobErrorInfo(code="invalid_image", message="not an image")}
    )
    return JobStatus(
        job_id="j1", task="segq.segment", state=state, image="s3://segq-input/cat.jpg",
        created_at=now - 2, updated_at=now, started_at=now - 1, finished_at=now, attempts=1, **extra,
    )  # fmt: skip


def test_success_is_delivered_once_with_a_verifiable_signature(receiver: Receiver) -> None:
    result = deliver_for_job(webhook_settings(), final_status(), receiver.url)

    assert result is not None and result.delivered and result.attempts == 1 and result.status_code == 200
    [(headers, body)] = receiver.requests
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Segq-Event"] == "job.succeeded"
    assert headers["X-Segq-Delivery"] == result.delivery_id
    assert headers["Host"] == receiver.url.split("/")[2]
    assert verify_signature(SECRET, headers["X-Segq-Timestamp"], body, headers["X-Segq-Signature"])
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded"
    assert payload["job_id"] == "j1" and payload["task"] == "segq.segment" and payload["state"] == "succeeded"
    assert payload["result"]["outputs"] == {"mask.png": "jobs/j1/mask.png"}
    assert "error" not in payload
    assert payload["finished_at"] >= payload["started_at"] >= payload["created_at"]


def test_failure_carries_the_error_code(receiver: Receiver) -> None:
    result = deliver_for_job(webhook_settings(), final_status(JobState.failed), receiver.url)

    assert result is not None and result.delivered and result.event == "job.failed"
    [(headers, body)] = receiver.requests
    assert headers["X-Segq-Event"] == "job.failed"
    assert json.loads(body)["error"] == {"code": "invalid_image", "message": "not an image"}


def test_signature_verification_rejects_tampering_wrong_secret_and_replays() -> None:
    body = b'{"job_id":"j1"}'
    ts = str(int(time.time()))
    good = sign(SECRET, ts, body)
    assert verify_signature(SECRET, ts, body.decode(), good)
    assert not verify_signature(SECRET, ts, b'{"job_id":"j2"}', good)
    assert not verify_signature("other-secret", ts, body, good)
    assert not verify_signature(SECRET, ts, body, good.replace("sha256=", "sha1="))
    assert not verify_signature(SECRET, "not-a-number", body, good)
    old = str(int(time.time()) - 301)
    assert not verify_signature(SECRET, old, body, sign(SECRET, old, body))
    assert verify_signature(SECRET, old, body, sign(SECRET, old, body), tolerance_s=600)


def test_5xx_is_retried_until_it_succeeds(receiver: Receiver) -> None:
    receiver.codes = [500, 503, 200]
    result = deliver_for_job(webhook_settings(), final_status(), receiver.url)

    assert result is not None and result.delivered and result.attempts == 3
    ids = {headers["X-Segq-Delivery"] for headers, _ in receiver.requests}
    bodies = {body for _, body in receiver.requests}
    assert len(receiver.requests) == 3 and len(ids) == 1 and len(bodies) == 1


def test_429_is_retried_and_5xx_gives_up_after_max_attempts(receiver: Receiver) -> None:
    receiver.codes = [429, 502]
    result = deliver_for_job(webhook_settings(), final_status(), receiver.url)

    assert result is not None and not result.delivered
    assert result.attempts == 3 and result.status_code == 502 and result.error == "HTTP 502"
    assert len(receiver.requests) == 3


def test_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.codes = [400, 200]
    result = deliver_for_job(webhook_settings(), final_status(), receiver.url)

    assert result is not None and not result.delivered
    assert (result.attempts, result.status_code) == (1, 400)
    assert len(receiver.requests) == 1


def test_unreachable_receiver_gives_up_after_max_attempts() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    result = deliver_for_job(webhook_settings(), final_status(), f"http://127.0.0.1:{port}/hook")

    assert result is not None and not result.delivered
    assert result.attempts == 3 and result.status_code is None
    assert "ConnectionRefused" in result.error


def test_a_receiver_that_never_answers_times_out_and_is_retried() -> None:
    with socket.socket() as silent:  # accepts connections (kernel backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        result = deliver_for_job(webhook_settings(webhook_timeout_s=0.2), final_status(), url)

    assert result is not None and not result.delivered and result.attempts == 3
    assert "timed out" in result.error


def test_loopback_is_refused_unless_private_addresses_are_allowed(receiver: Receiver) -> None:
    result = deliver_for_job(webhook_settings(webhook_allow_private=False), final_status(), receiver.url)

    assert result is not None and not result.delivered and result.attempts == 1
    assert "invalid_url" in result.error and "loopback" in result.error
    assert receiver.requests == []


def test_no_secret_sends_no_signature(receiver: Receiver) -> None:
    result = deliver_for_job(webhook_settings(webhook_secret=""), final_status(), receiver.url)

    assert result is not None and result.delivered
    [(headers, _)] = receiver.requests
    assert "X-Segq-Signature" not in headers and "X-Segq-Timestamp" in headers


@pytest.mark.parametrize("state", [JobState.cancelled, JobState.running])
def test_only_succeeded_and_failed_jobs_send_webhooks(receiver: Receiver, state: JobState) -> None:
    status = final_status().model_copy(update={"state": state})
    assert deliver_for_job(webhook_settings(), status, receiver.url) is None
    assert deliver_for_job(webhook_settings(), final_status(), None) is None
    assert receiver.requests == []


# --- end to end: a real worker posts the job's outcome -----------------------------------


@pytest.fixture(scope="module")
def webhook_stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory, module_monkeypatch):
    from tests.support.stack import make_stack

    s = make_stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory.mktemp("logs"),
                   module_monkeypatch, webhook_secret=SECRET, webhook_allow_private=True)
    s.worker(concurrency=1).start()
    yield s
    s.stop_workers()


def test_worker_posts_signed_outcomes_of_real_jobs(webhook_stack, receiver):
    from tests.support.images import sample_jpeg

    uri = webhook_stack.upload(sample_jpeg())
    client = webhook_stack.client
    good = client.segment(uri, {"point": [100, 100]}, callback_url=receiver.url)
    bad = client.segment(uri, {"point": [9999, 1]}, callback_url=receiver.url)
    good.wait(timeout=60)
    with pytest.raises(Exception):
        bad.wait(timeout=60)
    deadline = time.monotonic() + 30
    while len(receiver.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    bodies = {}
    for headers, body in receiver.requests:
        assert verify_signature(SECRET, headers["X-Segq-Timestamp"], body, headers["X-Segq-Signature"])
        doc = json.loads(body)
        bodies[doc["job_id"]] = (headers["X-Segq-Event"], doc)
    assert bodies[good.id][0] == "job.succeeded" and bodies[good.id][1]["result"]["masks"]
    assert bodies[bad.id][0] == "job.failed"
    assert bodies[bad.id][1]["error"]["code"] == "prompt_out_of_bounds"
    while good.status().webhook is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert good.status().webhook["delivered"] is True
