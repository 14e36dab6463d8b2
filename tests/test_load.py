"""2,000 jobs through two worker processes (the tiny test models): every job ends
``succeeded``, none runs twice, none is lost, and Redis gives its memory back once the
statuses' TTL has passed. Prints jobs per second and Redis memory.

Producers submit from several threads but keep at most ``IN_FLIGHT`` jobs outstanding, as
a web front end does: with a 30 s status TTL a job must not wait in the queue longer than
its record lives. Run with ``make test-long`` (``-m load``).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from PIL import Image

from api_client.dev.localstack import RedisServer
from config.contract import status_key
from tests.support.images import encode, noise_rgb
from tests.support.stack import Stack, make_stack

pytestmark = pytest.mark.load

JOBS = 2000
PANOPTIC_EVERY = 8  # one job in eight is panoptic, the rest segment
PRODUCERS = 4
IN_FLIGHT = 300
STATUS_TTL_S = 30
DEADLINE_S = 600  # the whole run, submission to the last final status
SIZES = [(64, 48), (96, 72), (120, 90), (160, 120), (48, 64), (200, 150)]


@pytest.fixture(scope="module")
def stack(s3_server, sam2_repo, detr_repo, tmp_path_factory, module_monkeypatch) -> Iterator[Stack]:
    """Its own Redis, so its memory figures are this run's alone, and two workers."""
    redis_dir = tmp_path_factory.mktemp("redis")
    with RedisServer(data_dir=redis_dir) as server:
        s = make_stack(
            server,
            s3_server,
            sam2_repo,
            detr_repo,
            tmp_path_factory.mktemp("logs"),
            module_monkeypatch,
            status_ttl_s=STATUS_TTL_S,
        )
        workers = [s.worker(name=f"load{i}").start(wait=False) for i in range(2)]
        try:
            for w in workers:
                w.wait_ready()
            yield s
        finally:
            s.stop_workers()


@dataclass
class Run:
    """What the monitor saw: each job's final record, and Redis while jobs ran."""

    submitted: list[str] = field(default_factory=list)
    final: dict[str, dict] = field(default_factory=dict)
    peak_memory: int = 0
    peak_keys: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def produce(
    stack: Stack, uris: list[str], count: int, seed: int, slots: threading.Semaphore, run: Run
) -> None:
    rng = random.Random(seed)
    client = stack.client
    for n in range(count):
        slots.acquire()
        i = rng.randrange(len(uris))
        if n % PANOPTIC_EVERY == 0:
            job = client.panoptic(uris[i])
        else:
            w, h = SIZES[i]
            job = client.segment(uris[i], {"point": [rng.uniform(0, w), rng.uniform(0, h)]})
        with run.lock:
            run.submitted.append(job.id)


def monitor(r: redis.Redis, run: Run, slots: threading.Semaphore, deadline: float) -> None:
    """Poll every outstanding job's record (MGET, a few hundred at a time) until all are
    final, freeing a producer slot for each; records are read well within their TTL."""
    while len(run.final) < JOBS:
        assert time.monotonic() < deadline, (
            f"only {len(run.final)} of {JOBS} jobs final by the deadline"
        )
        with run.lock:
            pending = [j for j in run.submitted if j not in run.final]
        for start in range(0, len(pending), 500):
            chunk = pending[start : start + 500]
            for job_id, raw in zip(chunk, r.mget([status_key(j) for j in chunk])):
                record = json.loads(raw) if raw is not None else None
                if record is not None and record["state"] in ("succeeded", "failed", "cancelled"):
                    run.final[job_id] = record
                    slots.release()
        memory = r.info("memory")["used_memory"]
        run.peak_memory = max(run.peak_memory, memory)
        run.peak_keys = max(run.peak_keys, r.dbsize())
        time.sleep(0.2)


@pytest.mark.timeout(DEADLINE_S + STATUS_TTL_S + 240)
def test_two_thousand_jobs_through_two_workers(stack: Stack) -> None:
    r = redis.Redis.from_url(stack.settings.redis_url)
    uris = [
        stack.upload(encode(Image.fromarray(noise_rgb(w, h, seed=i)), "PNG"), f"load-{i}.png")
        for i, (w, h) in enumerate(SIZES)
    ]
    memory_before, keys_before = r.info("memory")["used_memory"], r.dbsize()
    names_before = set(r.scan_iter(count=1000))

    run = Run()
    slots = threading.Semaphore(IN_FLIGHT)
    per_producer = [JOBS // PRODUCERS + (k < JOBS % PRODUCERS) for k in range(PRODUCERS)]
    producers = [
        threading.Thread(target=produce, args=(stack, uris, n, k, slots, run), daemon=True)
        for k, n in enumerate(per_producer)
    ]
    started = time.monotonic()
    for p in producers:
        p.start()
    monitor(r, run, slots, started + DEADLINE_S)
    elapsed = time.monotonic() - started
    for p in producers:
        p.join(timeout=10)

    # every job ended succeeded, exactly once
    assert len(run.submitted) == len(set(run.submitted)) == JOBS
    states = Counter(rec["state"] for rec in run.final.values())
    errors = Counter(rec["error"]["code"] for rec in run.final.values() if rec.get("error"))
    assert states == {"succeeded": JOBS}, (states, errors)
    # one run each, besides handovers to the worker holding the image's embedding
    assert {rec["attempts"] - rec["handovers"] for rec in run.final.values()} == {1}
    executions = Counter(
        job_id
        for w in stack.workers
        for job_id in re.findall(r"Task segq\.\w+\[(\w+)\] succeeded in", w.log())
    )
    assert set(executions) == set(run.submitted) and set(executions.values()) == {1}
    by_worker = Counter(rec["worker"] for rec in run.final.values())
    assert len(by_worker) == 2, by_worker  # both workers took part

    # none lost: one manifest per job in S3
    s3 = stack.s3.client()
    manifests = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=stack.settings.output_bucket, Prefix=stack.settings.output_prefix
        )
        for obj in page.get("Contents", [])
        if obj["Key"].endswith("/manifest.json")
    ]
    assert sorted(k.split("/")[-2] for k in manifests) == sorted(run.submitted)

    # Redis gives the memory back once the statuses expire
    expiry_deadline = time.monotonic() + STATUS_TTL_S + 60
    while next(r.scan_iter("segq:job:*", count=1000), None) is not None:
        assert time.monotonic() < expiry_deadline, "job records outlived their TTL"
        time.sleep(1)
    memory_after, keys_after = r.info("memory")["used_memory"], r.dbsize()
    print(
        f"\n{JOBS} jobs ({dict(Counter(rec['task'] for rec in run.final.values()))}) in "
        f"{elapsed:.1f}s: {JOBS / elapsed:.1f} jobs/s; per worker {dict(by_worker)}\n"
        f"redis used_memory: before {memory_before / 2**20:.2f} MiB, peak "
        f"{run.peak_memory / 2**20:.2f} MiB, after TTL {memory_after / 2**20:.2f} MiB; "
        f"keys: before {keys_before}, peak {run.peak_keys}, after TTL {keys_after}"
    )
    # what stays is per worker and per image held (the workers' own queues' bindings, the
    # embedding claims, refreshed while held), never per job
    left = sorted(set(r.scan_iter(count=1000)) - names_before)
    per_job = [k for k in left if not k.startswith((b"_kombu.binding", b"segq:affinity:"))]
    assert len(per_job) <= 5, per_job
    assert len(left) - len(per_job) <= 2 * len(stack.workers) + len(SIZES) + 2, left
    assert memory_after < memory_before + 2**20
