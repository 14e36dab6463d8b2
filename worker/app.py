"""The Celery app. Models load before the worker consumes its first message:

- prefork: in each child after the fork (``worker_process_init``), since onnxruntime
  sessions must not cross a fork;
- threads and solo: in the worker process itself (``worker_init``), because
  ``worker_process_init`` never fires for those pools.
"""

from __future__ import annotations

import logging

from celery import Celery, signals
from celery.worker.control import control_command

from config.celeryconfig import celery_config
from config.settings import get_settings

log = logging.getLogger("segq.worker")

app = Celery("segq")
app.config_from_object(celery_config(get_settings()))
app.conf.imports = ["worker.tasks"]


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
def _load_in_child(**_: object) -> None:
    from worker.runtime import get_runtime

    get_runtime().load_models()


@control_command()
def segq_health(state: object, **_: object) -> dict:
    """Answer ``segq health``: ready only once models are loaded and a fresh inference
    on them succeeds."""
    from worker.runtime import get_runtime

    return get_runtime().health()
