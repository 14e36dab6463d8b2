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

import os
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from api_client.client import SegmentationClient
from api_client.dev.processes import WorkerProcess
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


def local_settings(redis: RedisServer, s3: S3Server, **fields: Any) -> Settings:
    """Settings for ``local_services``' Redis and S3, each run under an output prefix of
    its own, with ``fields`` on top."""
    return Settings(
        redis_url=redis.url,
        s3_endpoint_url=s3.endpoint_url,
        s3_region=s3.region,
        input_bucket=INPUT_BUCKET,
        output_bucket=OUTPUT_BUCKET,
        output_prefix=f"bench/{uuid.uuid4().hex[:8]}/",
        **fields,
    )


class Worker(WorkerProcess):
    """A ``segq worker`` subprocess (``api_client.dev.processes``), its log in a folder of
    its own for the length of the run, and its resident memory."""

    def __init__(self, settings: Settings, *, pool: str, concurrency: int) -> None:
        self._logs = tempfile.TemporaryDirectory(prefix="segq-bench-worker-")
        super().__init__(
            settings, Path(self._logs.name), pool=pool, concurrency=concurrency,
            name="bench", host=f"{pool}{concurrency}", cwd=REPO,
        )  # fmt: skip

    def rss_bytes(self) -> int:
        """Resident memory of the worker and its pool children, together."""
        assert self.pid is not None
        return _rss(self.pid) + sum(_children_rss(self.pid))

    def stop(self) -> None:
        self.terminate(timeout=30)
        self._logs.cleanup()


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
    job_types: tuple[str, ...] = ("segment",),
    providers: Optional[list[str]] = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Start a worker and run ``sequential`` segment jobs one at a time (latency and queue
    overhead), then ``burst`` submitted at once (throughput), then ``sequential`` jobs of
    each other type in ``job_types`` one at a time (the overhead per job type). Returns
    medians and percentiles in milliseconds, jobs per second and the worker's RSS."""
    settings = local_settings(
        redis,
        s3,
        sam2_dir=models / "sam2",
        detr_dir=models / "detr",
        providers=providers or ["CPUExecutionProvider"],
        intra_op_threads=intra_op_threads,
        pool=pool,
        concurrency=concurrency,
    )
    client = SegmentationClient(settings)
    started = time.perf_counter()
    worker = Worker(settings, pool=pool, concurrency=concurrency).start(wait=False)
    try:
        worker.wait_ready(timeout=180)
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
        by_type = {"segment": singles}
        for task in job_types:
            if task == "segment":
                continue
            by_type[task] = []
            for _ in range(sequential):
                uri = client.upload(photo, f"bench/{uuid.uuid4().hex}.jpg")
                by_type[task].append(_submit(client, task, uri, prompt).wait(timeout=600))
                log(f"    {task}: job {len(by_type[task])}/{sequential} "
                    f"{_job_ms(by_type[task][-1]):.0f} ms")  # fmt: skip
        rss = worker.rss_bytes()
    finally:
        worker.stop()
    for status in batch + [s for runs in by_type.values() for s in runs]:
        if status.state != JobState.succeeded:
            raise RuntimeError(f"job {status.job_id} ended {status.state}: {status.error}")

    span = max(s.finished_at for s in batch) - min(s.created_at for s in batch)
    burst_ms = [_job_ms(s) for s in batch]
    return {
        "pool": pool,
        "concurrency": concurrency,
        "intra_op_threads": intra_op_threads,
        "job": "segment, default options, a fresh S3 object each",
        "ready_s": ready_s,
        **_overhead(singles),
        "by_job": {task: _overhead(runs) for task, runs in by_type.items()},
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


def _overhead(singles: list[Any]) -> dict[str, Any]:
    """Latency of jobs run one at a time, and each job's time against the pipeline stages
    the worker timed inside that same job."""
    job_ms = [_job_ms(s) for s in singles]
    pipeline_ms = [1000 * sum(s.timings.get(k, 0.0) for k in STAGES) for s in singles]
    return {
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
    }


JOB_TYPES = ("segment", "panoptic", "cutout", "overlay")


def _submit(client: SegmentationClient, task: str, uri: str, prompt: dict) -> Any:
    """One job of type ``task`` with the default options; overlay draws panoptic segments."""
    if task == "panoptic":
        return client.panoptic(uri)
    if task == "overlay":
        return client.overlay(uri)
    return getattr(client, task)(uri, prompt)


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
    settings = local_settings(
        redis,
        s3,
        sam2_dir=models / "sam2",
        detr_dir=models / "detr",
        **(settings_overrides or {}),
    )
    client = SegmentationClient(settings)
    worker = Worker(settings, pool=settings.pool, concurrency=settings.concurrency)
    worker.start(wait=False)
    width, height = _size(photo)
    prompt = {"point": [width * 0.5, height * 0.5]}
    jobs: dict[str, dict[str, float]] = {}
    try:
        worker.wait_ready(timeout=180)
        pid = worker.pid
        assert pid is not None
        started = {"rss_mb": _rss(pid) / 2**20, "peak_mb": _peak(pid) / 2**20}
        for r in range(rounds):
            for task in JOB_TYPES:
                uri = client.upload(photo, f"bench/{uuid.uuid4().hex}.jpg")
                _reset_peak(pid)
                status = _submit(client, task, uri, prompt).wait(timeout=600)
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


def _rss(pid: int) -> int:
    return _status_kb(pid, "VmRSS:") * 1024


def _children_rss(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [_rss(int(child)) for child in children]
