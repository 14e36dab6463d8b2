"""Which workers are alive: each worker process keeps a heartbeat key in Redis, refreshed
well within its TTL, so a worker that dies (SIGKILL, a lost node) disappears within one
TTL while a slow one, busy for minutes on a job, stays alive.

Producers and workers both read it: jobs routed to a worker's own queue (embedding
affinity) check that the worker is alive, and a worker's recovery sweep gives the jobs of
dead workers back to the queues.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Optional

import redis

log = logging.getLogger("segq.workers")

ALIVE_KEY = "segq:worker:{hostname}:alive"


def alive_key(hostname: str) -> str:
    return ALIVE_KEY.format(hostname=hostname)


class WorkerRegistry:
    """Heartbeats of worker processes in Redis (thread-safe: redis-py's connection pool)."""

    def __init__(self, client: redis.Redis, *, ttl_s: float = 15.0) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def beat(self, hostname: str, info: Optional[dict[str, Any]] = None) -> None:
        """Mark ``hostname`` alive for another ``ttl_s`` seconds."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "at": time.time(), **(info or {})}
        self.redis.set(alive_key(hostname), json.dumps(record), px=int(self.ttl_s * 1000))

    def gone(self, hostname: str) -> None:
        """``hostname`` stopped on purpose (a warm shutdown): not alive from now on."""
        self.redis.delete(alive_key(hostname))

    def alive(self, hostnames: Iterable[str]) -> set[str]:
        """Those of ``hostnames`` whose heartbeat has not expired."""
        names = list(dict.fromkeys(hostnames))
        if not names:
            return set()
        found = self.redis.mget([alive_key(h) for h in names])
        return {h for h, raw in zip(names, found) if raw is not None}

    def all_alive(self) -> dict[str, dict[str, Any]]:
        """Every live worker and its heartbeat record."""
        out = {}
        for key in self.redis.scan_iter(match=ALIVE_KEY.format(hostname="*"), count=500):
            raw = self.redis.get(key)
            if raw is not None:
                name = key.decode() if isinstance(key, bytes) else key
                out[name.split(":", 2)[2].rsplit(":alive", 1)[0]] = json.loads(raw)
        return out


class Heartbeat:
    """A daemon thread beating for one worker every ``ttl_s / 5`` seconds until ``stop``,
    with ``info()`` in each beat (what the worker holds, say). A Redis outage only delays
    beats: the thread logs and tries again."""

    def __init__(
        self,
        registry: WorkerRegistry,
        hostname: str,
        info: Callable[[], dict[str, Any]] = dict,
        on_beat: Optional[Callable[[], None]] = None,
    ) -> None:
        """``on_beat``: also run after each beat (refreshing what the worker claims, say)."""
        self.registry = registry
        self.hostname = hostname
        self.info = info
        self.on_beat = on_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segq-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self, *, gone: bool = True) -> None:
        """Stop beating; ``gone`` also removes the key at once (a warm shutdown)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if gone:
            try:
                self.registry.gone(self.hostname)
            except redis.RedisError:
                pass  # it expires by itself

    def _run(self) -> None:
        interval = max(0.2, self.registry.ttl_s / 5)
        while not self._stop.is_set():
            try:
                self.registry.beat(self.hostname, self.info())
                if self.on_beat is not None:
                    self.on_beat()
            except redis.RedisError as err:
                log.warning("heartbeat of %s not written: %s", self.hostname, err)
            except Exception:  # noqa: BLE001  the heartbeat must outlive its hook
                log.exception("heartbeat hook of %s failed", self.hostname)
            self._stop.wait(interval)
