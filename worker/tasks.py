"""The four Celery tasks: thin shells around ``worker.jobs.execute``.

Each takes one JSON object (``config.contract.JobRequest``). A job's own faults end in
its status, never as an exception that Celery would log as a crash; transient faults
come back as a Celery retry with backoff.
"""

from __future__ import annotations

from typing import Any, Optional

import redis
from celery import Task
from celery.exceptions import Reject

from config.contract import TASK_CUTOUT, TASK_OVERLAY, TASK_PANOPTIC, TASK_SEGMENT
from config.errors import InvalidPayload
from worker.app import CheckedRequest, app
from worker.jobs import Delivery, RetryLater, execute, refuse_message
from worker.runtime import get_runtime


def _run(task: Task, args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
    runtime = get_runtime()
    if len(args) != 1 or kwargs:  # a hand-made message: a bad payload, not a crash
        err = InvalidPayload(
            f"a {task.name} message carries one JSON object (the job) as its only argument; "
            f"got {len(args)} positional and {len(kwargs)} keyword arguments"
        )
        refuse_message(runtime, task.request.id, task.name, err)
        return None
    delivery = Delivery(
        job_id=task.request.id,
        worker=task.request.hostname or "unknown",
        retries=task.request.retries,
    )
    try:
        return execute(runtime, args[0], delivery)
    except RetryLater as later:
        raise task.retry(countdown=later.countdown) from later.error


# ``execute`` counts retries against ``settings.max_retries`` itself. Celery's own limit must
# be off (None on the task: ``retry(max_retries=None)`` means "the task's default", 3), or
# it drops the job after the third retry and leaves its status ``queued`` for ever.
_common = dict(
    bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None, Request=CheckedRequest
)


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
