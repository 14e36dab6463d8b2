"""The ``segq`` command line.

    segq dev                                   the whole stack locally, a sample through all four jobs
    segq submit cutout s3://segq-input/photo.jpg --point 320,240 --wait
    segq upload photo.jpg s3://segq-input/photos/
    segq status JOB_ID | segq wait JOB_ID | segq cancel JOB_ID
    segq health
    segq metrics --port 9809                   queue gauges for an autoscaler, no worker needed
    segq api --port 8000                       the HTTP API and the try-it page
    segq api-key create --prefix s3://segq-input/ --rate 60

The worker's commands (``segq worker``, ``segq download-models``) are ``worker.cli``'s,
added through the ``segq.commands`` entry points.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Optional, Sequence

from config.contract import SHORT_NAMES
from config.errors import SegqError


def _pair(text: str, n: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return values


def _prompt(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    prompt: dict[str, Any] = {}
    if args.point:
        prompt["points"] = [_pair(p, 2, "--point") for p in args.point]
        if args.label:
            prompt["labels"] = [int(v) for v in args.label]
    elif args.label:
        raise SystemExit("segq: --label needs --point")
    if args.box:
        prompt["box"] = _pair(args.box, 4, "--box")
    if getattr(args, "refine", None):
        if not prompt:
            raise SystemExit("segq: --refine needs the new click: --point or --box")
        prompt["refine"] = args.refine
    return prompt or None


def _print_status(st: Any) -> None:
    print(json.dumps(st.model_dump(mode="json", exclude_none=True), indent=2))


def _progress(st: Any) -> None:
    detail = f" ({st.stage})" if st.stage and st.state.value == "running" else ""
    print(f"  {st.job_id}: {st.state.value}{detail}", file=sys.stderr, flush=True)


def cmd_submit(args: argparse.Namespace) -> int:
    from api_client.client import SegmentationClient

    client = SegmentationClient()
    options: dict[str, Any] = {}
    if args.multimask:
        options["multimask"] = True
    if args.min_score is not None:
        options["min_score"] = args.min_score
    for item in args.option or []:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    job = client.submit(
        args.task,
        args.image,
        _prompt(args),
        idempotency_key=args.idempotency_key,
        callback_url=args.callback_url,
        image_id=args.image_id,
        **options,
    )
    print(job.id)
    if args.wait:
        st = client.wait(job.id, args.timeout, on_update=_progress)
        _print_status(st)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from api_client.client import SegmentationClient

    _print_status(SegmentationClient().status(args.job_id))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from api_client.client import SegmentationClient

    client = SegmentationClient()
    st = client.wait(args.job_id, args.timeout, on_update=_progress)
    _print_status(st)
    if args.urls:
        for name, url in client.presigned_urls(args.job_id).items():
            print(f"{name}: {url}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from api_client.client import SegmentationClient

    _print_status(SegmentationClient().cancel(args.job_id))
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    """Put a local file where jobs can read it, with the credentials of boto3's usual chain."""
    import mimetypes
    from pathlib import Path

    from api_client.client import SegmentationClient
    from config.contract import S3Ref
    from config.errors import ForbiddenLocation, InvalidPayload

    path = Path(args.file)
    if not path.is_file():
        raise InvalidPayload(f"{path} is not a file")
    destination = args.destination
    if destination.endswith("/"):
        destination += path.name
    ref = S3Ref.parse(destination)
    client = SegmentationClient()
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    uri = client.storage.upload(ref, path.read_bytes(), content_type)
    try:
        client.storage.check_readable(ref)
    except ForbiddenLocation as err:
        print(f"segq: note: jobs cannot read it: {err.message}", file=sys.stderr)
    print(uri)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from api_client.health import check_health

    return check_health(hostname=args.hostname, timeout=args.timeout)


def cmd_metrics(args: argparse.Namespace) -> int:
    """Serve the queue gauges alone, from the broker: an autoscaler can scale workers
    from zero, when no worker's own metrics endpoint exists."""
    import threading

    from prometheus_client import CollectorRegistry

    from config.queues import serve_metrics
    from config.settings import get_settings

    server = serve_metrics(
        get_settings(), args.port, host=args.host, registry=CollectorRegistry(), require_gauges=True
    )
    print(f"segq: queue metrics on http://{args.host}:{server.server_port}/metrics", flush=True)
    threading.Event().wait()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    """``segq api``: the HTTP API on uvicorn until interrupted."""
    from api_client.http.auth import is_loopback
    from config.errors import DependencyMissing, InvalidConfig
    from config.settings import get_settings

    try:
        import uvicorn

        from api_client.http import create_app
        from api_client.http.app import MAX_HEADER_BYTES
    except ImportError as err:
        raise DependencyMissing(f"segq api needs the api extra: pip install 'segq[api]' ({err})") from None
    settings = get_settings()
    if not settings.api_keys and not is_loopback(args.host):
        raise InvalidConfig(
            f"no SEGQ_API_KEYS: the open API serves loopback only, not {args.host}; "
            "create a key with `segq api-key create`"
        )
    app = create_app(settings)
    print(f"segq: HTTP API on http://{args.host}:{args.port}/ (docs at /docs)"
          + ("" if settings.api_keys else ", open: no API keys, loopback only"), flush=True)  # fmt: skip
    uvicorn.run(
        app, host=args.host, port=args.port, http="h11", log_level=args.log_level,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=5,
    )  # fmt: skip
    return 0


