"""The four Celery tasks: thin shells around ``worker.jobs.execute``.

Each takes one JSON object (``config.contract.JobRequest``). A job's own faults end in
its status, never as an exception that Celery would log as a crash; transient faults
come back as a Celery retry with backoff.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from celery import Celery, Task
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from config.contract import TASKS, check_job_id
from config.errors import InvalidPayload
from worker.hardening import CheckedRequest
from config.affinity import queue_owner
from worker.jobs import Delivery, LeaveQueued, MoveTo, RetryLater, execute, refuse_message

log = logging.getLogger("segq.worker")


def run(task: Task, args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
    """One delivery of a job, as any of the four tasks receives it."""
    runtime = task.app.runtime
    try:
        check_job_id(task.request.id)
    except InvalidPayload as err:  # its outputs would have no safe folder
        refuse_message(runtime, task.request.id, task.name, err)
        return None
    if len(args) != 1 or kwargs:  # a hand-made message: a bad payload, not a crash
        err = InvalidPayload(
            f"a {task.name} message carries one JSON object (the job) as its only argument; "
            f"got {len(args)} positional and {len(kwargs)} keyword arguments"
        )
        refuse_message(runtime, task.request.id, task.name, err)
        return None
    routed_to = (task.request.delivery_info or {}).get("routing_key")
    delivery = Delivery(
        job_id=task.request.id,
        worker=task.request.hostname or "unknown",
        retries=task.request.retries,
        may_reroute=queue_owner(routed_to) is None,  # a job sent to this worker stays here
    )
    try:
        return execute(runtime, args[0], delivery)
    except RetryLater as later:
        try:
            raise task.retry(countdown=later.countdown) from later.error
        except OperationalError as exc:  # the broker is away too: keep the message itself
            raise Reject(f"broker unreachable for the retry: {exc}", requeue=True) from exc
    except MoveTo as move:  # to the worker holding the image's embedding, at once
        try:
            raise task.retry(countdown=0, queue=move.queue)
        except OperationalError as exc:
            raise Reject(f"broker unreachable for the move: {exc}", requeue=True) from exc
    except LeaveQueued as why:
        raise Reject(str(why), requeue=True) from why


def register(app: Celery) -> None:
    """Add segq's four tasks to ``app``."""
    # ``execute`` counts retries itself. Celery's own limit must be off (None on the task:
    # ``retry(max_retries=None)`` means "the task's default", 3), or it drops the job after
    # the third retry and leaves its status ``queued`` for ever.
    for name in TASKS:

        def shell(self: Task, *args: Any, **kwargs: Any) -> Optional[dict[str, Any]]:
            return run(self, args, kwargs)

        app.task(
            shell, name=name, bind=True, acks_late=True, reject_on_worker_lost=True,
            max_retries=None, Request=CheckedRequest, shared=False,
        )  # fmt: skip
