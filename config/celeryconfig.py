"""Celery settings derived from ``Settings``: the delivery guarantees segq relies on.

- JSON only: a pickled message is refused by kombu before any code runs.
- ``acks_late`` + ``reject_on_worker_lost``: a job is acknowledged after it ends, so a
  worker that dies mid-job leaves it on the queue for another worker.
- prefetch 1: a slow GPU job never holds a second one hostage in its local buffer.
- a visibility timeout longer than the longest job, or Redis would hand a running job to
  a second worker.
- task events on, so Flower sees every task.
"""

from __future__ import annotations

from typing import Any

from config.contract import TASK_CUTOUT, TASK_OVERLAY, TASK_PANOPTIC, TASK_SEGMENT
from config.settings import Settings


def task_queues(settings: Settings) -> dict[str, str]:
    """Interactive clicks (``segment``, ``cutout``) apart from batch work, so a long
    panoptic backlog never delays a click."""
    return {
        TASK_SEGMENT: settings.queue_interactive,
        TASK_CUTOUT: settings.queue_interactive,
        TASK_PANOPTIC: settings.queue_batch,
        TASK_OVERLAY: settings.queue_batch,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    if settings.visibility_timeout_s <= settings.time_limit_s:
        raise ValueError(
            "SEGQ_VISIBILITY_TIMEOUT_S must be longer than SEGQ_TIME_LIMIT_S, or Redis "
            "redelivers jobs that are still running"
        )
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # A dead worker's job goes back on the queue at the first restore sweep after it
        # is visibility_timeout old. kombu sweeps on every 10th tick of a 10 s timer by
        # default, so up to 100 s late; sweep on every tick, a tenth of the timeout apart.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 10)),
        "unacked_restore_throttle": 1,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
        # a worker's own queue (embedding affinity: cheap prompts) before the shared ones
        "queue_order_strategy": "config.affinity:OwnQueueFirst",
    }
    return {
        "broker_url": settings.broker,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_heartbeat": 10,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        # A job rides out a broker outage (its status writes wait for Redis) and finishes;
        # cancelling it would only make it run again. A lost acknowledgement is repaired
        # by the worker's recovery sweep (worker.recovery).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_soft_time_limit": settings.soft_time_limit_s,
        "task_time_limit": settings.time_limit_s,
        "task_track_started": False,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_default_queue": settings.queue_batch,
        "task_routes": {name: {"queue": q} for name, q in task_queues(settings).items()},
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }
