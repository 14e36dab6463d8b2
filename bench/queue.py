"""End to end through Celery, Redis and S3 on loopback, against the same job in-process.

A real ``segq worker`` subprocess (``api_client.cli``, as deployed), real Redis and S3
servers (``api_client.dev.localstack``) and the producer's ``SegmentationClient``. Every job
reads its own copy of the photo (another S3 key, so the embedding cache never hits) and
uses the default options. Job time is the status record's ``finished_at - created_at``
(submit to succeeded, both stamped on this machine); the pipeline time is the sum of the
pipeline's own stages that the worker reports for that very job, so the queue overhead of
each job is a ratio measured within the job itself.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from api_client.client import SegmentationClient
from api_client.health import ask_workers
from api_client.dev.localstack import RedisServer, S3Server
from bench.pipeline import STAGES
from config.contract import JobState
from config.settings import Settings

REPO = Path(__file__).resolve().parents[1]
INPUT_BUCKET, OUTPUT_BUCKET = "segq-input", "segq-output"


@contextmanager
def local_services() -> Iterator[tuple[RedisServer, S3Server]]:
    """Redis and S3 on loopback for the length of the block; this process's boto3 (the
    client's uploads) signs with the S3 server's keys."""
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        s3 = stack.enter_context(S3Server(buckets=[INPUT_BUCKET, OUTPUT_BUCKET]))
        os.environ.update(s3.env())
        yield redis, s3


class Worker:
    """One ``segq worker`` subprocess with the given pool, concurrency and settings."""

    def __init__(self, settings: Settings, s3: S3Server, *, pool: str, concurrency: int) -> None:
        self.settings = settings
        self.hostname = f"bench-{uuid.uuid4().hex[:6]}@{pool}{concurrency}"
        env = {**os.environ, **s3.env(), **_settings_env(settings), "PYTHONUNBUFFERED": "1"}
        self.log = tempfile.NamedTemporaryFile(
            prefix="segq-bench-worker-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api_client.cli", "worker", "--pool", pool,
             "--concurrency", str(concurrency), "--hostname", self.hostname, "--loglevel", "INFO"],
            env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.pool, self.concurrency = pool, concurrency

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until the worker answers ready (prefork: until every child has loaded its models)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.log_tail()}")
            report = ask_workers(self.settings, hostname=self.hostname, timeout=1.0).get(
                self.hostname
            )
            if report and (report.get("ready") or self._children_loaded()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"worker not ready after {timeout:.0f}s: {self.log_tail()}")

    def _children_loaded(self) -> bool:
        """A prefork worker's main process holds no models (its children do, loaded after
        the fork), so it never answers ready; each child logs when its models are."""
        return (
            self.pool == "prefork" and self.log_tail(None).count("models ready") >= self.concurrency
        )

    def rss_bytes(self) -> int:
        """Resident memory of the worker and its pool children, together."""
        return _rss(self.proc.pid) + sum(_children_rss(self.proc.pid))

    def log_tail(self, chars: Optional[int] = 3000) -> str:
        text = Path(self.log.name).read_text(errors="replace")
        return text[-chars:] if chars else text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(self.log.name).unlink(missing_ok=True)


def bench_queue(
    models: Path,
    redis: RedisServer,
    s3: S3Server,
    photo: bytes,
    *,
    pool: str = "threads",
    concurrency: int = 1,
    intra_op_threads: int = 0,
    sequential: int = 6,
    burst: int = 8,
    providers: Optional[list[str]] = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Start a worker and run ``sequential`` segment jobs one at a time (latency and queue
    overhead), then ``burst`` submitted at once (throughput). Returns medians and
    percentiles in milliseconds, jobs per second and the worker's RSS."""
    settings = Settings(
        redis_url=redis.url,
        s3_endpoint_url=s3.endpoint_url,
        s3_region=s3.region,
        input_bucket=INPUT_BUCKET,
        output_bucket=OUTPUT_BUCKET,
        output_prefix=f"bench/{uuid.uuid4().hex[:8]}/",
        sam2_dir=models / "sam2",
        detr_dir=models / "detr",
        providers=providers or ["CPUExecutionProvider"],
        intra_op_threads=intra_op_threads,
        pool=pool,
        concurrency=concurrency,
    )
    client = SegmentationClient(settings)
    started = time.perf_counter()
    worker = Worker(settings, s3, pool=pool, concurrency=concurrency)
    try:
        worker.wait_ready()
        ready_s = time.perf_counter() - started
        uris = [
            client.upload(photo, f"bench/{uuid.uuid4().hex}.jpg")
            for _ in range(sequential + burst + 1)
        ]
        width_height = _size(photo)
        prompt = {"point": [width_height[0] * 0.4, width_height[1] * 0.45]}
        client.segment(uris.pop(), prompt).wait(timeout=300)  # first job: lazy imports, arenas

        singles = []
        for uri in uris[:sequential]:
            singles.append(client.segment(uri, prompt).wait(timeout=300))
            log(
                f"    {pool} x{concurrency} threads={intra_op_threads or 'default'}: "
                f"job {len(singles)}/{sequential} {_job_ms(singles[-1]):.0f} ms"
            )
        jobs = [client.segment(uri, prompt) for uri in uris[sequential:]]
        batch = [job.wait(timeout=600) for job in jobs]
        rss = worker.rss_bytes()
    finally:
        worker.stop()
    for status in singles + batch:
        if status.state != JobState.succeeded:
            raise RuntimeError(f"job {status.job_id} ended {status.state}: {status.error}")

    job_ms = [_job_ms(s) for s in singles]
    pipeline_ms = [1000 * sum(s.timings.get(k, 0.0) for k in STAGES) for s in singles]
    span = max(s.finished_at for s in batch) - min(s.created_at for s in batch)
    burst_ms = [_job_ms(s) for s in batch]
    return {
        "pool": pool,
        "concurrency": concurrency,
        "intra_op_threads": intra_op_threads,
        "job": "segment, default options, a fresh S3 object each",
        "ready_s": ready_s,
        "latency_ms": {
            "p50": float(np.percentile(job_ms, 50)),
            "p95": float(np.percentile(job_ms, 95)),
        },
        "pipeline_ms": statistics.median(pipeline_ms),
        "overhead_ms": statistics.median([j - p for j, p in zip(job_ms, pipeline_ms)]),
        "ratio_to_pipeline": statistics.median([j / p for j, p in zip(job_ms, pipeline_ms)]),
        "stages_ms": {
            k: 1000 * statistics.median([s.timings.get(k, 0.0) for s in singles])
            for k in singles[0].timings
        },
        "burst": {
            "jobs": burst,
            "jobs_per_s": burst / span,
            "latency_ms": {
                "p50": float(np.percentile(burst_ms, 50)),
                "p95": float(np.percentile(burst_ms, 95)),
            },
        },
        "rss_mb": rss / 2**20,
    }


