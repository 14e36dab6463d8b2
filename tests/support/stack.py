"""A whole segq deployment on loopback for one test module: real Redis, real S3
(``weed mini``), a real worker subprocess with the tiny test models, and a client.

Each module gets its own Redis database (broker and statuses) and output prefix, so
modules never see each other's queues or jobs.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from api_client.client import SegmentationClient
from api_client.dev.localstack import RedisServer, S3Server
from api_client.dev.processes import WorkerProcess
from config import Settings
from tests.support.services import INPUT_BUCKET, OUTPUT_BUCKET

REPO = Path(__file__).resolve().parents[2]

_db = itertools.count(1)


@dataclass
class Stack:
    settings: Settings
    redis: RedisServer
    s3: S3Server
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def client(self) -> SegmentationClient:
        return SegmentationClient(self.settings)

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.s3.env(), **self.settings.to_env()}

    def worker(self, **kwargs: Any) -> WorkerProcess:
        kwargs.setdefault("cwd", REPO)
        w = WorkerProcess(self.settings, self.log_dir, extra_env=self.s3.env(), **kwargs)
        self.workers.append(w)
        return w

    def upload(self, data: bytes, name: str | None = None) -> str:
        key = f"uploads/{uuid.uuid4().hex[:8]}/{name or 'image.jpg'}"
        return self.client.upload(data, key, content_type="application/octet-stream")

    @contextmanager
    def paused(self, queue: str) -> Iterator[None]:
        """Every worker stops consuming ``queue`` inside the block: jobs sent there stay
        visibly ``queued`` until it ends."""
        control = self.client.celery.control
        hosts = [w.hostname for w in self.workers]
        control.cancel_consumer(queue, destination=hosts, reply=True, timeout=5)
        try:
            yield
        finally:
            control.add_consumer(queue, destination=hosts, reply=True, timeout=5)

    def stop_workers(self) -> None:
        for w in self.workers:
            w.terminate(timeout=20)
        self.workers.clear()


def make_stack(
    redis_server: RedisServer,
    s3_server: S3Server,
    sam2_repo: Path,
    detr_repo: Path,
    log_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    **overrides: Any,
) -> Stack:
    s3_server.start()
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    db = next(_db) % 16 or 1
    base = redis_server.url.rsplit("/", 1)[0]
    defaults = dict(
        redis_url=f"{base}/{db}",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
        input_bucket=INPUT_BUCKET,
        output_bucket=OUTPUT_BUCKET,
        output_prefix=f"jobs/{uuid.uuid4().hex[:10]}/",
        allowed_inputs=[f"s3://{INPUT_BUCKET}/"],
        sam2_dir=sam2_repo,
        detr_dir=detr_repo,
        providers=["CPUExecutionProvider"],
        s3_connect_timeout_s=2.0,
        s3_read_timeout_s=10.0,
        s3_max_attempts=2,
        retry_backoff_s=0.2,
        retry_backoff_max_s=2.0,
        worker_heartbeat_ttl_s=3.0,
    )
    settings = Settings(**{**defaults, **overrides})  # any default can be overridden
    import redis

    redis.Redis.from_url(settings.redis_url).flushdb()
    SegmentationClient(settings).storage.ensure_buckets([INPUT_BUCKET, OUTPUT_BUCKET])
    return Stack(settings=settings, redis=redis_server, s3=s3_server, log_dir=log_dir)


@pytest.fixture(scope="module")
def module_monkeypatch() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory, module_monkeypatch) -> Iterator[Stack]:
    """A stack with one running worker (threads pool, concurrency 2)."""
    s = make_stack(redis_server, s3_server, sam2_repo, detr_repo,
                   tmp_path_factory.mktemp("logs"), module_monkeypatch)
    s.worker().start()
    yield s
    s.stop_workers()
