"""Job status in Redis: one JSON record per job (``config.contract.JobStatus`` under
``status_key(job_id)``), its TTL refreshed on every write.

The state machine::

    queued --start--> running --succeed--> succeeded
      |  ^               |  \\--fail-----> failed
      |  '---requeue-----'
      |--fail--> failed
      '--cancel--> cancelled

Each transition is a read-check-write under WATCH/MULTI (``Redis.transaction``) rather
than a Lua script: the schema and the rules stay in Python, validated by the same
pydantic model the clients read with, where Lua would need a second copy of both (and
its cjson turns empty lists into objects and rounds floats to 14 digits). A job's key
has at most two writers at a time (its worker and a client cancelling it), so the
optimistic retry is rare; and redis-py turns a connection lost mid-WATCH into a
``WatchError``, so after a Redis restart the transition simply runs again.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import redis
from kombu.exceptions import OperationalError
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError
from redis.retry import Retry

from config.contract import (
    IDEMPOTENCY_FINGERPRINT_KEY,
    IDEMPOTENCY_KEY,
    JobErrorInfo,
    JobState,
    JobStatus,
    events_channel,
    status_key,
)
from config.errors import IdempotencyConflict, InvalidTransition, JobNotFound, QueueUnavailable

# A producer rides out about 17 s of Redis outage (long enough for Redis to restart and
# reload its AOF) before it says queue_unavailable; a worker, whose job is already
# accepted, waits up to its retry budget instead.
PRODUCER_RECONNECT_S = 17.0
RECONNECT_BACKOFF = dict(base=0.05, cap=2.0)
# A connection idle this long is PINGed before use, so a dead one is replaced up front.
HEALTH_CHECK_INTERVAL_S = 15


class _Retry(Retry):
    """``Retry`` on a time budget rather than a count, that gives up at once on a wrong or
    missing password: redis-py files ``AuthenticationError`` under ``ConnectionError``,
    and no backoff fixes a password."""

    def __init__(self, budget_s: float) -> None:
        super().__init__(ExponentialBackoff(**RECONNECT_BACKOFF), retries=-1)
        self.budget_s = budget_s

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + self.budget_s

        def retryable(error: Exception) -> bool:
            return (
                not isinstance(error, AuthenticationError)
                and time.monotonic() < deadline
                and (is_retryable is None or is_retryable(error))
            )

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def redis_client(
    url: str,
    *,
    reconnect_budget_s: float = PRODUCER_RECONNECT_S,
    socket_timeout_s: Optional[float] = None,
) -> redis.Redis:
    """A client that survives a Redis restart: commands retry on connection errors and
    timeouts with exponential backoff (capped at 2 s a try) for up to
    ``reconnect_budget_s``. ``redis://:password@host/0`` and ``rediss://`` (TLS) URLs
    work as they are. ``socket_timeout_s`` bounds each connect and read (the HTTP API's
    short budget: a Redis that stopped answering is 503 in seconds)."""
    timeouts = (
        {} if socket_timeout_s is None
        else {"socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s}
    )  # fmt: skip
    return redis.Redis.from_url(
        url,
        **timeouts,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        socket_keepalive=True,
        retry=_Retry(reconnect_budget_s),
        retry_on_error=[ConnectionError, TimeoutError],
    )


@contextmanager
def redis_reachable(action: str) -> Iterator[None]:
    """Redis down past the reconnect budget, or a publish the broker refuses, becomes
    ``QueueUnavailable``: callers see "try again later" with a code, not redis-py's or
    kombu's traceback. A wrong password is no outage and stays as it is."""
    try:
        yield
    except redis.AuthenticationError:
        raise
    except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
        raise QueueUnavailable(f"cannot {action}: Redis is unreachable ({exc})") from exc


