"""Outages of minutes lose nothing and fail nothing (marked ``long``; ``make test-long``).

A burst of 200 jobs goes to two real workers; then S3 is stopped for 60 s, or Redis (the
broker and the status store, AOF on) is SIGKILLed and kept down for 30 s, optionally with a
worker SIGKILLed during the outage too. Every job must end ``succeeded``, once, with whole
outputs. The figures (how long the burst took, how many deliveries were retries) are
printed for the README's Guarantees.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections import Counter
from typing import Iterator

import kombu.pools
import pytest
from PIL import Image

from config.contract import JobState
from tests.support.images import encode, noise_rgb
from tests.support.stack import Stack, make_stack

pytestmark = [pytest.mark.long, pytest.mark.timeout(900)]

BURST = 200
IMAGE = encode(Image.fromarray(noise_rgb(64, 48, seed=11)), "PNG")


@pytest.fixture
def stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path, monkeypatch) -> Iterator[Stack]:
    s = make_stack(
        redis_server, s3_server, sam2_repo, detr_repo, tmp_path, monkeypatch,
        retry_backoff_s=0.5, retry_backoff_max_s=5.0, s3_read_timeout_s=3.0,
        visibility_timeout_s=3600, worker_heartbeat_ttl_s=5.0,
    )  # fmt: skip
    yield s
    s.stop_workers()
    kombu.pools.reset()  # connections whose sockets Redis dropped


def burst(stack: Stack) -> list:
    uri = stack.upload(IMAGE, "burst.png")
    return [stack.client.segment(uri, {"point": [30, 20]}) for _ in range(BURST)]


def finish(stack: Stack, jobs: list, started: float, what: str) -> None:
    """Every job succeeded once, with its manifest and outputs in S3."""
    deadline = time.monotonic() + 600
    states: Counter = Counter()
    attempts: Counter = Counter()
    for job in jobs:
        st = job.wait(timeout=max(1.0, deadline - time.monotonic()))
        states[st.state.value] += 1
        attempts[st.attempts] += 1
        manifest = json.loads(job.output("manifest.json"))
        assert manifest["job_id"] == job.id and manifest["result"]["outputs"] == st.result["outputs"]
        Image.open(io.BytesIO(job.output("mask_0.png"))).load()
    print(f"{what}: {BURST} jobs succeeded {time.monotonic() - started:.0f}s after the burst; "
          f"deliveries per job {dict(sorted(attempts.items()))}")  # fmt: skip
    assert states == {JobState.succeeded.value: BURST}


def wait_running(jobs: list, count: int = 3) -> None:
    deadline = time.monotonic() + 60
    while sum(job.status().state is not JobState.queued for job in jobs) < count:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("kill_a_worker", [False, True])
def test_s3_down_for_a_minute(stack: Stack, s3_server, kill_a_worker: bool) -> None:
    workers = [stack.worker(name=f"s3-{i}").start() for i in range(2)]
    jobs = burst(stack)
    started = time.monotonic()
    wait_running(jobs)
    s3_server.stop()
    try:
        time.sleep(20)
        if kill_a_worker:
            workers[0].kill()  # with jobs in its hands: running, or waiting for a retry
        time.sleep(40)
    finally:
        s3_server.start()
    finish(stack, jobs, started, f"S3 down 60 s{', a worker killed' if kill_a_worker else ''}")


@pytest.mark.parametrize("kill_a_worker", [False, True])
def test_redis_down_for_thirty_seconds(stack: Stack, redis_server, kill_a_worker: bool) -> None:
    workers = [stack.worker(name=f"redis-{i}").start() for i in range(2)]
    jobs = burst(stack)
    started = time.monotonic()
    wait_running(jobs)
    os.kill(redis_server.pid, signal.SIGKILL)  # a crash: only the AOF keeps the data
    redis_server.stop()
    try:
        time.sleep(10)
        if kill_a_worker:
            workers[0].kill()
        time.sleep(20)
    finally:
        redis_server.start()
    finish(stack, jobs, started, f"Redis down 30 s{', a worker killed' if kill_a_worker else ''}")
