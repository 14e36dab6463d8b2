"""Job status against a real redis-server: the state machine, atomicity under races,
TTLs, idempotency, surviving a Redis restart, and password-protected Redis."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError

from api_client.dev.localstack import RedisServer
from config.contract import IDEMPOTENCY_KEY, JobState, JobStatus, events_channel, status_key
from config.errors import IdempotencyConflict, InvalidTransition, JobNotFound
from config.status import StatusStore

TTL = 600
IMAGE = "s3://segq-input/cat.jpg"


@pytest.fixture
def store(redis_url: str) -> StatusStore:
    return StatusStore(redis_url, ttl_s=TTL)


def test_unknown_job_is_none_and_distinct_from_queued(store: StatusStore) -> None:
    assert store.get("nope") is None
    created = store.create("j1", "segq.segment", IMAGE)
    got = store.get("j1")
    assert got == created
    assert got.state is JobState.queued and got.attempts == 0 and got.image == IMAGE


def test_happy_path_records_attempts_stage_result_and_times(store: StatusStore) -> None:
    store.create("j1", "segq.segment", IMAGE)
    running = store.start("j1", "worker-a")
    assert (
        running.state is JobState.running and running.attempts == 1 and running.worker == "worker-a"
    )
    assert running.started_at is not None
    assert store.stage("j1", "inference").stage == "inference"
    done = store.succeed(
        "j1", {"outputs": {"mask.png": "jobs/j1/mask.png"}, "labels": []}, {"inference": 0.5}
    )
    assert done.state is JobState.succeeded and done.is_final
    assert done.finished_at >= done.started_at >= done.created_at
    again = store.get("j1")
    assert again.result == {
        "outputs": {"mask.png": "jobs/j1/mask.png"},
        "labels": [],
    }  # [] stays a list
    assert again.timings == {"inference": 0.5}


def test_duplicate_create_does_not_reset(store: StatusStore) -> None:
    store.create("j1", "segq.segment", IMAGE)
    store.start("j1", "w")
    again = store.create("j1", "segq.segment", IMAGE)
    assert again.state is JobState.running and again.attempts == 1


def test_retry_cycle_counts_attempts(store: StatusStore) -> None:
    store.create("j1", "segq.panoptic", IMAGE)
    store.start("j1", "w1")
    requeued = store.requeue("j1", "storage_unavailable: S3 timed out")
    assert requeued.state is JobState.queued and requeued.worker is None
    assert "storage_unavailable" in requeued.stage
    restarted = store.start("j1", "w2")
    assert restarted.attempts == 2 and restarted.worker == "w2"
    # a redelivery of a job whose worker died: running -> running, counted again
    assert store.start("j1", "w3").attempts == 3


def test_a_handover_is_counted_apart_from_other_attempts(store: StatusStore) -> None:
    store.create("j1", "segq.segment", IMAGE)
    store.start("j1", "w1")
    moved = store.handover("j1", "moved to w2, which holds the image's embedding")
    assert moved.state is JobState.queued and moved.worker is None and moved.handovers == 1
    done = store.start("j1", "w2")
    assert done.attempts == 2 and done.handovers == 1  # one run of its own, one handover


def test_fail_keeps_code_and_details(store: StatusStore) -> None:
    store.create("j1", "segq.segment", IMAGE)
    store.start("j1", "w")
    failed = store.fail("j1", "invalid_image", "not an image", {"bytes": 12})
    assert failed.state is JobState.failed
    assert (failed.error.code, failed.error.message, failed.error.details) == (
        "invalid_image",
        "not an image",
        {"bytes": 12},
    )
    # the first ending stands: a late failure report changes nothing
    assert store.fail("j1", "timeout", "too slow") is None
    assert store.get("j1").error.code == "invalid_image"


def test_queued_job_can_fail_without_running(store: StatusStore) -> None:
    store.create("j1", "segq.segment", IMAGE)
    assert store.fail("j1", "invalid_payload", "bad").state is JobState.failed


def test_cancel_queued_and_worker_skips_it(store: StatusStore) -> None:
    store.create("j1", "segq.segment", IMAGE)
    assert store.cancel("j1").state is JobState.cancelled
    assert store.start("j1", "w") is None
    assert store.get("j1").state is JobState.cancelled


@pytest.mark.parametrize("setup", ["running", "succeeded", "failed", "cancelled"])
def test_cancel_refused_once_running_or_over(store: StatusStore, setup: str) -> None:
    store.create("j1", "segq.segment", IMAGE)
    if setup != "cancelled":
        store.start("j1", "w")
    {"succeeded": lambda: store.succeed("j1", {}, {}), "failed": lambda: store.fail("j1", "x", "y"),
     "cancelled": lambda: store.cancel("j1"), "running": lambda: None}[setup]()  # fmt: skip
    with pytest.raises(InvalidTransition) as err:
        store.cancel("j1")
    assert err.value.code == "invalid_transition" and err.value.details["state"] == setup
    assert store.get("j1").state.value == setup


def test_illegal_transitions_raise_and_change_nothing(store: StatusStore) -> None:
    store.create("j1", "segq.segment", IMAGE)
    for action in (
        lambda: store.succeed("j1", {}, {}),
        lambda: store.stage("j1", "inference"),
        lambda: store.requeue("j1", "why"),
    ):
        with pytest.raises(InvalidTransition):
            action()
    assert store.get("j1").state is JobState.queued
    store.start("j1", "w")
    store.succeed("j1", {}, {})
    assert store.start("j1", "w") is None  # over: the worker skips a redelivery
    for action in (lambda: store.succeed("j1", {}, {}), lambda: store.requeue("j1", "why")):
        with pytest.raises(InvalidTransition):
            action()
    assert store.get("j1").state is JobState.succeeded


@pytest.mark.parametrize(
    "action",
    ["start", "stage", "succeed", "fail", "requeue", "cancel"],
)
def test_transitions_on_unknown_job_raise_job_not_found(store: StatusStore, action: str) -> None:
    call = {
        "start": lambda: store.start("ghost", "w"),
        "stage": lambda: store.stage("ghost", "x"),
        "succeed": lambda: store.succeed("ghost", {}, {}),
        "fail": lambda: store.fail("ghost", "c", "m"),
        "requeue": lambda: store.requeue("ghost", "r"),
        "cancel": lambda: store.cancel("ghost"),
    }[action]
    with pytest.raises(JobNotFound) as err:
        call()
    assert err.value.code == "job_not_found"
    assert store.get("ghost") is None


def test_every_write_refreshes_the_ttl(store: StatusStore) -> None:
    key = status_key("j1")
    store.create("j1", "segq.segment", IMAGE)
    assert 0 < store.redis.ttl(key) <= TTL
    store.redis.expire(key, 5)
    store.start("j1", "w")
    assert store.redis.ttl(key) > 5


def test_start_and_cancel_race_never_both_win(store: StatusStore) -> None:
    rounds = 40
    for i in range(rounds):
        store.create(f"race{i}", "segq.segment", IMAGE)
    outcomes: list[tuple[str, str]] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        for i in range(rounds):
            barrier.wait()
            outcomes.append((f"race{i}", "start" if store.start(f"race{i}", "w") else "skip"))

    def canceller() -> None:
        for i in range(rounds):
            barrier.wait()
            try:
                store.cancel(f"race{i}")
                outcomes.append((f"race{i}", "cancel"))
            except InvalidTransition:
                outcomes.append((f"race{i}", "too late"))

    threads = [threading.Thread(target=worker), threading.Thread(target=canceller)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == 2 * rounds
    for i in range(rounds):
        job = f"race{i}"
        seen = sorted(what for j, what in outcomes if j == job)
        final = store.get(job)
        # exactly one side wins, and the stored state agrees with the winner
        assert seen in (["cancel", "skip"], ["start", "too late"]), (job, seen)
        assert final.state is (JobState.cancelled if "cancel" in seen else JobState.running)
        assert final.attempts == (0 if "cancel" in seen else 1)


def test_concurrent_writers_lose_no_update(store: StatusStore) -> None:
    # many writers on one record: WATCH retries make each read-modify-write whole
    store.create("j1", "segq.segment", IMAGE)
    store.start("j1", "w")
    threads = [
        threading.Thread(target=lambda: [store.start("j1", "w") for _ in range(10)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert store.get("j1").attempts == 41


def test_idempotency_key_returns_the_first_job(store: StatusStore) -> None:
    assert store.idempotent_create("upload-42", "first", "segq.segment", IMAGE) == ("first", True)
    assert store.idempotent_create("upload-42", "second", "segq.segment", IMAGE) == ("first", False)
    assert store.get("first").state is JobState.queued
    assert store.get("second") is None
    assert 0 < store.redis.ttl(IDEMPOTENCY_KEY.format(key="upload-42")) <= TTL


def test_idempotency_under_concurrency_creates_one_job(store: StatusStore) -> None:
    results: list[tuple[str, bool]] = []
    threads = [
        threading.Thread(
            target=lambda n=n: results.append(
                store.idempotent_create("k", f"job{n}", "segq.segment", IMAGE)
            )
        )
        for n in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len({job for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_discard_forgets_a_never_enqueued_job(store: StatusStore) -> None:
    store.idempotent_create("k", "j1", "segq.segment", IMAGE)
    store.discard("j1", "k")
    assert store.get("j1") is None
    assert store.idempotent_create("k", "j2", "segq.segment", IMAGE) == ("j2", True)
    store.start("j2", "w")
    store.discard("j2", "other-key")  # a running job is not "never enqueued"
    assert store.get("j2").state is JobState.running


def test_store_survives_redis_restart_and_records_persist(
    redis_server: RedisServer, store: StatusStore
) -> None:
    store.create("j1", "segq.segment", IMAGE)
    store.start("j1", "w")
    redis_server.stop()
    try:
        redis_server.start()
        # the client's pooled connection died with the server; the call reconnects
        assert store.get("j1").state is JobState.running  # the AOF kept it
        assert store.stage("j1", "inference").stage == "inference"
        assert store.succeed("j1", {}, {}).state is JobState.succeeded
    finally:
        redis_server.start()


def test_redis_down_while_calling_reconnects_when_it_returns(
    redis_server: RedisServer, store: StatusStore
) -> None:
    store.create("j1", "segq.segment", IMAGE)
    redis_server.stop()
    restarter = threading.Timer(0.5, redis_server.start)
    restarter.start()
    try:
        # issued while the server is down: backoff and retries carry it over the gap
        assert store.start("j1", "w").state is JobState.running
    finally:
        restarter.join()
        redis_server.start()


def test_password_protected_redis(tmp_path) -> None:
    with RedisServer(password="s3cret-pw", data_dir=tmp_path) as server:
        assert ":s3cret-pw@" in server.url
        store = StatusStore(server.url, ttl_s=TTL)
        store.create("j1", "segq.segment", IMAGE)
        assert store.get("j1").state is JobState.queued
        # refused at once, not retried as if the server were down
        for url in (
            server.url.replace(":s3cret-pw@", ""),
            server.url.replace("s3cret-pw", "wrong"),
        ):
            with pytest.raises(AuthenticationError):
                StatusStore(url, ttl_s=TTL).get("j1")


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate"
)
def test_tls_redis_url(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with RedisServer(password="pw", tls=(cert, key), data_dir=tmp_path / "redis") as server:
        assert server.url.startswith("rediss://:pw@")
        store = StatusStore(server.url, ttl_s=TTL)
        store.create("j1", "segq.segment", IMAGE)
        assert store.get("j1").state is JobState.queued


def test_webhook_outcome_is_recorded_on_a_final_job(store: StatusStore) -> None:
    store.create("j1", "segq.segment", IMAGE)
    store.start("j1", "w")
    store.succeed("j1", {}, {})
    recorded = store.record_webhook("j1", {"status": 200, "attempts": 1})
    assert recorded.state is JobState.succeeded
    assert store.get("j1").webhook == {"status": 200, "attempts": 1}


def test_the_same_key_with_another_request_is_a_conflict(store: StatusStore) -> None:
    assert store.idempotent_create("k", "j1", "segq.segment", IMAGE, fingerprint="a" * 64) == ("j1", True)
    assert store.idempotent_create("k", "j2", "segq.segment", IMAGE, fingerprint="a" * 64) == ("j1", False)
    with pytest.raises(IdempotencyConflict) as err:
        store.idempotent_create("k", "j3", "segq.segment", IMAGE, fingerprint="b" * 64)
    assert err.value.details["job_id"] == "j1" and store.get("j3") is None
    store.discard("j1", "k")  # never enqueued: the key and its fingerprint go together
    assert store.idempotent_create("k", "j4", "segq.segment", IMAGE, fingerprint="b" * 64) == ("j4", True)


def test_every_transition_is_published_on_the_jobs_channel(store: StatusStore) -> None:
    """The HTTP API's event streams subscribe here: one publish per status change, in the
    same transaction as the write, carrying the new record."""
    store.create("j1", "segq.segment", IMAGE)
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events_channel("j1"))
    store.start("j1", "w1")
    store.stage("j1", "inference")
    store.succeed("j1", {"masks": []}, {"encode_image": 0.1})
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message:
            seen.append(JobStatus.model_validate_json(message["data"]))
    pubsub.close()
    assert [(s.state.value, s.stage) for s in seen] == [
        ("running", None), ("running", "inference"), ("succeeded", None)]  # fmt: skip
    assert seen[-1] == store.get("j1")
