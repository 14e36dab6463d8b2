"""Prometheus metrics of a worker process, served on ``SEGQ_METRICS_PORT``.

Jobs by task and final state, seconds per stage, embedding-cache hits and misses, model
load time, the execution provider in use, and the queue gauges of
``config.queues``. One process per GPU with a threads pool means one registry;
a prefork pool would need prometheus_client's multiprocess mode (not used by segq).
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

from prometheus_client import Counter, Gauge, Histogram

from config.queues import serve_metrics
from config.settings import Settings

log = logging.getLogger("segq.worker")

JOBS = Counter("segq_jobs", "Jobs that reached a final state", ["task", "state", "code"])
REROUTES = Counter("segq_job_reroutes", "Jobs moved to the worker holding (or making) their image's embedding")
RETRIES = Counter("segq_job_retries", "Jobs handed back for a retry after a transient fault", ["task", "code"])
STAGE_SECONDS = Histogram(
    "segq_stage_seconds",
    "Seconds per job stage",
    ["task", "stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CACHE = Counter("segq_embedding_cache", "SAM 2 embedding cache lookups", ["result"])
MODEL_LOAD_SECONDS = Gauge("segq_model_load_seconds", "Seconds to load and warm the models")
PROVIDER = Gauge("segq_execution_provider", "1 for the execution provider each model runs on", ["model", "provider"])

_started = threading.Lock()
_server_port: Optional[int] = None


def record_job(
    task: str,
    state: str,
    code: str = "",
    *,
    timings: Optional[dict[str, float]] = None,
    cache: Optional[str] = None,
) -> None:
    JOBS.labels(task, state, code).inc()
    for stage, seconds in (timings or {}).items():
        STAGE_SECONDS.labels(task, stage).observe(seconds)
    if cache:
        CACHE.labels(cache).inc()


def record_models(load_seconds: float, providers: dict[str, str]) -> None:
    MODEL_LOAD_SECONDS.set(load_seconds)
    for model, provider in providers.items():
        PROVIDER.labels(model, provider).set(1)


def serve(settings: Settings) -> int:
    """Serve this process's metrics and the queue gauges on ``settings.metrics_port``, once
    per process (Prometheus counters are per process); returns the bound port."""
    global _server_port
    with _started:
        if _server_port is None:
            _server_port = serve_metrics(settings, settings.metrics_port).server_port
            log.info("metrics on :%d/metrics", _server_port)
        return _server_port
