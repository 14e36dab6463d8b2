"""Raw model latency: onnxruntime alone, no decoding, resizing or post-processing.

    python -m bench.raw_models --models /tmp/segq-models [--threads 2] [--repeats 10]

This is the floor the pipelines are measured against: SAM 2's encoder on one 1024x1024 image,
its decoder on one point, DETR at 800x1066 (a 640x480 photo after resizing). Sessions come
from the worker's own factory (same providers and options as in production), are created
once and run twice before timing, so arena growth and lazy kernel selection stay out of the
numbers. Input names and shapes come from the session, as the worker reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import onnxruntime as ort

from config.settings import Settings
from worker.inference.sam2 import ENCODER_INPUT
from worker.inference.sessions import create_session, input_shape, provider

SAM2_SIDE = 1024
DETR_SIZE = (800, 1066)
WARMUP_RUNS = 2


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (the platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = WARMUP_RUNS) -> dict[str, Any]:
    """Median, min and p95 wall time of ``fn()`` in milliseconds over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "p95_ms": float(np.percentile(times, 95)),
        "runs": repeats,
    }


def bench_raw(
    models_dir: Path,
    *,
    threads: int = 0,
    repeats: int = 10,
    providers: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time raw onnxruntime calls on the models under ``models_dir`` (``sam2/encoder.onnx``,
    ``sam2/decoder.onnx``, ``detr/onnx/model.onnx``); models that are missing are skipped.

    ``threads`` is onnxruntime's intra-op thread count (0: its choice); ``providers`` default
    to the worker's (CUDA, then CPU, less what this build lacks). Returns ``{"models": {name:
    {median_ms, min_ms, p95_ms, runs, input, provider, session_s}}, ...}`` with the settings
    and machine alongside.
    """
    settings = Settings(intra_op_threads=threads, **({"providers": list(providers)} if providers else {}))
    models_dir = Path(models_dir)
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, Any]] = {}
    created_s: dict[Path, float] = {}

    def load(path: Path) -> ort.InferenceSession:
        start = time.perf_counter()
        session = create_session(path, settings)
        created_s.setdefault(path, time.perf_counter() - start)
        return session

    def measure(name: str, path: Path, feeds: dict[str, np.ndarray], shown: str) -> list[np.ndarray]:
        session = load(path)
        results[name] = {
            **time_calls(lambda: session.run(None, feeds), repeats=repeats),
            "input": shown, "provider": provider(session), "session_s": created_s[path],
        }
        return session.run(None, feeds)

    encoder_path = models_dir / "sam2" / "encoder.onnx"
    decoder_path = models_dir / "sam2" / "decoder.onnx"
    if encoder_path.exists() and decoder_path.exists():
        image = rng.standard_normal((1, 3, SAM2_SIDE, SAM2_SIDE), dtype=np.float32)
        features = measure("sam2 encoder", encoder_path, {ENCODER_INPUT: image},
                           f"1x3x{SAM2_SIDE}x{SAM2_SIDE}")
        encoder, decoder = load(encoder_path), load(decoder_path)
        feeds = {o.name: f for o, f in zip(encoder.get_outputs(), features)}
        feeds.update(
            point_coords=np.array([[[SAM2_SIDE / 2, SAM2_SIDE / 2]]], np.float32),
            point_labels=np.ones((1, 1), np.float32),
            mask_input=np.zeros(input_shape(decoder, "mask_input", (1, 1, 256, 256)), np.float32),
            has_mask_input=np.zeros(input_shape(decoder, "has_mask_input", (1,)), np.float32),
        )
        measure("sam2 decoder", decoder_path, feeds, "1 point")

    detr_path = models_dir / "detr" / "onnx" / "model.onnx"
    if detr_path.exists():
        detr = load(detr_path)
        height, width = DETR_SIZE
        feeds = {
            "pixel_values": rng.standard_normal((1, 3, height, width), dtype=np.float32),
            "pixel_mask": np.ones(input_shape(detr, "pixel_mask", (1, height, width)), np.int64),
        }
        measure("detr", detr_path, feeds, f"1x3x{height}x{width}")

    return {
        "models": results,
        "threads": threads,
        "onnxruntime": ort.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a small text table, one model a row."""
    threads = report["threads"] or "default"
    lines = [
        f"onnxruntime {report['onnxruntime']}, {threads} intra-op threads, "
        f"{report['cpu']} ({report['cpu_count']} cores)",
        f"{'model':<14}{'input':<16}{'provider':<22}{'median ms':>10}{'min ms':>9}{'p95 ms':>9}"
        f"{'runs':>6}{'session s':>11}",
    ]
    for name, r in report["models"].items():
        lines.append(
            f"{name:<14}{r['input']:<16}{r['provider']:<22}{r['median_ms']:>10.1f}"
            f"{r['min_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['runs']:>6}{r['session_s']:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True,
                        help="directory with sam2/ and detr/ as `bench.export_models` writes them")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0: onnxruntime's choice")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per model")
    parser.add_argument("--provider", action="append", dest="providers",
                        help="execution provider, repeatable (default: the worker's, CUDA then CPU)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = bench_raw(args.models, threads=args.threads, repeats=args.repeats, providers=args.providers)
    if not report["models"]:
        print(f"no models under {args.models}; run `python -m bench.export_models --out "
              f"{args.models}` first", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
