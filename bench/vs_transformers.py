"""segq's in-process pipelines against transformers' PyTorch pipelines on the same weights.

transformers runs in a child process under an interpreter that has torch and transformers
(``--python``, default ``$SEGQ_TORCH_PYTHON`` or this interpreter), started once with its
models loaded. The two sides
take turns, one call each, on the same JPEG bytes and prompt, so both see the same machine
load and never run at the same time:

- SAM 2: ``Sam2Processor`` + ``Sam2Model`` (transformers' default attention) from JPEG bytes
  to the best mask at full size, against ``Pipelines.segment`` (which also writes the PNG);
- DETR: ``DetrImageProcessor`` + ``DetrForSegmentation`` + ``post_process_panoptic_segmentation``
  (COCO stuff classes fused) against ``Pipelines.panoptic``.

The child answers each request with its time and its mask or segment map, and the masks
are compared, so the numbers are of the same computation.

    python -m bench.vs_transformers --models /tmp/segq-models [--python PY] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TORCH_PYTHON = Path(os.environ.get("SEGQ_TORCH_PYTHON") or sys.executable)


class TransformersSide:
    """The child process holding transformers' models; ``call`` runs one request."""

    def __init__(
        self, models: Path, *, python: Path = TORCH_PYTHON, threads: int, detr: bool
    ) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": str(threads),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
        self.proc = subprocess.Popen(
            [str(python), "-m", "bench.vs_transformers", "--serve", "--models", str(models),
             "--threads", str(threads), *(["--with-detr"] if detr else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
        )  # fmt: skip
        self.ready = self._reply()

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"transformers side exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(60)


def bench_vs_transformers(
    settings: Any,
    photo: bytes,
    *,
    rounds: int = 3,
    detr: bool = True,
    python: Path = TORCH_PYTHON,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Medians of ``rounds`` alternating calls per model, their ratio (transformers / segq)
    and how far the two answers are apart. DETR gets one timed call per side: transformers
    5's mask head takes tens of seconds per image on 2 cores."""
    from PIL import Image

    from worker.imaging import masks as maskio
    from worker.inference.labels import COCO_STUFF
    from worker.pipelines import Pipelines

    probe = subprocess.run([str(python), "-c", "import torch, transformers"], capture_output=True)
    if probe.returncode != 0:
        return {
            "skipped": f"{python} cannot import torch and transformers; name one that can "
            "with --torch-python or SEGQ_TORCH_PYTHON (pip install -e '.[export]')"
        }
    models = Path(settings.sam2_dir).parent
    threads = settings.intra_op_threads or os.cpu_count() or 1
    pipes = Pipelines(settings)
    pipes.warm_up(["sam2", "detr"] if detr else ["sam2"])
    width, height = Image.open(io.BytesIO(photo)).size
    point = [width * 0.4, height * 0.45]
    report: dict[str, Any] = {"image": [width, height], "torch_threads": threads}
    with tempfile.TemporaryDirectory(prefix="segq-vs-") as tmp:
        image_path = Path(tmp) / "photo.jpg"
        image_path.write_bytes(photo)
        side = TransformersSide(models, python=python, threads=threads, detr=detr)
        try:
            report["versions"] = side.ready
            theirs, ours = [], []
            for r in range(rounds + 1):  # round 0 warms both up
                pipes.cache.clear()
                start = time.perf_counter()
                out = pipes.segment(photo, {"point": point}, mask_formats=["png"])
                segq_s = time.perf_counter() - start
                reply = side.call(
                    {
                        "model": "sam2",
                        "image": str(image_path),
                        "point": point,
                        "out": f"{tmp}/sam2.npy",
                    }
                )
                if r:
                    ours.append(segq_s)
                    theirs.append(reply["seconds"])
                    log(
                        f"  SAM 2 round {r}/{rounds}: segq {segq_s * 1000:.0f} ms, "
                        f"transformers {reply['seconds'] * 1000:.0f} ms"
                    )
            mask = maskio.mask_from_png(out.files["mask_0.png"][0])
            report["sam2"] = _compare(
                ours,
                theirs,
                differing=int((mask != np.load(f"{tmp}/sam2.npy")).sum()),
                pixels=mask.size,
            )
            if detr:
                request = {
                    "model": "detr",
                    "image": str(image_path),
                    "fuse": sorted(COCO_STUFF),
                    "out": f"{tmp}/detr.npy",
                }
                side.call(request)  # warm-up, as segq's models were warmed up
                start = time.perf_counter()
                out = pipes.panoptic(photo, mask_formats=["png"])
                segq_s = time.perf_counter() - start
                reply = side.call(request)
                log(f"  DETR: segq {segq_s * 1000:.0f} ms, transformers {reply['seconds']:.1f} s")
                ours_map = maskio.label_map_from_png(out.files["segments.png"][0])
                theirs_map = np.load(f"{tmp}/detr.npy")
                report["detr"] = {
                    **_compare(
                        [segq_s],
                        [reply["seconds"]],
                        differing=_label_map_difference(ours_map, theirs_map),
                        pixels=ours_map.size,
                    ),
                    "segments": [len(out.result["segments"]), reply["segments"]],
                    "note": "one timed call per side, after one warm-up: transformers 5 runs the "
                    "mask head's FPN adapters once per query (100x their cost)",
                }
        finally:
            side.close()
    return report


def _compare(
    ours: Sequence[float], theirs: Sequence[float], *, differing: int, pixels: int
) -> dict[str, Any]:
    return {
        "segq_ms": 1000 * statistics.median(ours),
        "transformers_ms": 1000 * statistics.median(theirs),
        "speedup": statistics.median([t / o for t, o in zip(theirs, ours)]),
        "runs": len(ours),
        "pixels_differing": differing,
        "pixels": pixels,
    }


def _label_map_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels assigned differently, whatever ids the two sides gave their segments."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    match = {}
    for x, y in pairs.T:  # each segment of ``a`` to the segment of ``b`` it overlaps most
        overlap = np.count_nonzero((a == x) & (b == y))
        if overlap > match.get(x, (None, -1))[1]:
            match[x] = (y, overlap)
    mapped = np.vectorize(lambda v: match[v][0])(a) if match else a
    return int(np.count_nonzero(mapped != b))


# --- the child: transformers ------------------------------------------------------------


def _torchvision_without_native_ops(torch: Any) -> None:
    """transformers' SAM 2 image processor imports torchvision, and a torchvision wheel
    built for CUDA beside a CPU torch fails on import: its fake-kernel registrations need
    the ``nms``/``qnms`` schemas its native library would declare. Declare them when that
    library cannot load; the processors use only pure-torch resizing."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    folder = Path(spec.origin).parent
    for native in folder.glob("_C*.so"):
        try:
            torch.ops.load_library(str(native))
            return
        except (OSError, RuntimeError):
            pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_without_native_ops.library = library  # type: ignore[attr-defined]  # kept alive


def serve(models: Path, threads: int, with_detr: bool) -> None:
    """Answer requests on stdin, one JSON line each, with one JSON line on stdout."""
    import torch

    _torchvision_without_native_ops(torch)
    import transformers
    from PIL import Image
    from transformers import (
        DetrForSegmentation,
        DetrImageProcessorPil,
        Sam2ImageProcessor,
        Sam2Model,
        Sam2Processor,
    )

    torch.set_num_threads(threads)
    sam2_processor = Sam2Processor(image_processor=Sam2ImageProcessor())
    sam2 = Sam2Model.from_pretrained(models / "sam2" / "hf").eval()
    if with_detr:
        detr_processor = DetrImageProcessorPil(format="coco_panoptic")
        detr = DetrForSegmentation.from_pretrained(models / "detr" / "hf").eval()
    print(
        json.dumps({"torch": torch.__version__, "transformers": transformers.__version__}),
        flush=True,
    )

    @torch.inference_mode()
    def run_sam2(request: dict[str, Any]) -> dict[str, Any]:
        image = Image.open(request["image"]).convert("RGB")
        inputs = sam2_processor(
            images=image,
            input_points=[[[request["point"]]]],
            input_labels=[[[1]]],
            return_tensors="pt",
        )
        out = sam2(**inputs, multimask_output=True)
        masks = sam2_processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0]
        best = masks[0, int(out.iou_scores[0, 0].argmax())]
        np.save(request["out"], best.numpy())
        return {"area": int(best.sum())}

    @torch.inference_mode()
    def run_detr(request: dict[str, Any]) -> dict[str, Any]:
        image = Image.open(request["image"]).convert("RGB")
        inputs = detr_processor(images=image, return_tensors="pt")
        out = detr(**inputs)
        result = detr_processor.post_process_panoptic_segmentation(
            out, target_sizes=[image.size[::-1]], label_ids_to_fuse=set(request["fuse"])
        )[0]
        np.save(request["out"], result["segmentation"].numpy().astype(np.int32))
        return {"segments": len(result["segments_info"])}

    runners = {"sam2": run_sam2, "detr": run_detr}
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        answer = runners[request["model"]](request)
        print(json.dumps({"seconds": time.perf_counter() - start, **answer}), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument(
        "--python",
        type=Path,
        default=TORCH_PYTHON,
        help="an interpreter with torch and transformers",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-detr", action="store_true", help="SAM 2 only (DETR takes minutes)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--with-detr", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.models, args.threads or os.cpu_count() or 1, args.with_detr)
        return 0
    from bench.pipeline import photo_jpeg
    from config.settings import Settings

    settings = Settings(
        sam2_dir=args.models / "sam2",
        detr_dir=args.models / "detr",
        providers=["CPUExecutionProvider"],
        intra_op_threads=args.threads,
    )
    report = bench_vs_transformers(
        settings,
        photo_jpeg(640, 480),
        rounds=args.rounds,
        detr=not args.no_detr,
        python=args.python,
        log=print,
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
