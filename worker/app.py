"""The Celery app, built from settings by ``create_app``; ``worker.celery`` holds the one
that ``segq worker``, ``celery -A worker.celery`` and Flower use.

Models load before the worker consumes its first message:

- prefork: in each child after the fork (``worker_process_init``), since onnxruntime
  sessions must not cross a fork;
- threads and solo: in the worker process itself (``worker_init``), because
  ``worker_process_init`` never fires for those pools.

Messages the worker cannot run as a job (an unknown task name, a body that is not JSON or
not ``[args, kwargs, options]``, pickle) are dropped by Celery with a log line; here they
also end the job's status ``failed`` with a code, so whoever sent them sees why. The hooks
into Celery's consumer and request classes that this needs live in ``worker.hardening``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from celery._state import get_current_app
from celery.worker.control import control_command

from config.affinity import worker_queue
from config.celeryconfig import celery_config
from config.settings import Settings
from worker.recovery import Recovery, held_job_ids
from worker.runtime import Runtime

log = logging.getLogger("segq.worker")


class SegqCelery(Celery):
    """A Celery app that carries the worker's ``Runtime`` (tasks reach it as ``self.app.runtime``)."""

    runtime: Runtime
    recovery: "Recovery | None"


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> SegqCelery:
    """The Celery app for ``settings``: segq's delivery settings, its four tasks, the
    hardened consumer, and the model loading before work. ``runtime`` defaults to a new
    ``Runtime(settings)``."""
    from worker import tasks

    app = SegqCelery("segq", set_as_current=False)
    app.config_from_object(celery_config(settings))
    app.conf.worker_consumer = "worker.hardening:Consumer"
    app.runtime = runtime or Runtime(settings)
    app.recovery = None
    tasks.register(app)

    def load_in_worker(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is app and not _is_prefork(sender.pool_cls):
            app.runtime.load_models()

    def load_in_child(sender: Any = None, **_: object) -> None:
        if get_current_app() is not app:  # the child has made its app current by now
            return
        app.runtime.load_models()
        # The parent answers health checks but holds no models: tell it, through Redis,
        # what this child loaded and that a probe inference ran here.
        app.runtime.report_child_ready(str(sender))

    def own_queue(sender: Any = None, instance: Any = None, **_: object) -> None:
        # Before the consumer starts: also consume (and so declare) this worker's own queue,
        # where producers send prompts on the images whose embeddings it holds.
        if getattr(instance, "app", None) is app and _affinity(app, instance):
            app.amqp.queues.select_add(worker_queue(str(sender)))

    def beat(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is not app:  # the consumer, in the main process
            return
        queues = sorted(app.amqp.queues.consume_from)
        app.runtime.start_heartbeat(
            sender.hostname, lambda: {"queues": queues, "held": held_job_ids()},
            affinity=worker_queue(sender.hostname) in queues,
        )  # fmt: skip
        if Recovery.applies(app) and app.recovery is None:
            app.recovery = Recovery(app, app.runtime.workers, app.runtime.status).start()

    def stop_beating(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            if app.recovery is not None:
                app.recovery.stop()
            app.runtime.stop_heartbeat()

    # weak=False: the handlers live as long as the app, not as long as this call
    signals.celeryd_after_setup.connect(own_queue, weak=False)
    signals.worker_init.connect(load_in_worker, weak=False)
    signals.worker_process_init.connect(load_in_child, weak=False)
    signals.worker_ready.connect(beat, weak=False)
    signals.worker_shutdown.connect(stop_beating, weak=False)
    return app


def _affinity(app: SegqCelery, worker: Any) -> bool:
    """Embedding affinity applies to a worker whose one process both consumes and holds the
    embeddings (threads or solo pool) and that runs SAM 2."""
    settings = app.runtime.settings
    return settings.affinity and "sam2" in settings.load_models and not _is_prefork(worker.pool_cls)


def _is_prefork(pool_cls: object) -> bool:
    from celery import concurrency
    from celery.concurrency.prefork import TaskPool as PreforkPool

    cls = concurrency.get_implementation(pool_cls) if isinstance(pool_cls, str) else pool_cls
    return isinstance(cls, type) and issubclass(cls, PreforkPool)


@control_command()
def segq_health(state: Any, **_: object) -> dict:
    """Answer ``segq health``: ready only once models are loaded and a fresh inference
    on them succeeds (in a prefork worker: in every pool child)."""
    consumer = state.consumer
    runtime: Runtime = consumer.app.runtime
    pool = consumer.pool
    if pool is not None and _is_prefork(type(pool)):
        return runtime.children_health(state.hostname, list(pool.info.get("processes", [])))
    return runtime.health()