def cmd_api_key_create(args: argparse.Namespace) -> int:
    """Print a new API key once, and the SEGQ_API_KEYS entry that stores its hash."""
    from config.settings import ApiKey

    from api_client.http.auth import hash_key, new_key

    key = new_key()
    entry = ApiKey(name=args.name or "", sha256=hash_key(key), prefixes=args.prefix,
                   rate_per_minute=args.rate)  # fmt: skip
    line = json.dumps(entry.model_dump(exclude_defaults=False))
    print(f"API key (shown once; give it to the client): {key}")
    print("add this entry to the JSON list in SEGQ_API_KEYS:")
    print(f"  SEGQ_API_KEYS='[{line}]'")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from api_client.dev import run_dev

    return run_dev(
        image=args.image, keep_running=not args.once, workdir=args.workdir, output_dir=Path(args.output)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segq", description="Image segmentation job queue.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dev", help="start Redis, S3, a worker and Flower locally and run a sample")
    p.add_argument("--image", help="a local photo to use instead of the bundled sample")
    p.add_argument("--once", action="store_true", help="stop everything after the sample jobs")
    p.add_argument("--workdir", help="where the local services keep data (default: a temp dir)")
    p.add_argument("--output", default="segq-dev-output", help="where the outputs are saved")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("submit", help="submit a job")
    p.add_argument("task", choices=list(SHORT_NAMES))
    p.add_argument("image", help="s3://bucket/key")
    p.add_argument("--point", action="append", metavar="X,Y", help="a prompt point (repeatable)")
    p.add_argument("--label", action="append", choices=["0", "1"], help="label per --point")
    p.add_argument("--box", metavar="X,Y,W,H")
    p.add_argument("--refine", metavar="JOB_ID", help="refine that earlier job's mask on this image")
    p.add_argument("--image-id", help="your own name for the image's content (embedding affinity)")
    p.add_argument("--multimask", action="store_true")
    p.add_argument("--min-score", type=float)
    p.add_argument("--option", action="append", metavar="KEY=JSON", help="any other option")
    p.add_argument("--idempotency-key")
    p.add_argument("--callback-url")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("upload", help="put a local image into S3 for jobs to read")
    p.add_argument("file", help="a local file")
    p.add_argument("destination", help="s3://BUCKET/KEY, or s3://BUCKET/PREFIX/ to keep the file's name")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("status", help="print a job's status")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", help="wait for a job, showing progress")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float)
    p.add_argument("--urls", action="store_true", help="print presigned URLs of the outputs")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("cancel", help="cancel a queued job")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("health", help="exit 0 when a worker is ready (for container health checks)")
    p.add_argument("--hostname", help="worker to ask (default: every worker on this host)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("metrics", help="serve the queue-depth gauges for Prometheus (no worker needed)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all, for scrapers)")
    p.add_argument("--port", type=int, default=9809)
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("api", help="the HTTP API and the try-it page (uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("api-key", help="HTTP API keys")
    keys = p.add_subparsers(dest="api_key_command", required=True, metavar="ACTION")
    p = keys.add_parser("create", help="print a new key and its SEGQ_API_KEYS entry")
    p.add_argument("--prefix", action="append", required=True, metavar="s3://BUCKET/PREFIX",
                   help="where its jobs and uploads may be (repeatable)")  # fmt: skip
    p.add_argument("--rate", type=int, default=60, help="requests a minute (default 60)")
    p.add_argument("--name", help="a label for logs")
    p.set_defaults(func=cmd_api_key_create)

    from api_client.events.sqs import cmd_events_sqs

    p = sub.add_parser("events", help="turn S3 upload events into jobs by SEGQ_EVENT_RULES")
    events = p.add_subparsers(dest="events_command", required=True, metavar="SOURCE")
    p = events.add_parser("sqs", help="long-poll an SQS queue of S3 (or SNS-wrapped) events")
    p.add_argument("--queue-url", required=True)
    p.add_argument("--region", help="default: SEGQ_S3_REGION")
    p.add_argument("--endpoint-url", help="an SQS-compatible endpoint instead of AWS")
    p.add_argument("--max-messages", type=int, help="stop after this many messages")
    p.set_defaults(func=cmd_events_sqs)

    # Commands of other parts of segq (the worker's: `segq worker`, `segq download-models`)
    # come through the "segq.commands" entry points, so this module never imports them.
    for entry in entry_points(group="segq.commands"):
        entry.load()(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("botocore", "boto3", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except SegqError as err:
        print(f"segq: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
