"""In-process pipeline time against the bare model calls it wraps, side by side in one run.

Each round runs, for every photo size, the raw SAM 2 encoder and decoder, then the
``segment`` pipeline (cold cache), a second prompt on the same image (cache hit),
``cutout``, the raw DETR call at the size the pipeline feeds it, ``panoptic`` and
``overlay``. The raw calls sit beside the jobs they are compared with, so a noisy
neighbour slows both, and ratios are medians of per-round ratios.
"""

from __future__ import annotations

import io
import statistics
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from config.settings import Settings
from worker.inference.detr import model_input_size
from worker.inference.sam2 import DECODER_OUTPUTS, EMBEDDING_NAMES, ENCODER_INPUT
from worker.inference.sessions import create_session, input_shape
from worker.pipelines import JobOutput, Pipelines

PHOTO_SIZES: dict[str, tuple[int, int]] = {
    "0.3 MP": (640, 480),
    "3 MP": (2000, 1500),
    "12 MP": (4000, 3000),
}
JOBS = ("segment", "panoptic", "cutout", "overlay")
# Which bare model calls each job wraps: its ratio's denominator.
RAW_OF_JOB = {"segment": "sam2", "cutout": "sam2", "panoptic": "detr", "overlay": "detr"}
STAGES = ("decode", "encode_image", "decode_prompt", "model", "compose", "encode_output")
GRAIN_SIGMA = 5.0  # levels of 255: the sensor noise that makes a camera JPEG costly to decode


@lru_cache(maxsize=8)
def photo_jpeg(width: int, height: int, *, seed: int = 0) -> bytes:
    """A camera-like JPEG of ``width`` x ``height``: the sample photo cropped to the aspect
    ratio, resized, with Gaussian grain, quality 90 (4:2:0). A smooth or flat synthetic
    image would make decoding and PNG encoding unrealistically cheap."""
    src = Image.open(
        io.BytesIO(resources.files("api_client").joinpath("assets/sample.jpg").read_bytes())
    )
    src = src.convert("RGB")
    scale = min(src.width / width, src.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (src.width - crop_w) // 2, (src.height - crop_h) // 2
    img = src.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.LANCZOS)
    grain = np.random.default_rng(seed).normal(0.0, GRAIN_SIGMA, (height, width, 3))
    pixels = np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