def _text(value: Union[bytes, str]) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StatusStore:
    """Reads and changes job records. Thread-safe (redis-py's connection pool)."""

    def __init__(
        self,
        redis_client_or_url: Union[redis.Redis, str],
        *,
        ttl_s: int,
        reconnect_budget_s: float = PRODUCER_RECONNECT_S,
    ) -> None:
        """``reconnect_budget_s``: how long a command waits through a Redis outage before
        it raises (short for producers, the retry budget for workers)."""
        if isinstance(redis_client_or_url, str):
            redis_client_or_url = redis_client(
                redis_client_or_url, reconnect_budget_s=reconnect_budget_s
            )
        self.redis = redis_client_or_url
        self.ttl_s = ttl_s

    # --- reading -------------------------------------------------------------------

    def get(self, job_id: str) -> Optional[JobStatus]:
        """The job's record, or None if there is no such job (never created, or expired)."""
        raw = self.redis.get(status_key(job_id))
        return None if raw is None else JobStatus.model_validate_json(raw)

    # --- creating ------------------------------------------------------------------

    def create(self, job_id: str, task: str, image: Optional[str]) -> JobStatus:
        """A new ``queued`` record. Creating a job that exists returns it unchanged."""
        record = self._new(job_id, task, image)
        if self.redis.set(status_key(job_id), record.model_dump_json(), nx=True, ex=self.ttl_s):
            return record
        existing = self.get(job_id)
        return existing if existing is not None else self.create(job_id, task, image)

    def idempotent_create(
        self,
        idempotency_key: str,
        job_id: str,
        task: str,
        image: Optional[str],
        *,
        fingerprint: Optional[str] = None,
    ) -> tuple[str, bool]:
        """Create ``job_id`` unless ``idempotency_key`` was used within the TTL; returns
        the job id the key stands for and whether this call created it. With
        ``fingerprint`` (a digest of the request), reusing the key for a request with
        another fingerprint raises ``IdempotencyConflict``; keys stored without one match
        anything."""
        idem_key = IDEMPOTENCY_KEY.format(key=idempotency_key)
        fp_key = IDEMPOTENCY_FINGERPRINT_KEY.format(key=idempotency_key)
        record = self._new(job_id, task, image)

        def claim(pipe: Any) -> tuple[str, bool]:
            first = pipe.get(idem_key)
            if first is not None:
                stored = pipe.get(fp_key)
                if fingerprint and stored is not None and _text(stored) != fingerprint:
                    raise IdempotencyConflict(
                        f"idempotency key {idempotency_key!r} was used for another request "
                        f"(job {_text(first)}); use a new key for a new request",
                        job_id=_text(first),
                    )
                return _text(first), False
            pipe.multi()
            pipe.set(idem_key, job_id, nx=True, ex=self.ttl_s)
            if fingerprint:
                pipe.set(fp_key, fingerprint, ex=self.ttl_s)
            pipe.set(status_key(job_id), record.model_dump_json(), nx=True, ex=self.ttl_s)
            return job_id, True

        return self.redis.transaction(claim, idem_key, fp_key, value_from_callable=True)

    def discard(self, job_id: str, idempotency_key: Optional[str] = None) -> None:
        """Forget a job that was never enqueued: its ``queued`` record, and the
        idempotency key if it still points at this job."""
        key = status_key(job_id)
        idem_key = IDEMPOTENCY_KEY.format(key=idempotency_key) if idempotency_key else None
        watched = [key] + ([idem_key] if idem_key else [])

        def drop(pipe: Any) -> None:
            raw = pipe.get(key)
            queued = raw is not None and JobStatus.model_validate_json(raw).state is JobState.queued
            points_here = idem_key is not None and _text(pipe.get(idem_key) or b"") == job_id
            pipe.multi()
            if queued:
                pipe.delete(key)
            if points_here:
                pipe.delete(idem_key, IDEMPOTENCY_FINGERPRINT_KEY.format(key=idempotency_key))

        self.redis.transaction(drop, *watched)

    # --- transitions ---------------------------------------------------------------

    def start(self, job_id: str, worker: str) -> Optional[JobStatus]:
        """``queued``/``running`` -> ``running`` (a redelivered job starts again), counting
        the attempt. None if the job is cancelled or already over: the worker skips it."""

        def change(job: JobStatus, now: float) -> Optional[JobStatus]:
            if job.is_final:
                return None
            return job.model_copy(
                update=dict(
                    state=JobState.running, worker=worker, attempts=job.attempts + 1,
                    started_at=now, stage=None, error=None,
                )
            )  # fmt: skip

        return self._transition(job_id, change)

    def stage(self, job_id: str, name: str) -> JobStatus:
        """Record what a running job is doing now (``download``, ``inference``, ...)."""

        def change(job: JobStatus, now: float) -> JobStatus:
            _require(job, "set the stage of", JobState.running)
            return job.model_copy(update=dict(stage=name))

        return self._transition(job_id, change)

    def succeed(self, job_id: str, result: dict[str, Any], timings: dict[str, float]) -> JobStatus:
        """``running`` -> ``succeeded``. Call after the outputs are in S3."""

        def change(job: JobStatus, now: float) -> JobStatus:
            _require(job, "succeed", JobState.running)
            return job.model_copy(
                update=dict(
                    state=JobState.succeeded, result=result, timings=dict(timings),
                    finished_at=now, stage=None, error=None, retrying_since=None,
                )
            )  # fmt: skip

        return self._transition(job_id, change)

    def fail(
        self, job_id: str, code: str, message: str, details: Optional[dict[str, Any]] = None
    ) -> Optional[JobStatus]:
        """``queued``/``running`` -> ``failed`` with an error code. None if the job had
        already ended: failures come from error paths (time limits, lost workers) that
        can race with another ending, and the first ending stands."""
        error = JobErrorInfo(code=code, message=message, details=details)

        def change(job: JobStatus, now: float) -> Optional[JobStatus]:
            if job.is_final:
                return None
            return job.model_copy(update=dict(state=JobState.failed, error=error, finished_at=now))

        return self._transition(job_id, change)

    def requeue(self, job_id: str, reason: str) -> JobStatus:
        """``running`` -> ``queued`` while the job waits for a retry; ``reason`` shows as
        its stage."""

        def change(job: JobStatus, now: float) -> JobStatus:
            _require(job, "requeue", JobState.running)
            return job.model_copy(
                update=dict(
                    state=JobState.queued, stage=f"retrying: {reason}", worker=None,
                    retrying_since=job.retrying_since or now,
                )
            )  # fmt: skip

        return self._transition(job_id, change)

    def handover(self, job_id: str, reason: str) -> JobStatus:
        """``running`` -> ``queued`` because another worker should run it (it holds the
        image's embedding); ``reason`` shows as its stage."""

        def change(job: JobStatus, now: float) -> JobStatus:
            _require(job, "hand over", JobState.running)
            return job.model_copy(
                update=dict(
                    state=JobState.queued, stage=reason, worker=None, handovers=job.handovers + 1
                )
            )

        return self._transition(job_id, change)

    def cancel(self, job_id: str) -> JobStatus:
        """``queued`` -> ``cancelled``; a worker that picks the job up later skips it.
        ``InvalidTransition`` once it runs or has ended."""

        def change(job: JobStatus, now: float) -> JobStatus:
            _require(job, "cancel", JobState.queued)
            return job.model_copy(
                update=dict(state=JobState.cancelled, finished_at=now, stage=None)
            )

        return self._transition(job_id, change)

    def record_webhook(self, job_id: str, delivery: dict[str, Any]) -> JobStatus:
        """Note the outcome of the job's webhook delivery (after it has ended)."""

        def change(job: JobStatus, now: float) -> JobStatus:
            return job.model_copy(update=dict(webhook=delivery))

        return self._transition(job_id, change)

    # --- plumbing ------------------------------------------------------------------

    def _new(self, job_id: str, task: str, image: Optional[str]) -> JobStatus:
        now = time.time()
        return JobStatus(
            job_id=job_id,
            task=task,
            state=JobState.queued,
            image=image,
            created_at=now,
            updated_at=now,
        )

    def _transition(
        self, job_id: str, change: Callable[[JobStatus, float], Optional[JobStatus]]
    ) -> Any:
        """Apply ``change`` to the stored record atomically: if another client writes the
        record between our read and our write, the whole step runs again on the new one.
        The new record is also published on ``events_channel(job_id)`` in the same
        transaction: the one place every status change passes, which the HTTP API's
        event streams subscribe to (a publish nobody listens to costs nothing)."""
        key = status_key(job_id)

        def step(pipe: Any) -> Optional[JobStatus]:
            raw = pipe.get(key)
            if raw is None:
                raise JobNotFound(
                    f"no job {job_id!r} (never created, or its status expired)", job_id=job_id
                )
            now = time.time()
            new = change(JobStatus.model_validate_json(raw), now)
            if new is not None:
                new = new.model_copy(update=dict(updated_at=now))
                record = new.model_dump_json()
                pipe.multi()
                pipe.set(key, record, ex=self.ttl_s)
                pipe.publish(events_channel(job_id), record)
            return new

        return self.redis.transaction(step, key, value_from_callable=True)


def _require(job: JobStatus, action: str, *states: JobState) -> None:
    if job.state not in states:
        allowed = " or ".join(s.value for s in states)
        raise InvalidTransition(
            f"cannot {action} job {job.job_id}: it is {job.state.value}, not {allowed}",
            job_id=job.job_id,
            state=job.state.value,
        )