MEMORY_JOBS = ("segment", "panoptic", "cutout", "overlay")


def bench_memory(
    models: Path,
    redis: RedisServer,
    s3: S3Server,
    photo: bytes,
    *,
    rounds: int = 2,
    settings_overrides: Optional[dict[str, Any]] = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """A worker with both models (the deployed defaults) runs each job type on ``photo``
    one at a time, ``rounds`` times over. Before each job the kernel's peak-RSS counter of
    the worker is reset (``/proc/PID/clear_refs``), so each job has its own peak; after it,
    the RSS it settles at. Returns MB: after start (models loaded and warmed up), and per
    job type the highest peak and the last steady value, with the overall peak."""
    settings = Settings(
        redis_url=redis.url,
        s3_endpoint_url=s3.endpoint_url,
        s3_region=s3.region,
        input_bucket=INPUT_BUCKET,
        output_bucket=OUTPUT_BUCKET,
        output_prefix=f"bench/{uuid.uuid4().hex[:8]}/",
        sam2_dir=models / "sam2",
        detr_dir=models / "detr",
        **(settings_overrides or {}),
    )
    client = SegmentationClient(settings)
    worker = Worker(settings, s3, pool=settings.pool, concurrency=settings.concurrency)
    width, height = _size(photo)
    prompt = {"point": [width * 0.5, height * 0.5]}
    jobs: dict[str, dict[str, float]] = {}
    try:
        worker.wait_ready()
        pid = worker.proc.pid
        started = {"rss_mb": _rss(pid) / 2**20, "peak_mb": _peak(pid) / 2**20}
        for r in range(rounds):
            for task in MEMORY_JOBS:
                uri = client.upload(photo, f"bench/{uuid.uuid4().hex}.jpg")
                _reset_peak(pid)
                if task == "panoptic":
                    job = client.panoptic(uri)
                elif task == "overlay":
                    job = client.overlay(uri)  # panoptic segments, the default layers
                else:
                    job = getattr(client, task)(uri, prompt)
                status = job.wait(timeout=600)
                if status.state != JobState.succeeded:
                    raise RuntimeError(f"{task} job ended {status.state}: {status.error}")
                peak, steady = _peak(pid) / 2**20, _rss(pid) / 2**20
                entry = jobs.setdefault(task, {"peak_mb": 0.0})
                entry["peak_mb"] = max(entry["peak_mb"], peak)
                entry["steady_mb"] = steady
                log(f"    round {r + 1}/{rounds} {task}: peak {peak:.0f} MB, after {steady:.0f} MB")
    finally:
        worker.stop()
    return {
        "photo": f"{width}x{height}",
        "settings": settings_overrides or {},
        "after_start": started,
        "jobs": jobs,
        "peak_mb": max(j["peak_mb"] for j in jobs.values()),
        "steady_mb": max(j["steady_mb"] for j in jobs.values()),
    }


def _peak(pid: int) -> int:
    """The process's peak RSS (VmHWM) in bytes, since start or the last ``_reset_peak``."""
    return _status_kb(pid, "VmHWM:") * 1024


def _reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS
    except OSError:
        pass


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _job_ms(status: Any) -> float:
    return 1000 * (status.finished_at - status.created_at)


def _size(photo: bytes) -> tuple[int, int]:
    from io import BytesIO

    from PIL import Image

    return Image.open(BytesIO(photo)).size


def _settings_env(settings: Settings) -> dict[str, str]:
    """The SEGQ_* variables that give another process the settings made here."""
    values = settings.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    return {
        f"SEGQ_{name.upper()}": v if isinstance(v, str) else json.dumps(v)
        for name, v in values.items()
    }


def _rss(pid: int) -> int:
    return _status_kb(pid, "VmRSS:") * 1024


def _children_rss(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [_rss(int(child)) for child in children]
