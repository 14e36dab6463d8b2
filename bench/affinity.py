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
from bench.queue import INPUT_BUCKET, Worker, local_services, local_settings
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
    kill_after: Optional[int] = None,
    think_s: float = 0.0,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Start ``workers`` workers for ``settings``, run the click sessions, stop them.
    ``kill_after``: once that many clicks have succeeded, SIGKILL the worker holding the
    most images (a lost node) and let the sessions go on. ``think_s``: a user's pause between
    a mask and the next click."""
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
        killed: dict[str, Any] = {}
        done_count = threading.Semaphore(0)

        def killer() -> None:
            for _ in range(kill_after or 0):
                done_count.acquire()
            # not in step with a click: SIGKILL between kombu's BRPOP of a message and its
            # entry in the unacknowledged hash (a millisecond) loses that message, with or
            # without affinity (a Redis-transport limit), and a kill on a click's heels would
            # hit that window on purpose
            time.sleep(0.5)
            holders = [s[-1].worker for s in sessions if s and len(s) < clicks]
            if not holders:
                log("  no session left to kill a holder in")
                return
            victim = max(set(holders), key=holders.count)
            next(w for w in pool if w.hostname == victim).kill()
            killed.update(worker=victim, at=time.time(), images_held=holders.count(victim),
                          clicks_done=sum(len(s) for s in sessions))  # fmt: skip
            log(f"  killed {victim}, holding {holders.count(victim)} of the unfinished sessions' images")

        def session(i: int) -> None:
            try:
                for prompt in click_points(*size, clicks, seed=i):
                    if sessions[i] and think_s:
                        time.sleep(think_s)
                    sessions[i].append(client.segment(uris[i], prompt).wait(timeout=timeout_s))
                    done_count.release()
            except BaseException as exc:  # noqa: BLE001  reported below
                errors.append(exc)

        started = time.perf_counter()
        threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(images)]
        if kill_after:
            threading.Thread(target=killer, daemon=True).start()
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
    if killed:
        after = [st for st in later if st.created_at >= killed["at"]]
        on_victim = [s for s in sessions if any(st.worker == killed["worker"] for st in s)]
        result["kill"] = {
            **{k: v for k, v in killed.items() if k != "at"},
            "clicks_lost": images * clicks - len(statuses),
            "re_encodes": misses - images,
            "heartbeat_ttl_s": settings.worker_heartbeat_ttl_s,
            "sessions_that_used_the_victim": len(on_victim),
            "clicks_after_kill_latency_ms": {
                "p50": float(np.percentile([1000 * (st.finished_at - st.created_at) for st in after], 50)),
                "max": float(max(1000 * (st.finished_at - st.created_at) for st in after)),
            } if after else None,
        }  # fmt: skip
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
    kill: bool = False,
    heartbeat_ttl_s: Optional[float] = None,
    think_s: float = 0.0,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """The click sessions with affinity on and off; ``kill``: a third run, on, in which the
    worker holding the most images is SIGKILLed once 40% of the clicks have succeeded."""
    runs = {}
    for on, name, kill_after in [*((m, "on" if m else "off", None) for m in modes),
                                 *([(True, "on, holder killed", max(1, images * clicks * 2 // 5))] if kill else [])]:  # fmt: skip
        redis.flush()
        settings = local_settings(
            redis,
            s3,
            allowed_inputs=[f"s3://{INPUT_BUCKET}/"],
            sam2_dir=models / "sam2",
            load_models=["sam2"],
            providers=["CPUExecutionProvider"],
            intra_op_threads=intra_op_threads,
            affinity=on,
            **({"worker_heartbeat_ttl_s": heartbeat_ttl_s} if heartbeat_ttl_s else {}),
        )
        runs[name] = run_sessions(
            settings, workers=workers, images=images, clicks=clicks, size=size,
            kill_after=kill_after, think_s=think_s, log=log,
        )  # fmt: skip
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
    p.add_argument("--kill", action="store_true", help="a third run, on, that SIGKILLs a holder mid-session")
    p.add_argument("--modes", default="on,off", help="which of the on/off runs to make (comma-separated; '' for none)")
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
            clicks=args.clicks, intra_op_threads=args.threads, kill=args.kill, log=print,
            modes=[m == "on" for m in args.modes.split(",") if m in ("on", "off")],
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
