"""What one worker process holds: its settings, the models, the pipelines, S3 and Redis
clients, and the threads that deliver webhooks.

``Runtime(settings)`` is the composition root of the worker side: ``worker.app.create_app``
builds one per Celery app, tests and benchmarks build their own, and nothing here is a
module global. Models load when ``load_models`` runs (before the worker takes work: see
``worker.app``), so a runtime made in a prefork parent holds none across the fork.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any, Callable, Optional

from config.settings import Settings
from config.status import StatusStore
from config.storage import Storage
from config.workers import Heartbeat, WorkerRegistry
from worker import metrics
from worker.affinity import WorkerAffinity
from worker.inference.registry import ModelRegistry
from worker.pipelines import Pipelines

log = logging.getLogger("segq.worker")


class Runtime:
    def __init__(self, settings: Settings, *, models: Optional[ModelRegistry] = None) -> None:
        """``models``: a registry to share with another runtime, whose model settings must
        equal these (default: a registry of its own)."""
        if models is not None and models.settings.model_settings() != settings.model_settings():
            raise ValueError("a model registry serves only runtimes with equal model settings")
        self.settings = settings
        self.models = models if models is not None else ModelRegistry(settings)
        self.pipelines = Pipelines(settings, models=self.models)
        self.storage = Storage(settings)
        # a job already accepted waits through a Redis outage rather than failing for it
        self.status = StatusStore(
            settings.redis_url,
            ttl_s=settings.status_ttl_s,
            reconnect_budget_s=settings.retry_budget_s,
        )
        self.workers = WorkerRegistry(self.status.redis, ttl_s=settings.worker_heartbeat_ttl_s)
        self.heartbeat: Optional[Heartbeat] = None
        # embedding affinity, once the worker knows its hostname (``start_heartbeat``)
        self.affinity: Optional[WorkerAffinity] = None
        self.pipelines.cache.on_evict = self._evicted
        self.providers: dict[str, str] = {}
        self.load_seconds: float = 0.0
        self.ready = False

    @cached_property
    def webhooks(self) -> ThreadPoolExecutor:
        """Where webhook deliveries run: a slow receiver never holds a job slot."""
        return ThreadPoolExecutor(max_workers=4, thread_name_prefix="segq-webhook")

    def load_models(self) -> None:
        """Create the sessions and run one warm inference per model, so the first job
        is as fast as the rest and a broken model fails the worker at start, not a job."""
        t0 = time.perf_counter()
        self.providers = self.pipelines.warm_up(self.settings.load_models)
        self.load_seconds = time.perf_counter() - t0
        metrics.record_models(self.load_seconds, self.providers)
        if self.settings.metrics_port:
            metrics.serve(self.settings)
        self.ready = True
        log.info(
            "models ready in %.1fs: %s",
            self.load_seconds,
            ", ".join(f"{m} on {p}" for m, p in self.providers.items()) or "none",
        )

    def start_heartbeat(
        self, hostname: str, info: Callable[[], dict[str, Any]], *, affinity: bool = False
    ) -> None:
        """Beat for this worker process from now on (once it consumes), with ``info()``;
        ``affinity``: this process runs the jobs of its own queue and claims the embeddings
        it holds (``worker.affinity``), refreshed with each beat."""
        if affinity and self.affinity is None:
            self.affinity = WorkerAffinity(
                self.status.redis, hostname,
                heartbeat_ttl_s=self.settings.worker_heartbeat_ttl_s,
                lease_s=self.settings.encode_lease_s,
            )  # fmt: skip
        if self.heartbeat is None:
            on_beat = self.affinity.refresh if self.affinity is not None else None
            self.heartbeat = Heartbeat(self.workers, hostname, info, on_beat=on_beat).start()

    def stop_heartbeat(self) -> None:
        """A warm shutdown: this worker is gone at once, not after its heartbeat expires,
        and claims no embeddings any more."""
        if self.heartbeat is not None:
            self.heartbeat.stop(gone=True)
            self.heartbeat = None
        if self.affinity is not None:
            self.affinity.drop_all()

    def _evicted(self, entry: str) -> None:
        if self.affinity is not None:
            self.affinity.evicted(entry)

    def health(self) -> dict:
        """Readiness for ``segq health``: models loaded and a small inference that
        works now (SAM 2's decoder on a probe embedding; cheap on any device)."""
        report: dict = {
            "ready": False,
            "models": list(self.providers),
            "providers": self.providers,
            "load_seconds": round(self.load_seconds, 3),
        }
        if not self.ready:
            report["reason"] = "models are still loading"
            return report
        try:
            t0 = time.perf_counter()
            if "sam2" in self.providers:
                self.pipelines.probe_decoder()
            report["probe_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            report["ready"] = True
        except Exception as exc:  # noqa: BLE001  any failure means not ready
            report["reason"] = f"probe inference failed: {type(exc).__name__}: {exc}"
        return report

    def report_child_ready(self, hostname: str) -> None:
        """A prefork child's health, kept where its parent can read it."""
        report = json.dumps({**self.health(), "pid": os.getpid()})
        self.status.redis.set(
            _child_key(hostname, os.getpid()), report, ex=self.settings.status_ttl_s
        )

    def children_health(self, hostname: str, pids: list[int]) -> dict:
        """A prefork parent's answer: ready when every live pool child reported ready."""
        keys = [_child_key(hostname, pid) for pid in pids]
        raw = self.status.redis.mget(keys) if keys else []
        reports = [json.loads(r) if r else None for r in raw]
        missing = [pid for pid, r in zip(pids, reports) if not (r and r.get("ready"))]
        first = next((r for r in reports if r), {})
        out = {
            "ready": bool(pids) and not missing,
            "pool": "prefork",
            "children": len(pids),
            "providers": first.get("providers", {}),
            "models": first.get("models", []),
            "load_seconds": first.get("load_seconds"),
            "probe_ms": first.get("probe_ms"),
        }
        if missing:
            out["reason"] = f"pool children {missing} have not loaded their models yet"
        return out


def _child_key(hostname: str, pid: int) -> str:
    return f"segq:worker:{hostname}:{pid}:health"
