"""The worker's ``segq`` commands, added to the ``segq`` CLI through the ``segq.commands``
entry point (``pyproject.toml``), so the producer's CLI never imports the worker.

    segq worker --queues segq.interactive --pool threads --concurrency 2
    segq download-models [--segment] [--panoptic]
"""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``worker`` and ``download-models`` to the ``segq`` command's subparsers."""
    p = sub.add_parser("worker", help="run a Celery worker (models load before it takes work)")
    p.add_argument("--queues", help="comma-separated queues (default: both segq queues)")
    p.add_argument("--pool", choices=["threads", "prefork", "solo"])
    p.add_argument("--concurrency", type=int)
    p.add_argument("--hostname", help="the worker's node name, NAME@HOST (%%h: this host)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("download-models", help="fill the model cache ahead of time")
    p.add_argument("--segment", action="store_true", help="SAM 2 only")
    p.add_argument("--panoptic", action="store_true", help="DETR only")
    p.set_defaults(func=cmd_download_models)


def cmd_worker(args: argparse.Namespace) -> int:
    from config.settings import get_settings

    settings = get_settings()
    for url in {settings.redis_url, settings.broker}:
        if url.startswith(("redis://", "rediss://")):
            _check_redis_credentials(url)
    import worker.inference.sessions  # noqa: F401  a missing onnxruntime says which extra, here
    from worker.app import create_app

    argv = [
        "worker",
        f"--queues={args.queues or ','.join(settings.queues)}",
        f"--pool={args.pool or settings.pool}",
        f"--concurrency={args.concurrency or settings.concurrency}",
        f"--loglevel={args.loglevel}",
        "--task-events",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    create_app(settings).worker_main(argv)
    return 0


def _check_redis_credentials(url: str) -> None:
    """A wrong Redis password never heals: stop with a clear error where Celery would try
    again for ever. An unreachable Redis is left to Celery's retries (it may be starting)."""
    import redis

    from config.errors import InvalidConfig

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5) as client:
            client.ping()
    except redis.AuthenticationError as exc:
        raise InvalidConfig(
            f"Redis refused the credentials in SEGQ_REDIS_URL / SEGQ_BROKER_URL: {exc}"
        ) from None
    except redis.RedisError:
        pass


def cmd_download_models(args: argparse.Namespace) -> int:
    from config.settings import get_settings
    from worker.inference.hub import download_models

    both = not args.segment and not args.panoptic
    files = download_models(
        get_settings(), segment=both or args.segment, panoptic=both or args.panoptic, progress=True
    )
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0
