"""Click sessions on a cluster: embedding affinity on against off.

``workers`` real ``segq worker`` processes (threads pool, concurrency 1, SAM 2 only) against
real Redis and S3 on loopback. ``images`` users each click ``prompts`` times on their own
photo, all at once: each user submits a click, waits for its mask, then clicks again, so
the clicks of different images interleave on the queues as they do in a real app. The same
workload runs twice on fresh workers (cold caches): with ``SEGQ_AFFINITY`` on (producers
route to the holder of the image's embedding, workers claim what they hold and take an
encode lease) and off (any worker takes any job). Reported per mode: the embedding-cache
hit rate of clicks 2..N, their latency (p50, p95; submit to succeeded, from the job's status
record), encodes in all and duplicate encodes (encodes of an image after its first).

    python -m bench.affinity --models /tmp/segq-models            # 20 images x 5 clicks
    python -m bench.affinity --models /tmp/segq-models --images 6  # quicker
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from api_client.client import SegmentationClient
from api_client.dev.localstack import RedisServer, S3Server
from bench.pipeline import photo_jpeg
from bench.queue import INPUT_BUCKET, OUTPUT_BUCKET, Worker, local_services
from config.contract import JobState, JobStatus
from config.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"


def click_points(width: int, height: int, clicks: int, seed: int) -> list[dict[str, Any]]:
    """A session's prompts: a first click, then refining clicks near it, in pixels."""
    rng = np.random.default_rng(seed)
    x, y = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7)
    out = []
    for _ in range(clicks):
        out.append({"point": [float(np.clip(x, 0, width)), float(np.clip(y, 0, height))]})
        x, y = x + rng.normal(0, width * 0.05), y + rng.normal(0, height * 0.05)
    return out


def run_sessions(
    settings: Settings,
    *,
    workers: int,
    images: int,
    clicks: int,
    size: tuple[int, int] = (640, 480),
    timeout_s: float = 900,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Start ``workers`` workers for ``settings``, run the click sessions, stop them."""
    client = SegmentationClient(settings)
    pool = [
        Worker(settings, pool="threads", concurrency=1).start(wait=False) for _ in range(workers)
    ]
    try:
        for w in pool:
            w.wait_ready(timeout=300)
        uris = [
            client.upload(photo_jpeg(*size, seed=i), f"affinity/{uuid.uuid4().hex}.jpg")
            for i in range(images)
        ]
        sessions: list[list[JobStatus]] = [[] for _ in range(images)]
        errors: list[BaseException] = []

        def session(i: int) -> None:
            try:
                for prompt in click_points(*size, clicks, seed=i):
                    sessions[i].append(client.segment(uris[i], prompt).wait(timeout=timeout_s))
            except BaseException as exc:  # noqa: BLE001  reported below
                errors.append(exc)

        started = time.perf_counter()
        threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(images)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
        wall_s = time.perf_counter() - started
    finally:
        for w in pool:
            w.stop()
    if errors:
        raise RuntimeError(f"{len(errors)} session(s) failed; first: {errors[0]!r}")
    statuses = [st for s in sessions for st in s]
    if len(statuses) != images * clicks or any(st.state != JobState.succeeded for st in statuses):
        raise RuntimeError("not every click succeeded")
    later = [st for s in sessions for st in s[1:]]
    latency = [1000 * (st.finished_at - st.created_at) for st in later]
    misses = sum(st.result["embedding_cache"] == "miss" for st in statuses)
    hits_later = sum(st.result["embedding_cache"] == "hit" for st in later)
    result = {
        "affinity": settings.affinity,
        "clicks": len(statuses),
        "cache_hit_rate_later_clicks": hits_later / len(later),
        "latency_later_clicks_ms": {
            "p50": float(np.percentile(latency, 50)),
            "p95": float(np.percentile(latency, 95)),
        },
        "first_click_ms_p50": float(
            np.percentile([1000 * (s[0].finished_at - s[0].created_at) for s in sessions], 50)
        ),
        "encodes": misses,
        "duplicate_encodes": misses - images,
        "workers_used_per_image": float(np.mean([len({st.worker for st in s}) for s in sessions])),
        "wall_s": wall_s,
    }
    log(f"  affinity {'on ' if settings.affinity else 'off'}: hit rate {result['cache_hit_rate_later_clicks']:.1%}, "
        f"clicks 2-{clicks} p50 {result['latency_later_clicks_ms']['p50']:.0f} ms, "
        f"p95 {result['latency_later_clicks_ms']['p95']:.0f} ms, {misses} encodes "
        f"({result['duplicate_encodes']} duplicate), {wall_s:.0f} s")  # fmt: skip
    return result


def bench_affinity(
    models: Path,
    redis: RedisServer,
    s3: S3Server,
    *,
    workers: int = 3,
    images: int = 20,
    clicks: int = 5,
    intra_op_threads: int = 1,
    size: tuple[int, int] = (640, 480),
    modes: Sequence[bool] = (True, False),
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    runs = {}
    for on in modes:
        redis.flush()
        settings = Settings(
            redis_url=redis.url,
            s3_endpoint_url=s3.endpoint_url,
            s3_region=s3.region,
            input_bucket=INPUT_BUCKET,
            output_bucket=OUTPUT_BUCKET,
            output_prefix=f"bench/{uuid.uuid4().hex[:8]}/",
            allowed_inputs=[f"s3://{INPUT_BUCKET}/"],
            sam2_dir=models / "sam2",
            load_models=["sam2"],
            providers=["CPUExecutionProvider"],
            intra_op_threads=intra_op_threads,
            affinity=on,
        )
        runs["on" if on else "off"] = run_sessions(
            settings, workers=workers, images=images, clicks=clicks, size=size, log=log
        )
    return {
        "workload": f"{images} images x {clicks} clicks, each user waiting for a mask before the next click, "
        f"all users at once; {workers} workers (threads, concurrency 1, "
        f"{intra_op_threads} onnxruntime thread(s) each); {size[0]}x{size[1]} JPEGs",
        "workers": workers,
        "images": images,
        "clicks": clicks,
        "models": str(models),
        "runs": runs,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__.split("\n")[0])
    p.add_argument("--models", type=Path, default=Path("/tmp/segq-models"))
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per worker")
    p.add_argument("--out", type=Path, help="results JSON (default: bench/results/affinity-<date>.json)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if not (args.models / "sam2" / "encoder.onnx").exists():
        print(f"no SAM 2 models under {args.models}; make them with `make export-models` "
              "(python -m bench.export_models)", file=sys.stderr)  # fmt: skip
        return 2
    print(f"click sessions: {args.images} images x {args.clicks} clicks on {args.workers} workers")
    with local_services() as (redis, s3):
        report = bench_affinity(
            args.models, redis, s3, workers=args.workers, images=args.images,
            clicks=args.clicks, intra_op_threads=args.threads, log=print,
        )  # fmt: skip
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor()}
    report["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = args.out or RESULTS / f"affinity-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
