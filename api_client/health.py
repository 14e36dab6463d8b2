"""``segq health``: ask workers, over the broker, whether they are ready.

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
from config.status import redis_reachable


def ask_workers(
    settings: Settings, *, hostname: Optional[str] = None, timeout: float = 5.0
) -> dict[str, dict]:
    """``{worker hostname: its health report}`` of every worker that answered within
    ``timeout`` (only ``hostname`` when given). ``QueueUnavailable`` when the broker
    cannot be reached."""
    config = {**celery_config(settings), "broker_connection_max_retries": 1}
    app = Celery("segq-health", config_source=config, set_as_current=False)
    destination = [hostname] if hostname else None
    # A connection of its own, not one from kombu's process-wide pool: after a Redis
    # restart a pooled connection reconnects its socket under kombu's poller, which then
    # never sees the replies, so a long-lived process would find every worker silent.
    try:
        with redis_reachable("ask the workers"), app.connection_for_write() as connection:
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


def on_this_host(worker_hostname: str, host: Optional[str] = None) -> bool:
    """Whether a Celery node name (``name@host``) is on ``host`` (default: this machine)."""
    return worker_hostname.rpartition("@")[2] == (host or socket.gethostname())


def check_health(*, hostname: Optional[str] = None, timeout: float = 5.0) -> int:
    """Exit code 0 when ``hostname`` is ready, or, without one, when every worker on this
    host that answers is ready and at least one answers."""
    replies = ask_workers(get_settings(), hostname=hostname, timeout=timeout)
    if hostname is None:
        replies = {name: r for name, r in replies.items() if on_this_host(name)}
    if not replies:
        who = hostname or f"any worker on this host ({socket.gethostname()})"
        print(f"segq: no answer from {who} within {timeout}s", file=sys.stderr)
        return 1
    print(json.dumps(replies if hostname is None else replies[hostname], indent=2))
    return 0 if all(r.get("ready") for r in replies.values()) else 1
