"""The Celery app. Models load before the worker consumes its first message:

- prefork: in each child after the fork (``worker_process_init``), since onnxruntime
  sessions must not cross a fork;
- threads and solo: in the worker process itself (``worker_init``), because
  ``worker_process_init`` never fires for those pools.

Messages the worker cannot run as a job (an unknown task name, a body that is not JSON or
not ``[args, kwargs, options]``, pickle) are dropped by Celery with a log line; here they
also end the job's status ``failed`` with a code, so whoever sent them sees why.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.control import control_command
from celery.worker.request import Request

from config.celeryconfig import celery_config
from config.contract import TASKS
from config.errors import InvalidPayload, SegqError, UnknownTask
from config.settings import get_settings

log = logging.getLogger("segq.worker")

app = Celery("segq")
app.config_from_object(celery_config(get_settings()))
app.conf.imports = ["worker.tasks"]
app.conf.worker_consumer = f"{__name__}:Consumer"


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
    """Celery's consumer, hardened against hand-made messages: an undecodable body (not
    JSON) also fails the job's status, and a message that trips Celery's own parsing
    (e.g. a body of ``7``: ``'args' in 7``) is rejected instead of stopping the worker."""

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
        try:
            why = f"message body is not valid {message.content_type}: {exc}"
            _refuse(message, InvalidPayload(why))
        except Exception:  # noqa: BLE001  the consumer must go on (Redis may be down)
            log.exception("could not record the refused message")


@signals.task_unknown.connect
def _unknown_task(message: Any = None, name: Any = None, **_: Any) -> None:
    _refuse(message, UnknownTask(f"no task named {name!r} here; segq runs {', '.join(TASKS)}"))


@signals.task_rejected.connect
def _rejected(message: Any = None, exc: Any = None, **_: Any) -> None:
    _refuse(message, InvalidPayload(f"message refused: {exc or 'not a Celery task message'}"))


def _refuse(message: Any, err: SegqError) -> None:
    headers = getattr(message, "headers", None) or {}
    job_id, task = headers.get("id"), headers.get("task")
    if not isinstance(job_id, str) or not job_id:
        return  # no job to tell; Celery has logged the message
    from worker.jobs import refuse_message
    from worker.runtime import get_runtime

    refuse_message(get_runtime(), job_id, task if isinstance(task, str) else "unknown", err)


def _is_prefork(pool_cls: object) -> bool:
    from celery import concurrency
    from celery.concurrency.prefork import TaskPool as PreforkPool

    cls = concurrency.get_implementation(pool_cls) if isinstance(pool_cls, str) else pool_cls
    return isinstance(cls, type) and issubclass(cls, PreforkPool)


@signals.worker_init.connect
def _load_in_worker(sender=None, **_: object) -> None:
    if sender is not None and _is_prefork(sender.pool_cls):
        return
    from worker.runtime import get_runtime

    get_runtime().load_models()


@signals.worker_process_init.connect
def _load_in_child(sender: Any = None, **_: object) -> None:
    from worker.runtime import get_runtime

    runtime = get_runtime()
    runtime.load_models()
    # The parent answers health checks but holds no models: tell it, through Redis,
    # what this child loaded and that a probe inference ran here.
    runtime.report_child_ready(str(sender))


@control_command()
def segq_health(state: Any, **_: object) -> dict:
    """Answer ``segq health``: ready only once models are loaded and a fresh inference
    on them succeeds (in a prefork worker: in every pool child)."""
    from worker.runtime import get_runtime

    pool = getattr(getattr(state, "consumer", None), "pool", None)
    if pool is not None and _is_prefork(type(pool)):
        children = [p.pid for p in pool._pool._pool]  # noqa: SLF001  billiard's process list
        return get_runtime().children_health(state.hostname, children)
    return get_runtime().health()
