"""Jobs of dead workers go back to the queues within seconds, not after the broker's
visibility timeout.

With a Redis broker, a job delivered to a worker stays in kombu's ``unacked`` hash until
that worker acknowledges it; if the worker dies, kombu puts it back only once it is
``visibility_timeout`` old (an hour by default, longer than any job may run). Here every
worker's heartbeat (``config.workers``) also lists the jobs it holds (running, waiting for
a slot, or waiting for a retry's countdown), and a sweep that one worker at a time runs
every few seconds gives back each unacknowledged message that no live worker holds:

- its job is not final: the message goes back to the front of its queue (kombu's own
  restore, so it is marked redelivered and counts as a delivery);
- its job is final: the job is done and only its acknowledgement was lost (a broker outage
  while it finished), so the message is dropped instead of running the job again.

A message is considered only once it is older than one heartbeat TTL, by which time the
worker that received it has listed it. A slow job is never taken from a live worker: its
worker keeps beating and listing it however long it runs.

The same sweep empties the own queue (``segq.worker.<hostname>``, embedding affinity) of
every worker that is not alive back onto the shared queue of each job's task, so a job
routed to a worker that died before taking it is not stranded there. Each message moves in
one transaction (never lost or doubled) and is re-addressed to the shared queue, so a later
retry or restore of it goes there too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import redis
from celery import Celery

from config.affinity import WORKER_QUEUE_PREFIX, queue_owner
from config.queues import UNACKED_HASH, readable_broker
from config.status import StatusStore, redis_client
from config.workers import WorkerRegistry

log = logging.getLogger("segq.recovery")

UNACKED_INDEX = "unacked_index"
LOCK_KEY = "segq:recovery:lock"


def held_job_ids() -> list[str]:
    """Ids of the jobs this worker process holds: received and not yet finished, including
    those waiting for a retry's countdown. Celery keeps them in ``celery.worker.state``
    (what ``celery inspect query_task`` reads); ``tests/test_recovery.py`` pins that."""
    from celery.worker import state

    for _ in range(3):  # the consumer may change the dict while we copy it
        try:
            return list(state.requests)
        except RuntimeError:
            continue
    return []


def restore_message(app: Celery, delivery_tag: str) -> None:
    """Put an unacknowledged message back at the front of its queue, marked redelivered,
    the way kombu's Redis transport restores one itself (one transaction, so a message is
    never lost or doubled). kombu's ``QoS.restore_by_tag`` is pinned by a test."""
    with app.connection_for_write() as connection:
        connection.default_channel.qos.restore_by_tag(delivery_tag, leftmost=True)


@dataclass
class SweepReport:
    restored: list[str]  # job ids given back to their queues
    dropped: list[str]  # job ids already final whose acknowledgement was lost
    held: int  # unacknowledged messages that live workers hold
    drained: dict[str, int] = field(default_factory=dict)  # dead worker's queue -> jobs moved


