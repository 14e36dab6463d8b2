"""Worker heartbeats: a live worker stays alive however long its jobs take, a killed one
disappears within one TTL, a warm shutdown removes it at once."""

from __future__ import annotations

import time

import redis

from config.workers import Heartbeat, WorkerRegistry
from tests.support.stack import Stack


def test_a_heartbeat_keeps_a_worker_alive_past_its_ttl_and_stop_removes_it(redis_url: str) -> None:
    registry = WorkerRegistry(redis.Redis.from_url(redis_url), ttl_s=0.5)
    beat = Heartbeat(registry, "w1@test", lambda: {"queues": ["q"]}).start()
    time.sleep(1.2)  # more than two TTLs
    assert registry.alive(["w1@test", "w2@test"]) == {"w1@test"}
    assert registry.all_alive()["w1@test"]["queues"] == ["q"]
    beat.stop(gone=True)
    assert registry.alive(["w1@test"]) == set()


def test_a_silent_worker_expires(redis_url: str) -> None:
    registry = WorkerRegistry(redis.Redis.from_url(redis_url), ttl_s=0.3)
    registry.beat("w@test")
    assert registry.alive(["w@test"]) == {"w@test"}
    time.sleep(0.5)
    assert registry.alive(["w@test"]) == set()


def test_real_workers_beat_and_a_killed_one_disappears_within_its_ttl(stack: Stack) -> None:
    registry = WorkerRegistry(redis.Redis.from_url(stack.settings.redis_url))
    worker = stack.worker(name="beat", concurrency=1).start()
    try:
        assert worker.hostname in registry.alive([worker.hostname])
        record = registry.all_alive()[worker.hostname]
        assert record["pid"] == worker.pid and stack.settings.queue_interactive in record["queues"]
    finally:
        worker.kill()
    deadline = time.monotonic() + stack.settings.worker_heartbeat_ttl_s + 5
    while worker.hostname in registry.alive([worker.hostname]):
        assert time.monotonic() < deadline, "a killed worker stayed alive"
        time.sleep(0.2)


def test_a_warm_shutdown_is_gone_at_once(stack: Stack) -> None:
    registry = WorkerRegistry(redis.Redis.from_url(stack.settings.redis_url))
    worker = stack.worker(name="bye", concurrency=1).start()
    assert worker.hostname in registry.alive([worker.hostname])
    worker.terminate()
    assert registry.alive([worker.hostname]) == set()
