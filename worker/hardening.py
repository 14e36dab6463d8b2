"""The worker against hand-made and hostile messages: every place segq hooks into Celery's
consumer and request classes, in one module, each pinned by ``tests/test_hardening.py`` so
a Celery upgrade that moves them fails loudly there.

- Only segq's four tasks run: Celery registers its built-ins (``celery.accumulate``,
  ``celery.chord_unlock``, ...) on every app, and a producer could name them; here they are
  unknown tasks like any other name.
- A body that is not ``[args, kwargs, options]`` (``CheckedRequest``) or that trips
  Celery's own parsing (``Consumer.create_task_handler``) is rejected, not a crash of the
  whole worker.
- Every message refused for such reasons, or for not being JSON, ends its job's status
  ``failed`` with a code when the message names a job id, so a client does not wait on a
  ``queued`` record for ever.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request

from config.contract import TASKS
from config.errors import InvalidPayload, SegqError, UnknownTask

log = logging.getLogger("segq.worker")


class CheckedRequest(Request):
    """Celery unpacks a message body as ``[args, kwargs, options]`` where nothing catches a
    failure: a hand-made body of another shape stops the whole worker, and, left
    unacknowledged, the next worker that receives it. As ``InvalidTaskError`` the consumer
    rejects the message and sends ``task_rejected`` instead."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise InvalidTaskError(f"the body is not [args, kwargs, options]: {exc}") from None
        if not isinstance(self.args, (list, tuple)) or not isinstance(self.kwargs, dict):
            raise InvalidTaskError("the body is not [args, kwargs, options]")


class Consumer(CeleryConsumer):
    """Celery's consumer that runs segq's tasks only, survives bodies that trip Celery's own
    parsing (e.g. a body of ``7``: ``'args' in 7``), and fails the status of a job whose
    body cannot be decoded."""

    def update_strategies(self) -> None:
        super().update_strategies()
        for name in [n for n in self.strategies if n not in TASKS]:
            del self.strategies[name]  # a message naming it is now an unknown task

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        recoverable = (*self.connection_errors, *self.channel_errors)

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except recoverable:
                raise  # Celery reconnects on these
            except Exception as exc:  # noqa: BLE001  anything else would be "Unrecoverable error"
                if message.acknowledged:
                    raise
                reason = InvalidTaskError(
                    f"the body is not [args, kwargs, options] ({type(exc).__name__}: {exc})"
                )
                return self.on_invalid_task(None, message, reason)

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        super().on_decode_error(message, exc)
        why = f"message body is not valid {message.content_type}: {exc}"
        refuse(self, message, InvalidPayload(why))


@signals.task_unknown.connect
def _unknown_task(sender: Any = None, message: Any = None, name: Any = None, **_: Any) -> None:
    refuse(sender, message, UnknownTask(f"no task named {name!r} here; segq runs {', '.join(TASKS)}"))


@signals.task_rejected.connect
def _rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
    refuse(sender, message, InvalidPayload(f"message refused: {exc or 'not a Celery task message'}"))


def refuse(consumer: Any, message: Any, err: SegqError) -> None:
    """Record a refused message as its job's failure, when it names a job and the consumer
    belongs to a segq app. Never raises: the consumer must go on (Redis may be down)."""
    runtime = getattr(getattr(consumer, "app", None), "runtime", None)
    headers = getattr(message, "headers", None) or {}
    job_id, task = headers.get("id"), headers.get("task")
    if runtime is None or not job_id:
        return  # no job to tell; Celery has logged the message
    from worker.jobs import refuse_message

    try:
        refuse_message(runtime, job_id, task if isinstance(task, str) else "unknown", err)
    except Exception:  # noqa: BLE001
        log.exception("could not record the refused message %s", job_id)
