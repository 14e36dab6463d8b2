"""The four job types as plain Python: image bytes plus a prompt in, files and a result out.

No Celery, no S3, no Redis here: the tasks are thin shells around ``Pipelines``, and tests
and benchmarks call it directly::

    from config import Settings
    from worker.pipelines import Pipelines

    pipes = Pipelines(Settings())
    out = pipes.segment(open("photo.jpg", "rb").read(), {"point": [320, 240]}, multimask=True)
    out.result["masks"][0]["score"], out.files["mask_0.png"]

Each call returns a ``JobOutput``: the files to store (name -> bytes and content type),
the JSON result that goes into the job status and manifest, and per-stage timings.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Optional, Protocol, Union

import numpy as np
from PIL import Image

from config.contract import (
    CutoutOptions,
    OverlayOptions,
    PanopticOptions,
    Prompt,
    SegmentOptions,
    parse_options,
    parse_prompt,
)
from config.errors import InvalidPayload, InvalidPrompt, RefineUnavailable
from config.settings import Settings
from worker.imaging import accel, compose, encode
from worker.imaging import masks as maskio
from worker.imaging.decode import DecodedImage, load_image, read_size
from worker.inference.cache import EmbeddingCache
from worker.inference.detr import DetrPanopticModel, model_input_size
from worker.inference.registry import ModelRegistry
from worker.inference.sam2 import Sam2Model, Sam2Prediction

ImageInput = Union[bytes, DecodedImage]


class EncodeGuard(Protocol):
    """What a worker wraps around SAM 2 encodes (``worker.affinity``): ``encoding(entry)``
    is the context of a cold encode of cache entry ``entry``, ``held(entry)`` notes a hit."""

    def encoding(self, entry: str) -> ContextManager[None]: ...

    def held(self, entry: str) -> None: ...
PromptInput = Union[Prompt, dict, None]


@dataclass
class JobOutput:
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class Timer:
    """Collects wall time per named stage (seconds), summing repeated stages. A stage
    entered inside another counts for itself, not for the outer one, so the stages add
    up to the job's time (a decode that happens only on an embedding-cache miss runs
    inside ``encode_image``)."""

    def __init__(self, into: dict[str, float]) -> None:
        self.timings = into
        self._inner = [0.0]  # per open stage: time spent in stages nested in it

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            own = elapsed - self._inner.pop()
            self._inner[-1] += elapsed
            self.timings[name] = self.timings.get(name, 0.0) + own


PNG = "image/png"


def _mask_entry(mask: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"area": maskio.area(mask), "bbox": maskio.bbox(mask), **extra}


class Pipelines:
    """The four job types over one model registry and one embedding cache.

    Thread-safe: sessions are shared (onnxruntime's ``run`` is thread-safe) and the
    cache locks itself. ``models`` defaults to a registry of its own for ``settings``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        models: Optional[ModelRegistry] = None,
        cache: Optional[EmbeddingCache] = None,
    ) -> None:
        self.settings = settings
        self.models = models if models is not None else ModelRegistry(settings)
        self.cache = cache if cache is not None else EmbeddingCache(settings.embedding_cache_bytes)
        # zlib releases the GIL, so a job's PNGs compress here while it does its RLE and
        # area work (bench/README.md, "PNG", has the figures)
        self._png = ThreadPoolExecutor(max_workers=2, thread_name_prefix="segq-png")

    # --- models ---------------------------------------------------------------------

    def sam2(self, options: Optional[SegmentOptions | OverlayOptions] = None) -> Sam2Model:
        """SAM 2 as the job's options name it (the configured one by default)."""
        o = options
        return self.models.sam2(
            repo=getattr(o, "repo", None),
            encoder_file=getattr(o, "encoder_file", None),
            decoder_file=getattr(o, "decoder_file", None),
            revision=getattr(o, "revision", None),
        )

    def detr(self, options: Optional[PanopticOptions] = None) -> DetrPanopticModel:
        """DETR as the job's options name it (the configured one by default)."""
        o = options
        return self.models.detr(
            repo=getattr(o, "repo", None),
            model_file=getattr(o, "model_file", None),
            revision=getattr(o, "revision", None),
        )

    def warm_up(self, models: list[str]) -> dict[str, str]:
        """Load the named models ("sam2", "detr") and run each once on a small image,
        so the first job pays no session-creation or arena-growth cost. Returns the
        execution provider each model runs on."""
        probe = Image.new("RGB", (64, 48), (90, 120, 150))
        providers: dict[str, str] = {}
        if "sam2" in models:
            model = self.sam2()
            self._probe_embedding = model.encode(probe)
            self.probe_decoder()
            providers["sam2"] = model.provider
            accel.warm_imaging_kernels()  # a SAM-only worker's cutouts (DETR's load warms too)
        if "detr" in models:
            model = self.detr()
            model.predict(probe)
            providers["detr"] = model.provider
        return providers

    def probe_decoder(self) -> None:
        """One SAM 2 decoder run on the warm-up embedding: proves the session still works."""
        self.sam2().predict(self._probe_embedding, None, multimask=False, min_score=None)

    # --- shared steps ------------------------------------------------------------------

    def decode(
        self, data: ImageInput, timer: Timer, *, model_side: Optional[int] = None
    ) -> DecodedImage:
        """The job's image. ``model_side``: only a model will see the pixels, resized so
        that no side needs more than this; with ``settings.fast_jpeg_decode`` a large JPEG
        is then decoded at reduced scale (see ``load_image``'s ``reduce_to``)."""
        if isinstance(data, DecodedImage):
            return data
        with timer.stage("decode"):
            return load_image(
                data,
                max_pixels=self.settings.max_image_pixels,
                max_bytes=self.settings.max_image_bytes,
                min_side=self.settings.min_image_side,
                reduce_to=model_side if self.settings.fast_jpeg_decode else None,
            )

    def size(self, data: ImageInput, timer: Timer) -> tuple[int, int]:
        """The image's displayed (width, height), from its header alone."""
        if isinstance(data, DecodedImage):
            return data.size
        with timer.stage("decode"):
            return read_size(
                data,
                max_pixels=self.settings.max_image_pixels,
                max_bytes=self.settings.max_image_bytes,
                min_side=self.settings.min_image_side,
            )

    def sam2_masks(
        self,
        size: tuple[int, int],
        pixels: Callable[[], Image.Image],
        prompt: PromptInput,
        options: SegmentOptions | OverlayOptions,
        out: JobOutput,
        *,
        image_id: Optional[str] = None,
        job_id: Optional[str] = None,
        guard: Optional[EncodeGuard] = None,
    ) -> list:
        """SAM 2's masks for ``prompt`` on the image of ``size``; ``pixels`` is called for
        the image only when its embedding is not cached under ``image_id``."""
        return self.sam2_predictions(
            size, pixels, [prompt], options, out, image_id=image_id, job_id=job_id, guard=guard
        )[0].masks

    def sam2_predictions(
        self,
        size: tuple[int, int],
        pixels: Callable[[], Image.Image],
        prompts: list[PromptInput],
        options: SegmentOptions | OverlayOptions,
        out: JobOutput,
        *,
        image_id: Optional[str] = None,
        job_id: Optional[str] = None,
        guard: Optional[EncodeGuard] = None,
    ) -> list[Sam2Prediction]:
        """One ``Sam2Prediction`` per prompt, from one batched decoder call (per prompt
        shape). A prompt with ``refine`` feeds that earlier job's best low-resolution logits
        to the decoder (``refine_unavailable`` when this process no longer holds them).
        With ``job_id``, each prompt's best logits are kept for later refinement, under
        ``"<job id>:<prompt index>"`` beside the embedding. ``guard``: the worker's encode
        lease and affinity claims (``EncodeGuard``)."""
        timer = Timer(out.timings)
        parsed = [parse_prompt(p, max_points=self.settings.max_points) for p in prompts]
        for p in parsed:
            if p is not None:
                p.check_bounds(*size)  # before the encoder: a bad prompt costs nothing
        model = self.sam2(options)
        encoded: list[bool] = []

        def image() -> Image.Image:
            encoded.append(True)
            return pixels()

        key = image_id or _digest(pixels())
        entry = model.cache_key(key)
        mask_inputs = [self._refined_logits(p, entry) for p in parsed]
        with timer.stage("encode_image"):
            embedding = model.embed_cached(
                image, key, self.cache, size, guard=guard.encoding if guard is not None else None
            )
        out.result["embedding_cache"] = "miss" if encoded else "hit"
        if guard is not None and not encoded:
            guard.held(entry)
        if any(m is not None for m in mask_inputs):
            out.result["refined"] = [p.refine for p in parsed if p is not None and p.refine]
        with timer.stage("decode_prompt"):
            found = model.predict_many(
                embedding,
                parsed,
                multimask=options.multimask,
                min_score=getattr(options, "min_score", None),
                mask_inputs=mask_inputs,
            )
        if job_id is not None:
            for i, prediction in enumerate(found):
                self.cache.put(_refine_key(job_id, i), _RefineEntry(entry, prediction.best_logits))
        return found

    def _refined_logits(self, prompt: Optional[Prompt], image_entry: str) -> Optional[np.ndarray]:
        ref = prompt.refine_key if prompt is not None else None
        if ref is None:
            return None
        job, index = ref
        kept = self.cache.peek(_refine_key(job, index))
        if kept is None:
            raise RefineUnavailable(
                f"the mask of job {prompt.refine} is not held here (evicted, expired, made "
                "on another worker, or no such job); send the clicks again without 'refine'",
                refine=prompt.refine,
            )
        if kept.image_entry != image_entry:
            raise InvalidPrompt(f"'refine' names job {prompt.refine}, made on another image or model")
        return kept.logits

    # --- job types --------------------------------------------------------------------

    def segment(
        self,
        data: ImageInput,
        prompt: PromptInput = None,
        *,
        options: Optional[SegmentOptions] = None,
        image_id: Optional[str] = None,
        prompts: Optional[list[PromptInput]] = None,
        job_id: Optional[str] = None,
        guard: Optional[EncodeGuard] = None,
        **kwargs: Any,
    ) -> JobOutput:
        """The masks of ``prompt``, or with ``prompts`` one mask set per prompt from one
        batched decoder call (``result["prompts"][i]["masks"]``, files
        ``prompt_<i>_mask_<j>.png``). ``job_id`` keeps each prompt's best logits for a
        later ``refine``; ``guard``: see ``EncodeGuard``."""
        options = _options("segment", options, kwargs)
        if prompts is not None and prompt is not None:
            raise InvalidPrompt("give either 'prompt' or 'prompts', not both")
        out = JobOutput()
        timer = Timer(out.timings)
        width, height = self.size(data, timer)  # a cached embedding needs no pixels
        side = self.sam2(options).input_side
        decoded: list[DecodedImage] = []

        def pixels() -> Image.Image:
            decoded.append(self.decode(data, timer, model_side=side))
            return decoded[0].rgb

        found = self.sam2_predictions(
            (width, height),
            pixels,
            list(prompts) if prompts is not None else [prompt],
            options,
            out,
            image_id=image_id or _bytes_id(data),
            job_id=job_id,
            guard=guard,
        )
        with timer.stage("encode_output"):
            pngs = {}
            sets = []
            for p, prediction in enumerate(found):
                entries = []
                for i, m in enumerate(prediction.masks):
                    name = f"mask_{i}" if prompts is None else f"prompt_{p}_mask_{i}"
                    entry = _mask_entry(m.mask, score=float(m.score))
                    if "png" in options.mask_formats:
                        pngs[f"{name}.png"] = self._png.submit(maskio.mask_to_png, m.mask)
                        entry["png"] = f"{name}.png"
                    if "rle" in options.mask_formats:
                        entry["rle"] = maskio.rle_encode(m.mask)
                    entries.append(entry)
                sets.append(entries)
            out.files.update((name, (png.result(), PNG)) for name, png in pngs.items())
        if prompts is None:
            out.result.update(width=width, height=height, masks=sets[0])
        else:
            out.result.update(
                width=width, height=height,
                prompts=[{"index": i, "masks": entries} for i, entries in enumerate(sets)],
            )  # fmt: skip
        if decoded:
            out.result.update(decoded[0].describe_frames())
        return out

    def panoptic(
        self,
        data: ImageInput,
        *,
        options: Optional[PanopticOptions] = None,
        **kwargs: Any,
    ) -> JobOutput:
        options = _options("panoptic", options, kwargs)
        out = JobOutput()
        timer = Timer(out.timings)
        detr_side = max(model_input_size(*self.size(data, timer)))
        image = self.decode(data, timer, model_side=detr_side)
        panoptic = self._panoptic(image, options, timer)
        with timer.stage("encode_output"):
            png = None
            if "png" in options.mask_formats:
                png = self._png.submit(maskio.label_map_to_png, panoptic.segmentation)
            rles = {}
            if "rle" in options.mask_formats:  # every segment from one pass over the map
                ids = [seg.id for seg in panoptic.segments]
                rles = maskio.rle_encode_labels(panoptic.segmentation, ids)
            segments = []
            for seg in panoptic.segments:
                entry = {
                    "id": seg.id,
                    "label": seg.label,
                    "label_id": seg.label_id,
                    "isthing": seg.isthing,
                    "score": float(seg.score),
                    "area": int(seg.area),
                    "bbox": seg.bbox,
                }
                if "rle" in options.mask_formats:
                    entry["rle"] = rles[seg.id]
                segments.append(entry)
            if png is not None:
                out.files["segments.png"] = (png.result(), PNG)
        out.result = {"width": image.width, "height": image.height, "segments": segments}
        out.result.update(image.describe_frames())
        if "png" in options.mask_formats:
            out.result["segmentation"] = "segments.png"
        return out

    def _panoptic(self, image: DecodedImage, options: PanopticOptions, timer: Timer):
        model = self.detr(options)
        with timer.stage("model"):
            return model.predict(
                image.rgb,
                threshold=options.threshold,
                mask_threshold=options.mask_threshold,
                overlap_threshold=options.overlap_threshold,
                min_score=options.min_score,
                size=image.size,
            )

    def cutout(
        self,
        data: ImageInput,
        prompt: PromptInput = None,
        *,
        options: Optional[CutoutOptions] = None,
        image_id: Optional[str] = None,
        job_id: Optional[str] = None,
        guard: Optional[EncodeGuard] = None,
        **kwargs: Any,
    ) -> JobOutput:
        options = _options("cutout", options, kwargs)
        if options.multimask:
            raise InvalidPayload("cutout uses one mask; multimask is not available for it")
        out = JobOutput()
        timer = Timer(out.timings)
        image = self.decode(data, timer)
        out.result.update(image.describe_frames())
        best = self.sam2_masks(
            image.size, lambda: image.rgb, prompt, options, out,
            image_id=image_id or _bytes_id(data), job_id=job_id, guard=guard,
        )
        if not best:
            out.result.update(width=image.width, height=image.height, cutout=None,
                              reason="no mask scored above min_score")
            return out
        mask = best[0]
        with timer.stage("encode_output"):  # composed a strip at a time inside the PNG writer
            mask_png = self._png.submit(maskio.mask_to_png, mask.mask)
            cutout_png, cutout_size = compose.cutout_png(image, mask.mask, crop=options.crop)
            out.files["cutout.png"] = (cutout_png, PNG)
            out.files["mask.png"] = (mask_png.result(), PNG)
        out.result.update(
            width=image.width,
            height=image.height,
            cutout="cutout.png",
            cutout_size=list(cutout_size),
            mask=_mask_entry(mask.mask, score=float(mask.score), png="mask.png"),
        )
        return out

    def overlay(
        self,
        data: ImageInput,
        prompt: PromptInput = None,
        *,
        options: Optional[OverlayOptions] = None,
        masks: Optional[list[np.ndarray]] = None,
        image_id: Optional[str] = None,
        prompts: Optional[list[PromptInput]] = None,
        job_id: Optional[str] = None,
        guard: Optional[EncodeGuard] = None,
        **kwargs: Any,
    ) -> JobOutput:
        """Colour-coded segments over the image: panoptic segments by default, the SAM
        masks of ``prompt`` when one is given (the best mask of each of ``prompts``, from
        one batched decoder call), or caller-supplied ``masks``."""
        options = _options("overlay", options, kwargs)
        if prompts is not None and prompt is not None:
            raise InvalidPrompt("give either 'prompt' or 'prompts', not both")
        out = JobOutput()
        timer = Timer(out.timings)
        image = self.decode(data, timer)
        legend: list[dict[str, Any]] = []
        if masks is not None:
            layers = list(masks)
            legend = [_mask_entry(m, index=i) for i, m in enumerate(layers)]
        elif prompts is not None:
            predictions = self.sam2_predictions(
                image.size, lambda: image.rgb, list(prompts), options, out,
                image_id=image_id or _bytes_id(data), job_id=job_id, guard=guard,
            )
            found = [p.masks[0] for p in predictions if p.masks]
            layers = [m.mask for m in found]
            legend = [
                _mask_entry(p.masks[0].mask, index=i, prompt=k, score=float(p.masks[0].score))
                for i, (k, p) in enumerate((k, p) for k, p in enumerate(predictions) if p.masks)
            ]
        elif prompt is not None:
            found = self.sam2_masks(
                image.size, lambda: image.rgb, prompt, options, out,
                image_id=image_id or _bytes_id(data), job_id=job_id, guard=guard,
            )
            layers = [m.mask for m in found]
            legend = [_mask_entry(m.mask, index=i, score=float(m.score)) for i, m in enumerate(found)]
        else:
            panoptic = self._panoptic(image, options, timer)
            ids = [s.id for s in panoptic.segments]
            # ids 1..N in order: the label map itself is the layer stack (no N full-size masks)
            layers = (
                panoptic.segmentation
                if ids == list(range(1, len(ids) + 1))
                else [panoptic.segmentation == i for i in ids]
            )
            legend = [
                {"index": i, "label": s.label, "score": float(s.score), "area": int(s.area),
                 "bbox": s.bbox}
                for i, s in enumerate(panoptic.segments)
            ]
        if options.format == "jpeg":
            with timer.stage("compose"):
                picture = compose.overlay(
                    image, layers, alpha=options.alpha, outline=options.outline
                )
            with timer.stage("encode_output"):
                out.files["overlay.jpg"] = (encode.encode_jpeg(picture), "image/jpeg")
                name = "overlay.jpg"
        else:
            with timer.stage("encode_output"):  # tinted a strip at a time inside the writer
                out.files["overlay.png"] = (
                    compose.overlay_png(
                        image, layers, alpha=options.alpha, outline=options.outline
                    ),
                    PNG,
                )
                name = "overlay.png"
        for entry in legend:
            entry["color"] = list(compose.palette_color(entry["index"]))
        out.result.update(width=image.width, height=image.height, overlay=name, segments=legend)
        out.result.update(image.describe_frames())
        return out


@dataclass(frozen=True)
class _RefineEntry:
    """A job's best low-resolution mask logits, kept beside its image's embedding."""

    image_entry: str  # the embedding's cache key: the refining job must be on that image
    logits: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes) + 64


def _refine_key(job_id: str, index: int) -> str:
    return f"refine|{job_id}:{index}"


def _options(task: str, options: Any, kwargs: dict[str, Any]):
    if options is not None and kwargs:
        raise TypeError("pass either options= or keyword options, not both")
    return parse_options(task, kwargs) if options is None else options


def _bytes_id(data: ImageInput) -> Optional[str]:
    """Content identity of encoded bytes: far cheaper to hash than decoded pixels."""
    return "sha1:" + hashlib.sha1(data).hexdigest() if isinstance(data, bytes) else None


def _digest(pixels: Image.Image) -> str:
    """Content identity when the caller gives none (no S3 ETag): a hash of the pixels
    the encoder sees, so the same picture re-uploaded still hits the cache."""
    return "sha1:" + hashlib.sha1(pixels.tobytes()).hexdigest()
