"""Raw model latency: onnxruntime alone, no decoding, resizing or post-processing.

    python -m bench.raw_models --models /tmp/segq-models [--threads 2] [--repeats 10]

This is the floor the pipelines are measured against: SAM 2's encoder on one 1024x1024 image,
its decoder on one point, DETR at 800x1066 (a 640x480 photo after resizing). Each session is
created once and run twice before timing, so arena growth and lazy kernel selection stay out
of the numbers. Input names and shapes come from the session, as the worker reads them.
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


def make_session(
    path: Path, *, threads: int = 0, providers: Optional[Sequence[str]] = None
) -> ort.InferenceSession:
    """A session as a benchmark wants it: full graph optimisation, ``threads`` intra-op
    threads (0: onnxruntime's choice), sequential execution."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(
        str(path), opts, providers=list(providers or ["CPUExecutionProvider"])
    )


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


def _input_shape(session: ort.InferenceSession, name: str, **dims: int) -> list[int]:
    """The declared shape of input ``name``, symbolic axes filled from ``dims`` (else 1)."""
    meta = next(i for i in session.get_inputs() if i.name == name)
    return [d if isinstance(d, int) else dims.get(str(d), 1) for d in meta.shape]


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

    Returns ``{"models": {name: {median_ms, min_ms, p95_ms, runs, input, session_s}}, ...}``
    with the settings and machine alongside.
    """
    models_dir = Path(models_dir)
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, Any]] = {}

    def run(name: str, session: ort.InferenceSession, feeds: dict[str, np.ndarray], shown: str,
            session_s: float) -> list[np.ndarray]:
        results[name] = {
            **time_calls(lambda: session.run(None, feeds), repeats=repeats),
            "input": shown, "session_s": session_s,
        }
        return session.run(None, feeds)

    encoder_path = models_dir / "sam2" / "encoder.onnx"
    decoder_path = models_dir / "sam2" / "decoder.onnx"
    if encoder_path.exists() and decoder_path.exists():
        start = time.perf_counter()
        encoder = make_session(encoder_path, threads=threads, providers=providers)
        encoder_s = time.perf_counter() - start
        image = rng.standard_normal((1, 3, SAM2_SIDE, SAM2_SIDE), dtype=np.float32)
        (image_input,) = encoder.get_inputs()
        features = run("sam2 encoder", encoder, {image_input.name: image},
                       "1x3x%dx%d" % (SAM2_SIDE, SAM2_SIDE), encoder_s)
        start = time.perf_counter()
        decoder = make_session(decoder_path, threads=threads, providers=providers)
        decoder_s = time.perf_counter() - start
        feeds = {o.name: f for o, f in zip(encoder.get_outputs(), features)}
        feeds.update(
            point_coords=np.array([[[SAM2_SIDE / 2, SAM2_SIDE / 2]]], np.float32),
            point_labels=np.ones((1, 1), np.float32),
            mask_input=np.zeros(_input_shape(decoder, "mask_input"), np.float32),
            has_mask_input=np.zeros(_input_shape(decoder, "has_mask_input"), np.float32),
        )
        run("sam2 decoder", decoder, feeds, "1 point", decoder_s)

    detr_path = models_dir / "detr" / "onnx" / "model.onnx"
    if detr_path.exists():
        start = time.perf_counter()
        detr = make_session(detr_path, threads=threads, providers=providers)
        detr_s = time.perf_counter() - start
        height, width = DETR_SIZE
        feeds = {
            "pixel_values": rng.standard_normal((1, 3, height, width), dtype=np.float32),
            "pixel_mask": np.ones(_input_shape(detr, "pixel_mask"), np.int64),
        }
        run("detr", detr, feeds, f"1x3x{height}x{width}", detr_s)

    return {
        "models": results,
        "threads": threads,
        "providers": list(providers or ["CPUExecutionProvider"]),
        "onnxruntime": ort.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a small text table, one model a row."""
    threads = report["threads"] or "default"
    lines = [
        f"onnxruntime {report['onnxruntime']} {'/'.join(report['providers'])}, "
        f"{threads} threads, {report['cpu']} ({report['cpu_count']} cores)",
        f"{'model':<14}{'input':<18}{'median ms':>11}{'min ms':>10}{'p95 ms':>10}{'runs':>6}"
        f"{'session s':>11}",
    ]
    for name, r in report["models"].items():
        lines.append(
            f"{name:<14}{r['input']:<18}{r['median_ms']:>11.1f}{r['min_ms']:>10.1f}"
            f"{r['p95_ms']:>10.1f}{r['runs']:>6}{r['session_s']:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True,
                        help="directory with sam2/ and detr/ as `bench.export_models` writes them")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0: onnxruntime's choice")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per model")
    parser.add_argument("--provider", action="append", dest="providers",
                        help="execution provider, repeatable (default CPUExecutionProvider)")
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
