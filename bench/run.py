"""The side-by-side benchmark: one command, a table, and ``bench/results/<machine>-<date>.json``.

    python -m bench.run --models /tmp/segq-models [--quick]       # or: make bench

1. raw onnxruntime calls (``bench.raw_models``): SAM 2 encoder, decoder, DETR at 800x1066;
2. the in-process pipelines per job type and photo size (0.3, 3, 12 MP), stage by stage,
   as a ratio to the raw calls they wrap, measured in alternation with them;
3. a second prompt on the same image (embedding cache hit) against the first;
4. end to end through Celery, Redis and S3 on loopback with one worker: latency, jobs per
   second and the ratio to the pipeline time, for each job type; without ``--quick`` also the pool and thread
   settings side by side (threads pool at concurrency 1 and 2, onnxruntime intra-op threads,
   prefork), with the worker's memory;
5. segq against transformers' PyTorch pipelines on the same weights (``bench.vs_transformers``).

``--providers CUDAExecutionProvider,CPUExecutionProvider`` runs it all on the GPU where
onnxruntime has one; where it has none the report says "no GPU here" and the CPU numbers
are the only ones taken. Timings on a shared machine are noisy: compare ratios measured in
one run, never numbers from two runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import onnxruntime as ort

from bench.pipeline import PHOTO_SIZES, bench_pipelines, photo_jpeg
from bench.queue import JOB_TYPES, bench_memory, bench_queue, local_services
from bench.raw_models import bench_raw, cpu_name, format_table
from bench.vs_transformers import TORCH_PYTHON, bench_vs_transformers
from config.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
QUEUE_PHOTO = PHOTO_SIZES["3 MP"]
MEMORY_PHOTO = PHOTO_SIZES["12 MP"]
# (pool, concurrency, onnxruntime intra-op threads; 0 = the default) compared without --quick
POOL_MATRIX = [
    ("threads", 2, 1),
    ("threads", 1, 0),
    ("threads", 2, 0),
    ("threads", 1, 1),
    ("prefork", 2, 1),
]
CUDA = "CUDAExecutionProvider"


def machine_slug() -> str:
    name = re.sub(r"[^a-z0-9]+", "-", cpu_name().lower()).strip("-")
    return f"{name}-{os.cpu_count()}c"


def gpu_status(providers: list[str]) -> dict[str, Any]:
    """Whether the GPU run asked for can happen here, in words for the report."""
    available = ort.get_available_providers()
    if CUDA not in providers:
        return {"requested": False}
    if CUDA not in available:
        return {
            "requested": True,
            "available": False,
            "note": f"no GPU here: onnxruntime {ort.__version__} offers {', '.join(available)}",
        }
    return {"requested": True, "available": True, "device": ort.get_device()}


def run(args: argparse.Namespace, say=print) -> dict[str, Any]:
    gpu = gpu_status(args.providers)
    if gpu.get("requested") and not gpu["available"]:
        say(gpu["note"] + "; the figures below are CPU figures")
    providers = args.providers if gpu.get("available") else ["CPUExecutionProvider"]
    base = Settings()  # the worker's defaults, for the end-to-end runs
    # In-process, one job at a time: onnxruntime on every core unless --threads says otherwise.
    settings = Settings(
        sam2_dir=args.models / "sam2",
        detr_dir=args.models / "detr",
        providers=providers,
        intra_op_threads=args.threads,
    )
    rounds = args.rounds or (2 if args.quick else 5)
    report: dict[str, Any] = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "onnxruntime": ort.__version__},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "providers": providers,
        "gpu": gpu,
        "in_process": {
            "intra_op_threads": settings.intra_op_threads or "onnxruntime's choice",
            "fast_jpeg_decode": settings.fast_jpeg_decode,
        },
        "worker_defaults": {
            "pool": base.pool,
            "concurrency": base.concurrency,
            "intra_op_threads": base.intra_op_threads,
        },
    }

    say("\n1. raw onnxruntime calls")
    report["raw"] = bench_raw(
        args.models,
        threads=settings.intra_op_threads,
        repeats=3 if args.quick else 8,
        providers=providers,
    )
    say(format_table(report["raw"]))

    say(f"\n2-3. in-process pipelines, {rounds} rounds alternating with the raw calls")
    report["pipelines"] = bench_pipelines(settings, rounds=rounds, log=say)
    say(format_pipelines(report["pipelines"]))

    if not args.no_queue:
        say(
            f"\n4. end to end: Celery + Redis + S3 on loopback, one worker, "
            f"{QUEUE_PHOTO[0]}x{QUEUE_PHOTO[1]} photos: segment jobs in every setting, "
            "each job type with the default one"
        )
        photo = photo_jpeg(*QUEUE_PHOTO)
        configs = [(base.pool, base.concurrency, base.intra_op_threads)]
        if not args.quick:
            configs += [c for c in POOL_MATRIX if c != configs[0]]
        with local_services() as (redis, s3):
            runs = [
                bench_queue(
                    args.models,
                    redis,
                    s3,
                    photo,
                    pool=pool,
                    concurrency=concurrency,
                    intra_op_threads=threads,
                    providers=providers,
                    sequential=4 if args.quick else 6,
                    burst=6 if args.quick else 12,
                    job_types=JOB_TYPES if i == 0 else ("segment",),
                    log=say,
                )
                for i, (pool, concurrency, threads) in enumerate(configs)
            ]
            say(
                f"\n4b. worker memory: both models, {MEMORY_PHOTO[0]}x{MEMORY_PHOTO[1]} jobs of "
                "every type, peak and steady RSS per job"
            )
            # the default worker beside one that runs DETR's mask head whole (SEGQ_DETR_MASK_CHUNK=0)
            report["memory"], report["memory_mask_head_whole"] = (
                bench_memory(
                    args.models, redis, s3, photo_jpeg(*MEMORY_PHOTO),
                    rounds=1 if args.quick else 2, settings_overrides=overrides, log=say,
                )
                for overrides in (None, {"detr_mask_chunk": 0})
            )  # fmt: skip
        report["queue"], report["pool_matrix"] = runs[0], runs
        say(format_queue(runs))
        say(format_memory(report["memory"]))
        say("mask head whole (SEGQ_DETR_MASK_CHUNK=0):")
        say(format_memory(report["memory_mask_head_whole"]))

    if not args.no_torch:
        say(
            "\n5. against transformers' PyTorch pipelines, same weights, "
            f"{QUEUE_PHOTO[0]}x{QUEUE_PHOTO[1]} photo"
        )
        report["vs_transformers"] = bench_vs_transformers(
            settings,
            photo_jpeg(*QUEUE_PHOTO),
            rounds=2 if args.quick else 3,
            detr=not args.quick,
            python=args.torch_python,
            log=say,
        )
        say(format_vs(report["vs_transformers"]))
    return report


def format_pipelines(result: dict[str, Any]) -> str:
    lines = [f"{'photo':<8}{'job':<10}{'total ms':>9}{'raw ms':>8}{'ratio':>7}  stages (ms)"]
    for label, size in result["sizes"].items():
        for job, j in size["jobs"].items():
            stages = " ".join(f"{k} {v:.0f}" for k, v in j["stages_ms"].items())
            lines.append(
                f"{label:<8}{job:<10}{j['total_ms']:>9.0f}{size['raw_ms'][j['raw']]:>8.0f}"
                f"{j['ratio_to_raw']:>7.2f}  {stages}"
            )
        r = size["reprompt"]
        lines.append(
            f"{label:<8}{'re-prompt':<10}{r['cached_ms']:>9.0f}{'':>8}{'':>7}  cold "
            f"{r['cold_ms']:.0f} ms, cached {r['speedup']:.1f}x faster"
        )
    return "\n".join(lines)


def format_queue(runs: list[dict[str, Any]]) -> str:
    lines = [
        f"{'pool':<9}{'conc':>5}{'ort thr':>8}{'p50 ms':>8}{'p95 ms':>8}{'e2e/pipe':>9}"
        f"{'jobs/s':>8}{'burst p50':>10}{'RSS MB':>8}"
    ]
    for r in runs:
        lines.append(
            f"{r['pool']:<9}{r['concurrency']:>5}{r['intra_op_threads'] or 'dflt':>8}"
            f"{r['latency_ms']['p50']:>8.0f}{r['latency_ms']['p95']:>8.0f}"
            f"{r['ratio_to_pipeline']:>9.3f}{r['burst']['jobs_per_s']:>8.2f}"
            f"{r['burst']['latency_ms']['p50']:>10.0f}{r['rss_mb']:>8.0f}"
        )
    lines.append(f"\n{'default worker':<15}{'p50 ms':>8}{'pipeline ms':>12}{'overhead ms':>12}"
                 f"{'e2e/pipe':>9}")  # fmt: skip
    for job, j in runs[0]["by_job"].items():
        lines.append(
            f"{job:<15}{j['latency_ms']['p50']:>8.0f}{j['pipeline_ms']:>12.0f}"
            f"{j['overhead_ms']:>12.0f}{j['ratio_to_pipeline']:>9.3f}"
        )
    return "\n".join(lines)


def format_memory(result: dict[str, Any]) -> str:
    start = result["after_start"]
    lines = [f"worker RSS after start {start['rss_mb']:.0f} MB (peak {start['peak_mb']:.0f})"]
    for job, j in result["jobs"].items():
        lines.append(f"  {job:<9} peak {j['peak_mb']:>6.0f} MB   after {j['steady_mb']:>6.0f} MB")
    lines.append(
        f"  all       peak {result['peak_mb']:>6.0f} MB   after {result['steady_mb']:>6.0f} MB"
    )
    return "\n".join(lines)


def format_vs(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    lines = []
    for model in ("sam2", "detr"):
        if model in result:
            r = result[model]
            lines.append(
                f"{model}: segq {r['segq_ms']:.0f} ms, transformers {r['transformers_ms']:.0f} ms"
                f" ({r['speedup']:.1f}x), {r['pixels_differing']} of {r['pixels']} pixels differ"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=Path,
        required=True,
        help="sam2/ and detr/ as `python -m bench.export_models` writes them",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds, no pool comparison, no DETR under PyTorch (~12 min on 2 cores)",
    )
    parser.add_argument("--rounds", type=int, help="pipeline rounds (default 5, quick 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads in-process (default: onnxruntime's "
        "choice, all cores); the end-to-end runs use the worker's settings",
    )
    parser.add_argument(
        "--providers",
        type=lambda s: s.split(","),
        default=["CPUExecutionProvider"],
        help="e.g. CUDAExecutionProvider,CPUExecutionProvider",
    )
    parser.add_argument("--no-queue", action="store_true", help="skip the Celery/Redis/S3 runs")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument(
        "--torch-python",
        type=Path,
        default=TORCH_PYTHON,
        help="interpreter with torch and transformers for the comparison",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    if not (args.models / "sam2" / "encoder.onnx").exists():
        print(
            f"no models under {args.models}; make them with `python -m bench.export_models "
            f"--out {args.models}` (bench/README.md)",
            file=sys.stderr,
        )
        return 2
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = (
        args.out
        / f"{machine_slug()}-{dt.date.today().isoformat()}{'-quick' if args.quick else ''}.json"
    )
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
