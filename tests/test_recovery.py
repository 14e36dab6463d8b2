"""A dead worker's jobs go back to the queues within seconds (heartbeat TTL plus one sweep),
not after the broker's visibility timeout; a live worker's slow job is never taken from it;
a finished job whose acknowledgement was lost is not run again. Plus the pins on the
Celery and kombu internals the sweep relies on."""

from __future__ import annotations

import inspect
import json
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis
from celery import Celery
from celery.worker import state
from kombu.transport.redis import QoS
from PIL import Image

from config.celeryconfig import celery_config
from config.contract import JobState
from config.queues import UNACKED_HASH
from config.settings import Settings
from config.status import StatusStore
from config.workers import WorkerRegistry
from tests.support.images import encode, noise_rgb
from tests.support.stack import Stack, make_stack
from worker.recovery import UNACKED_INDEX, Recovery, restore_message

TTL_S = 2.0
IMAGE = encode(Image.fromarray(noise_rgb(96, 64, seed=3)), "PNG")
PROMPT = {"point": [40, 30]}


@pytest.fixture(scope="module")
def stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory, module_monkeypatch) -> Iterator[Stack]:
    # a visibility timeout far beyond the test: any recovery seen is the sweep's
    s = make_stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory.mktemp("logs"),
                   module_monkeypatch, worker_heartbeat_ttl_s=TTL_S, visibility_timeout_s=3600)  # fmt: skip
    yield s
    s.stop_workers()


def test_a_killed_workers_running_job_is_back_within_seconds(stack: Stack, tmp_path: Path) -> None:
    victim = stack.worker(name="victim", concurrency=1, imports=["tests.support.poison"])
    victim.env.update(POISON_SLOW_S="30")
    victim.start()
    job = stack.client.cutout(stack.upload(IMAGE, "slow-recover.png"), PROMPT)
    deadline = time.monotonic() + 30
    while job.status().state is not JobState.running:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    survivor = stack.worker(name="survivor", concurrency=1).start()
    victim.kill()
    killed = time.monotonic()
    st = job.wait(timeout=60)
    recovered_s = time.monotonic() - killed
    print(f"recovery: job done on {st.worker} {recovered_s:.1f}s after its worker was killed "
          f"(heartbeat TTL {TTL_S}s; visibility timeout 3600s)")  # fmt: skip
    assert st.worker == survivor.hostname and st.attempts == 2
    assert recovered_s < 60  # the visibility timeout is an hour
    stack.stop_workers()


def test_a_live_workers_slow_job_is_left_alone(stack: Stack) -> None:
    slow = stack.worker(name="slow", concurrency=1, imports=["tests.support.poison"])
    slow.env.update(POISON_SLOW_S=str(4 * TTL_S))
    slow.start()
    job = stack.client.cutout(stack.upload(IMAGE, "slow-keep.png"), PROMPT)
    deadline = time.monotonic() + 30
    while job.status().state is not JobState.running:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    other = stack.worker(name="other", concurrency=1).start()  # it sweeps too, and is idle
    st = job.wait(timeout=60)
    assert st.worker == slow.hostname and st.attempts == 1, st  # never handed to `other`
    assert other.proc.poll() is None
    stack.stop_workers()


def deliver_without_ack(app: Celery, queue: str, job_id: str):
    """A consumer that takes one message and never acknowledges it, as a dead worker left
    it: the message sits in kombu's unacked hash."""
    connection = app.connection_for_read()
    simple = connection.SimpleQueue(queue, no_ack=False)
    message = simple.get(timeout=5)
    assert message.headers["id"] == job_id
    return connection, message


def test_the_sweep_restores_an_unheld_job_and_drops_a_finished_one(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url)
    app = Celery("sweep", config_source=celery_config(settings), set_as_current=False)
    client = redis.Redis.from_url(redis_url)
    status = StatusStore(redis_url, ttl_s=60)
    registry = WorkerRegistry(client, ttl_s=0.2)
    queue = settings.queue_interactive
    pending, done = uuid.uuid4().hex, uuid.uuid4().hex
    for job_id in (pending, done):
        status.create(job_id, "segq.segment", None)
        app.send_task("segq.segment", args=[{}], task_id=job_id, queue=queue)
    held_by_the_dead = [deliver_without_ack(app, queue, job_id) for job_id in (pending, done)]
    status.start(done, "dead@node")
    status.succeed(done, {}, {})
    registry.beat("alive@node", {"held": []})  # a live worker that holds neither
    time.sleep(0.3)  # both messages are older than the TTL now

    report = Recovery(app, registry, status, interval_s=1).sweep()
    assert report.restored == [pending] and report.dropped == [done]
    assert client.hlen(UNACKED_HASH) == 0 and client.zcard(UNACKED_INDEX) == 0
    restored = json.loads(client.lrange(queue, 0, -1)[0])
    assert restored["headers"]["id"] == pending and restored["headers"]["redelivered"] is True
    for connection, _ in held_by_the_dead:
        connection.close()


def test_the_sweep_leaves_a_message_a_live_worker_holds(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url)
    app = Celery("sweep", config_source=celery_config(settings), set_as_current=False)
    client = redis.Redis.from_url(redis_url)
    status = StatusStore(redis_url, ttl_s=60)
    registry = WorkerRegistry(client, ttl_s=0.2)
    job_id = uuid.uuid4().hex
    status.create(job_id, "segq.segment", None)
    app.send_task("segq.segment", args=[{}], task_id=job_id, queue=settings.queue_interactive)
    connection, _ = deliver_without_ack(app, settings.queue_interactive, job_id)
    time.sleep(0.3)
    registry.beat("busy@node", {"held": [job_id]})
    report = Recovery(app, registry, status, interval_s=1).sweep()
    assert report.restored == [] and report.held == 1 and client.hlen(UNACKED_HASH) == 1
    connection.close()


# --- pins -------------------------------------------------------------------------------------


def test_celery_keeps_the_jobs_a_worker_holds_in_worker_state_requests() -> None:
    """``worker.recovery.held_job_ids`` lists ``celery.worker.state.requests``: received
    jobs go in (reserved, or scheduled for a retry's countdown) and leave when done."""
    assert isinstance(state.requests, dict)
    add = inspect.signature(state.task_reserved).parameters["add_request"].default
    scheduled = inspect.signature(state.task_scheduled).parameters["add_request"].default
    remove = inspect.signature(state.task_ready).parameters["remove_request"].default
    assert add == state.requests.__setitem__ and scheduled == state.requests.__setitem__
    assert remove == state.requests.pop


def test_kombu_restores_an_unacknowledged_message_by_its_tag(redis_url: str) -> None:
    assert list(inspect.signature(QoS.restore_by_tag).parameters) == ["self", "tag", "client", "leftmost"]
    settings = Settings(redis_url=redis_url)
    app = Celery("pin", config_source=celery_config(settings), set_as_current=False)
    app.send_task("segq.segment", args=[{}], task_id="pin-restore", queue=settings.queue_batch)
    connection, message = deliver_without_ack(app, settings.queue_batch, "pin-restore")
    client = redis.Redis.from_url(redis_url)
    assert client.hlen(UNACKED_HASH) == 1
    restore_message(app, message.delivery_tag)
    assert client.hlen(UNACKED_HASH) == 0 and client.llen(settings.queue_batch) == 1
    connection.close()