class Recovery:
    """The sweep, and a daemon thread that runs it every ``interval_s`` in a worker."""

    def __init__(
        self,
        app: Celery,
        registry: WorkerRegistry,
        status: StatusStore,
        *,
        interval_s: Optional[float] = None,
    ) -> None:
        self.app = app
        self.registry = registry
        self.status = status
        self.interval_s = interval_s or max(1.0, registry.ttl_s / 3)
        self.broker = redis_client(app.conf.broker_url)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def applies(app: Celery) -> bool:
        """Only kombu's Redis transport keeps unacknowledged messages this way."""
        return readable_broker(app.conf.broker_url or "")

    def sweep(self) -> Optional[SweepReport]:
        """One pass; None when another worker is sweeping right now."""
        if not self.broker.set(LOCK_KEY, "1", nx=True, px=int(self.interval_s * 2000)):
            return None
        try:
            return self._sweep()
        finally:
            self.broker.delete(LOCK_KEY)

    def _sweep(self) -> SweepReport:
        report = SweepReport([], [], 0)
        self._restore_unacked(report)
        self._drain_dead_queues(report)  # after the restores, which may refill them
        return report

    def _drain_dead_queues(self, report: SweepReport) -> None:
        owners = {}
        for key in self.broker.scan_iter(match=f"{WORKER_QUEUE_PREFIX}*", count=500, _type="list"):
            name = key.decode() if isinstance(key, bytes) else key
            owner = queue_owner(name)
            if owner:
                owners[name] = owner
        if not owners:
            return
        alive = self.registry.alive(owners.values())
        for queue, owner in owners.items():
            if owner not in alive:
                moved = self._drain(queue)
                if moved:
                    report.drained[queue] = moved
        if report.drained:
            log.warning("recovery: moved the jobs waiting for dead workers back to the shared "
                        "queues: %s", report.drained)  # fmt: skip

    def _drain(self, queue: str) -> int:
        """Move every message of ``queue`` to the shared queue of its task, oldest first."""
        routes = self.app.conf.task_routes or {}
        default = self.app.conf.task_default_queue
        moved = 0
        with self.broker.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(queue)
                    raw = pipe.lindex(queue, -1)  # consumers pop from the right: the oldest
                    if raw is None:
                        pipe.unwatch()
                        return moved
                    target, body = _readdressed(raw, routes, default)
                    pipe.multi()
                    pipe.rpop(queue)
                    pipe.rpush(target, body)  # next in line there: it has waited already
                    pipe.execute()
                    moved += 1
                except redis.WatchError:
                    continue

    def _restore_unacked(self, report: SweepReport) -> None:
        settled_before = time.time() - self.registry.ttl_s
        tags = self.broker.zrangebyscore(UNACKED_INDEX, "-inf", settled_before)
        if not tags:
            return
        held = {
            job_id
            for record in self.registry.all_alive().values()
            for job_id in record.get("held", [])
        }
        for tag in tags:
            raw = self.broker.hget(UNACKED_HASH, tag)
            if raw is None:
                continue  # acknowledged meanwhile
            job_id = _job_id(raw)
            if job_id in held:
                report.held += 1
                continue
            found = self.status.get(job_id) if job_id else None
            tag_text = tag.decode() if isinstance(tag, bytes) else tag
            if found is not None and found.is_final:
                self.broker.pipeline().zrem(UNACKED_INDEX, tag).hdel(UNACKED_HASH, tag).execute()
                report.dropped.append(job_id)
            else:
                restore_message(self.app, tag_text)
                report.restored.append(job_id or tag_text)
        if report.restored or report.dropped:
            log.warning(
                "recovery: gave %d job(s) of dead workers back to the queues (%s); dropped %d "
                "finished one(s) whose acknowledgement was lost",
                len(report.restored), ", ".join(report.restored[:10]), len(report.dropped),
            )  # fmt: skip

    def start(self) -> "Recovery":
        self._thread = threading.Thread(target=self._run, name="segq-recovery", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except redis.RedisError as err:
                log.warning("recovery sweep skipped: %s", err)
            except Exception:  # noqa: BLE001  the sweep must outlive any one bad entry
                log.exception("recovery sweep failed")


def _readdressed(raw: bytes, routes: dict, default: str) -> tuple[str, bytes]:
    """The shared queue for a message of a dead worker's own queue, and the message
    addressed to it (anonymous exchange, routing key = the queue, as kombu reads it)."""
    try:
        message = json.loads(raw)
        task = message.get("headers", {}).get("task")
        route = routes.get(task) if isinstance(routes, dict) else None
        target = (route or {}).get("queue") or default
        info = message.setdefault("properties", {}).setdefault("delivery_info", {})
        info.update(exchange="", routing_key=target)
        return target, json.dumps(message).encode()
    except (ValueError, AttributeError, TypeError):
        return default, raw  # not ours to read: moved as it is


def _job_id(raw: Any) -> Optional[str]:
    try:
        job_id = json.loads(raw)[0]["headers"]["id"]
    except (ValueError, LookupError, TypeError):
        return None
    return job_id if isinstance(job_id, str) else None