class RawCalls:
    """The bare model calls of the pipelines, on their own sessions and bound the way
    ``Sam2Model`` binds them (embeddings stay on the encoder's device): the encoder on one
    1024x1024 image, the decoder on one point, DETR at a given input size. Nothing around
    them: no decode, resize or post-processing. Inputs as in ``bench.raw_models``."""

    def __init__(self, pipes: Pipelines, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self.sam2 = pipes.sam2()
        self._image = self._rng.standard_normal(
            (1, 3, self.sam2.input_height, self.sam2.input_width), dtype=np.float32
        )
        self._features = self.encode()
        decoder = self.sam2.decoder
        self._prompt = {
            "point_coords": np.array(
                [[[self.sam2.input_width / 2, self.sam2.input_height / 2]]], np.float32
            ),
            "point_labels": np.ones((1, 1), np.float32),
            "mask_input": np.zeros(
                input_shape(decoder, "mask_input", (1, 1, 256, 256)), np.float32
            ),
            "has_mask_input": np.zeros(input_shape(decoder, "has_mask_input", (1,)), np.float32),
        }
        # the file whole, as it is published: the pipeline's cut (worker/inference/maskhead.py)
        # is part of what is measured against it
        self.detr_session = create_session(Path(pipes.detr().name), pipes.settings)
        self._detr_feeds: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def encode(self) -> list:
        binding = self.sam2.encoder.io_binding()
        binding.bind_cpu_input(ENCODER_INPUT, self._image)
        for name in EMBEDDING_NAMES:
            binding.bind_output(name, self.sam2.device)
        self.sam2.encoder.run_with_iobinding(binding)
        return binding.get_outputs()

    def decode(self) -> None:
        binding = self.sam2.decoder.io_binding()
        for name, value in zip(EMBEDDING_NAMES, self._features):
            binding.bind_ortvalue_input(name, value)
        for name, array in self._prompt.items():
            binding.bind_cpu_input(name, array)
        for name in DECODER_OUTPUTS:
            binding.bind_output(name, "cpu")
        self.sam2.decoder.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()

    def detr(self, width: int, height: int) -> None:
        feeds = self._detr_feeds.get((width, height))
        if feeds is None:
            feeds = self._detr_feeds[(width, height)] = {
                "pixel_values": self._rng.standard_normal((1, 3, height, width), dtype=np.float32),
                "pixel_mask": np.ones(
                    input_shape(self.detr_session, "pixel_mask", (1, height, width)), np.int64
                ),
            }
            self.detr_session.run(None, feeds)  # first call at a new size: kernel selection
        self.detr_session.run(["logits", "pred_masks"], feeds)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_pipelines(
    settings: Settings,
    *,
    rounds: int = 5,
    sizes: dict[str, tuple[int, int]] = PHOTO_SIZES,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Pipeline and raw-model times per job type and photo size, interleaved per round.

    Returns ``{"sizes": {label: {"image": {...}, "raw_ms": {...}, "jobs": {job: {total_ms,
    stages_ms, ratio_to_raw}}, "reprompt": {cold_ms, cached_ms, speedup}}}}``: medians
    over rounds, ratios as the median of per-round ratios."""
    pipes = Pipelines(settings)
    pipes.warm_up(["sam2", "detr"])
    raw = RawCalls(pipes)
    photos = {label: photo_jpeg(*size) for label, size in sizes.items()}
    samples: dict[str, dict[str, list]] = {label: {} for label in sizes}

    def record(label: str, name: str, value: Any) -> None:
        samples[label].setdefault(name, []).append(value)

    for r in range(rounds + 1):  # round 0 warms every size and job up and is not kept
        for label, (width, height) in sizes.items():
            data, keep = photos[label], r > 0
            detr_size = model_input_size(width, height)
            pipes.cache.clear()
            enc, _ = timed(raw.encode)
            dec, _ = timed(raw.decode)
            seg_s, seg = timed(lambda: pipes.segment(data, {"point": [width * 0.4, height * 0.45]}))
            hit_s, hit = timed(lambda: pipes.segment(data, {"point": [width * 0.6, height * 0.55]}))
            assert (seg.result["embedding_cache"], hit.result["embedding_cache"]) == ("miss", "hit")
            pipes.cache.clear()
            cut_s, cut = timed(lambda: pipes.cutout(data, {"point": [width * 0.5, height * 0.5]}))
            detr_raw, _ = timed(lambda: raw.detr(*detr_size))
            pan_s, pan = timed(lambda: pipes.panoptic(data))
            ovl_s, ovl = timed(lambda: pipes.overlay(data))
            if not keep:
                continue
            record(label, "raw:sam2", enc + dec)
            record(label, "raw:encoder", enc)
            record(label, "raw:decoder", dec)
            record(label, "raw:detr", detr_raw)
            record(label, "reprompt:cold", seg_s)
            record(label, "reprompt:cached", hit_s)
            for job, seconds, out in (
                ("segment", seg_s, seg),
                ("cutout", cut_s, cut),
                ("panoptic", pan_s, pan),
                ("overlay", ovl_s, ovl),
            ):
                record(
                    label, job, (seconds, out, enc + dec if RAW_OF_JOB[job] == "sam2" else detr_raw)
                )
            log(
                f"  round {r}/{rounds} {label}: segment {seg_s * 1000:.0f} ms "
                f"(raw {(enc + dec) * 1000:.0f}), "
                f"panoptic {pan_s * 1000:.0f} ms (raw {detr_raw * 1000:.0f}), cached re-prompt "
                f"{hit_s * 1000:.0f} ms"
            )

    return {
        "rounds": rounds,
        "sizes": {
            label: _summarise(samples[label], photos[label], sizes[label]) for label in sizes
        },
    }


def _summarise(s: dict[str, list], photo: bytes, size: tuple[int, int]) -> dict[str, Any]:
    ms = lambda values: 1000.0 * statistics.median(values)  # noqa: E731
    jobs = {}
    for job in JOBS:
        runs: list[tuple[float, JobOutput, float]] = s[job]
        stages = {
            stage: ms([out.timings.get(stage, 0.0) for _, out, _ in runs])
            for stage in STAGES
            if any(stage in out.timings for _, out, _ in runs)
        }
        jobs[job] = {
            "total_ms": ms([t for t, _, _ in runs]),
            "stages_ms": stages,
            "raw": RAW_OF_JOB[job],
            "ratio_to_raw": statistics.median([t / base for t, _, base in runs]),
        }
    cold, cached = s["reprompt:cold"], s["reprompt:cached"]
    width, height = size
    return {
        "image": {
            "width": width,
            "height": height,
            "jpeg_bytes": len(photo),
            "detr_input": list(model_input_size(width, height)),
        },
        "raw_ms": {name.split(":")[1]: ms(v) for name, v in s.items() if name.startswith("raw:")},
        "jobs": jobs,
        "reprompt": {
            "cold_ms": ms(cold),
            "cached_ms": ms(cached),
            "speedup": statistics.median([c / h for c, h in zip(cold, cached)]),
        },
    }
