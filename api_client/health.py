"""``segq health``: ask a worker, over the broker, whether it is ready.

The worker answers a ``segq_health`` control command (registered in ``worker.app``)
with its models, execution providers and a fresh small inference, so the check proves
the worker can really serve, not just that its process exists.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Optional

from celery import Celery

from config.celeryconfig import celery_config
from config.settings import Settings, get_settings


def ask_workers(
    settings: Settings, *, hostname: Optional[str] = None, timeout: float = 5.0
) -> dict[str, dict]:
    app = Celery("segq-health", config_source=celery_config(settings), set_as_current=False)
    destination = [hostname] if hostname else None
    # A connection of its own, not one from kombu's process-wide pool: after a Redis
    # restart a pooled connection reconnects its socket under kombu's poller, which then
    # never sees the replies, so a long-lived process would find every worker silent.
    try:
        with app.connection_for_write() as connection:
            replies = app.control.broadcast(
                "segq_health", reply=True, timeout=timeout, destination=destination,
                connection=connection,
            )  # fmt: skip
    finally:
        app.close()
    merged: dict[str, dict] = {}
    for reply in replies or []:
        merged.update(reply)
    return merged


def check_health(*, hostname: Optional[str] = None, timeout: float = 5.0) -> int:
    """Exit code 0 when the worker (default: ``celery@<this host>``) is ready."""
    settings = get_settings()
    target = hostname or f"celery@{socket.gethostname()}"
    replies = ask_workers(settings, hostname=target, timeout=timeout)
    report = replies.get(target)
    if report is None:
        print(f"segq: no answer from worker {target} within {timeout}s", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0 if report.get("ready") else 1
