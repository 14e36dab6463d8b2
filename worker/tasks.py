"""The four Celery tasks: thin shells around ``worker.jobs.execute``.

Each takes one JSON object (``config.contract.JobRequest``). A job's own faults end in
its status, never as an exception that Celery would log as a crash; transient faults
come back as a Celery retry with backoff.
"""

from __future__ import annotations

from typing import Any, Optional

from celery import Task

from config.contract import TASK_CUTOUT, TASK_OVERLAY, TASK_PANOPTIC, TASK_SEGMENT
from worker.app import app
from worker.jobs import Delivery, RetryLater, execute
from worker.runtime import get_runtime


def _run(task: Task, args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
    runtime = get_runtime()
    # A hand-made message with the wrong arguments is a bad payload, not a crash.
    payload = args[0] if len(args) == 1 and not kwargs else None
    delivery = Delivery(
        job_id=task.request.id,
        worker=task.request.hostname or "unknown",
        retries=task.request.retries,
    )
    try:
        return execute(runtime, payload, delivery)
    except RetryLater as later:
        raise task.retry(countdown=later.countdown, max_retries=None) from later.error


_common = dict(bind=True, acks_late=True, reject_on_worker_lost=True)


@app.task(name=TASK_SEGMENT, **_common)
def segment(self: Task, *args: Any, **kwargs: Any) -> Optional[dict[str, Any]]:
    return _run(self, args, kwargs)


@app.task(name=TASK_PANOPTIC, **_common)
def panoptic(self: Task, *args: Any, **kwargs: Any) -> Optional[dict[str, Any]]:
    return _run(self, args, kwargs)


@app.task(name=TASK_CUTOUT, **_common)
def cutout(self: Task, *args: Any, **kwargs: Any) -> Optional[dict[str, Any]]:
    return _run(self, args, kwargs)


@app.task(name=TASK_OVERLAY, **_common)
def overlay(self: Task, *args: Any, **kwargs: Any) -> Optional[dict[str, Any]]:
    return _run(self, args, kwargs)
