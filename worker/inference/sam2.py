"""SAM 2 over two onnxruntime sessions (samexporter layout: ``encoder.onnx``, ``decoder.onnx``).

The encoder turns the image, stretched to 1024x1024, into an embedding; the decoder turns
the embedding and a prompt into three low-resolution (256x256) candidate masks as logits
plus a predicted IoU for each. The encoder costs about 80 decoders, so embeddings can be
cached (``embed_cached``) and each further prompt on the same image runs the decoder only.

Coordinates go in as ``x * 1024 / W``, ``y * 1024 / H`` (the image is stretched per axis);
the graph itself adds the half-pixel offset and the padding point. Box corners are two
points labelled 2 and 3, placed before the other points as SAM 2's own predictor does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ContextManager, Optional, Union

import numpy as np
from PIL import Image

from config.contract import Prompt
from worker.inference.cache import EmbeddingCache
from worker.inference.sessions import input_shape, ort, provider, require_io
from worker.inference.transforms import to_model_input, upsample_mask

ENCODER_INPUT = "image"
EMBEDDING_NAMES = ("high_res_feats_0", "high_res_feats_1", "image_embed")
DECODER_INPUTS = (*EMBEDDING_NAMES, "point_coords", "point_labels", "mask_input", "has_mask_input")
DECODER_OUTPUTS = ("masks", "iou_predictions")

LABEL_BACKGROUND, LABEL_FOREGROUND, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT = 0, 1, 2, 3


@dataclass(frozen=True)
class Sam2Embedding:
    """The encoder's outputs for one image, and that image's size.

    The features are ``OrtValue``s on the device the encoder ran on: with the CUDA provider
    they stay in GPU memory, cached there, and go to the decoder without a round trip
    through the host."""

    features: Mapping[str, ort.OrtValue]
    image_size: tuple[int, int]  # (width, height) of the original image

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) * _ITEM_BYTES[v.data_type()] for v in self.features.values())

    @property
    def device(self) -> str:
        return next(iter(self.features.values())).device_name()

    def numpy(self, name: str) -> np.ndarray:
        """One feature copied to host memory (for inspection and tests)."""
        return self.features[name].numpy()


_ITEM_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(double)": 8}


@dataclass(frozen=True)
class Sam2Mask:
    mask: np.ndarray  # bool, (height, width) of the original image
    score: float  # the decoder's predicted IoU
    index: int  # which of the decoder's candidates
    logits_lowres: Optional[np.ndarray] = None  # float32 (256, 256), before upsampling


ImageSource = Union[Image.Image, Callable[[], Image.Image]]


class Sam2Model:
    def __init__(
        self,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        *,
        name: str = "sam2",
    ) -> None:
        require_io(
            encoder, inputs=[ENCODER_INPUT], outputs=EMBEDDING_NAMES, model_name=f"{name} encoder"
        )
        require_io(
            decoder, inputs=DECODER_INPUTS, outputs=DECODER_OUTPUTS, model_name=f"{name} decoder"
        )
        self.encoder = encoder
        self.decoder = decoder
        self.name = name
        _, _, self.input_height, self.input_width = input_shape(
            encoder, ENCODER_INPUT, (1, 3, 1024, 1024)
        )
        # The decoder's mask prompt is 4x the embedding's grid (256 for a 64x64 embedding).
        embed_h, embed_w = input_shape(decoder, "image_embed", (1, 256, 64, 64))[2:]
        mask_shape = input_shape(decoder, "mask_input", (1, 1, 4 * embed_h, 4 * embed_w))
        self._mask_input = np.zeros(mask_shape, np.float32)
        self._has_mask_input = np.zeros(input_shape(decoder, "has_mask_input", (1,)), np.float32)
        self._batches = True  # until a batched call fails

    @property
    def provider(self) -> str:
        return provider(self.encoder)

    @property
    def input_side(self) -> int:
        """The encoder's longest input side: an image needs no more pixels than this."""
        return max(self.input_width, self.input_height)

    @property
    def device(self) -> str:
        """Where embeddings live between encoder and decoder: "cuda" or "cpu"."""
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """float32 ``[1, 3, 1024, 1024]``: the image stretched (not letterboxed) and normalised."""
        return to_model_input(image, self.input_width, self.input_height)

    def encode(self, image: Image.Image, size: Optional[tuple[int, int]] = None) -> Sam2Embedding:
        """The embedding of ``image``; ``size`` is the (width, height) prompts and masks refer
        to when ``image`` is a reduced decode of a larger picture (default: its own)."""
        binding = self.encoder.io_binding()
        binding.bind_cpu_input(ENCODER_INPUT, self.preprocess(image))
        for name in EMBEDDING_NAMES:
            binding.bind_output(name, self.device)
        self.encoder.run_with_iobinding(binding)
        features = dict(zip(EMBEDDING_NAMES, binding.get_outputs()))
        return Sam2Embedding(features=features, image_size=size or image.size)

    def cache_key(self, key: str) -> str:
        """The cache entry of image ``key`` for this model: models never share entries."""
        return f"{self.name}|{key}"

    def embed_cached(
        self,
        image: ImageSource,
        key: Optional[str],
        cache: Optional[EmbeddingCache],
        size: Optional[tuple[int, int]] = None,
        *,
        guard: Optional[Callable[[str], ContextManager[None]]] = None,
    ) -> Sam2Embedding:
        """The embedding of ``image`` (or of what the loader returns), from ``cache`` under
        ``key`` when it is there. ``key`` names the image's content (e.g. an S3 URI with its
        ETag); the model's name is added to it (``cache_key``). ``size`` as for ``encode``.
        ``guard(cache_key)``: a context around a cold encode (the worker's encode lease,
        which may decide that another worker should run the job instead)."""

        def compute() -> Sam2Embedding:
            return self.encode(image() if callable(image) else image, size)

        if cache is None or key is None:
            return compute()
        entry = self.cache_key(key)
        if guard is None:
            return cache.get_or_compute(entry, compute)

        def guarded() -> Sam2Embedding:
            with guard(entry):
                return compute()

        return cache.get_or_compute(entry, guarded)

    def prompt_arrays(
        self, prompt: Optional[Prompt], width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``point_coords`` float32 ``[1, N, 2]`` in the encoder's input frame and
        ``point_labels`` float32 ``[1, N]`` for a prompt on a ``width`` x ``height`` image."""
        if prompt is None or prompt.is_empty:
            points, labels = [(width / 2, height / 2)], [LABEL_FOREGROUND]
        else:
            prompt.check_bounds(width, height)
            points, labels = [], []
            if prompt.box is not None:
                x, y, w, h = prompt.box
                points += [(x, y), (x + w, y + h)]
                labels += [LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]
            points += prompt.all_points
            labels += prompt.all_labels
        coords = np.array(points, np.float64) * (
            self.input_width / width,
            self.input_height / height,
        )
        return coords[None].astype(np.float32), np.array([labels], np.float32)

    @property
    def mask_input_shape(self) -> tuple[int, int]:
        """(height, width) of the decoder's mask prompt (256x256 for SAM 2)."""
        return tuple(self._mask_input.shape[-2:])

    def predict(
        self,
        embedding: Sam2Embedding,
        prompt: Optional[Prompt],
        *,
        multimask: bool = False,
        min_score: Optional[float] = None,
        mask_input: Optional[np.ndarray] = None,
    ) -> list[Sam2Mask]:
        """Masks at the original size for ``prompt`` (None: the image centre).

        ``multimask``: every candidate, best first; otherwise the one with the highest
        predicted IoU. Candidates scoring under ``min_score`` are dropped either way.
        ``mask_input``: low-resolution logits of an earlier mask (``Sam2Prediction.best_logits``)
        to refine, fed with ``has_mask_input`` 1.
        """
        return self.predict_many(
            embedding, [prompt], multimask=multimask, min_score=min_score, mask_inputs=[mask_input]
        )[0].masks

    def predict_many(
        self,
        embedding: Sam2Embedding,
        prompts: Sequence[Optional[Prompt]],
        *,
        multimask: bool = False,
        min_score: Optional[float] = None,
        mask_inputs: Optional[Sequence[Optional[np.ndarray]]] = None,
    ) -> list["Sam2Prediction"]:
        """One ``Sam2Prediction`` per prompt. Prompts with the same number of decoder
        points (boxes from a detector, say) run as one batched decoder call (the decoder's
        ``num_labels`` axis), so each gets exactly what it would get alone; a decoder that
        cannot batch (samexporter's public file broadcasts ``has_mask_input`` wrongly for
        more than one label) is run once per prompt instead, and remembered as such."""
        width, height = embedding.image_size
        masks_in = list(mask_inputs) if mask_inputs is not None else [None] * len(prompts)
        if len(masks_in) != len(prompts):
            raise ValueError("one mask input (or None) per prompt")
        arrays = [self.prompt_arrays(p, width, height) for p in prompts]
        groups: dict[int, list[int]] = {}
        for i, (coords, _) in enumerate(arrays):
            groups.setdefault(coords.shape[1], []).append(i)
        raw: list[Optional[tuple[np.ndarray, np.ndarray]]] = [None] * len(prompts)
        for members in groups.values():
            batches = [members] if self._batches and len(members) > 1 else [[i] for i in members]
            if len(batches) == 1 and len(members) > 1:
                try:
                    self._decode_into(raw, members, arrays, masks_in, embedding)
                    continue
                except Exception:  # noqa: BLE001  a decoder that cannot batch: one at a time
                    self._batches = False
                    batches = [[i] for i in members]
            for one in batches:
                self._decode_into(raw, one, arrays, masks_in, embedding)
        out = []
        for logits, scores in raw:  # type: ignore[misc]
            order = np.argsort(-scores, kind="stable") if multimask else [int(np.argmax(scores))]
            best = int(np.argmax(scores))
            out.append(
                Sam2Prediction(
                    masks=[
                        Sam2Mask(
                            mask=upsample_mask(logits[i], height, width),
                            score=float(scores[i]),
                            index=int(i),
                            logits_lowres=logits[i].copy(),
                        )
                        for i in order
                        if min_score is None or scores[i] >= min_score
                    ],
                    best_logits=logits[best].copy(),
                    best_score=float(scores[best]),
                )
            )
        return out

    def _decode_into(
        self,
        raw: list,
        members: list[int],
        arrays: list[tuple[np.ndarray, np.ndarray]],
        masks_in: list[Optional[np.ndarray]],
        embedding: Sam2Embedding,
    ) -> None:
        coords = np.concatenate([arrays[i][0] for i in members])
        labels = np.concatenate([arrays[i][1] for i in members])
        mask_shape = self._mask_input.shape[1:]  # (1, 256, 256)
        mask_input = np.zeros((len(members), *mask_shape), np.float32)
        has_mask = np.zeros((len(members), *self._has_mask_input.shape[1:]), np.float32)
        for row, i in enumerate(members):
            if masks_in[i] is not None:
                m = np.asarray(masks_in[i], np.float32)
                if m.size != int(np.prod(mask_shape)):
                    raise ValueError(f"a mask input is {mask_shape[-2:]} logits, got {m.shape}")
                mask_input[row] = m.reshape(mask_shape)
                has_mask[row] = 1.0
        binding = self.decoder.io_binding()
        for name in EMBEDDING_NAMES:
            binding.bind_ortvalue_input(name, embedding.features[name])
        for name, array in (
            ("point_coords", coords),
            ("point_labels", labels),
            ("mask_input", mask_input),
            ("has_mask_input", has_mask),
        ):
            binding.bind_cpu_input(name, array)
        for name in DECODER_OUTPUTS:
            binding.bind_output(name, "cpu")  # small: 3 x 256 x 256 logits and 3 scores each
        self.decoder.run_with_iobinding(binding)
        logits, scores = binding.copy_outputs_to_cpu()
        if logits.shape[0] != len(members) or scores.shape[0] != len(members):
            raise RuntimeError(f"decoder returned {logits.shape[0]} mask sets for {len(members)} prompts")
        for row, i in enumerate(members):
            raw[i] = (logits[row], scores[row])


@dataclass(frozen=True)
class Sam2Prediction:
    """What one prompt gave: its masks (as ``predict`` returns them) and the low-resolution
    logits of its best candidate, which a later click can refine (``mask_input``)."""

    masks: list[Sam2Mask]
    best_logits: np.ndarray  # float32 (256, 256)
    best_score: float

    @property
    def nbytes(self) -> int:
        return int(self.best_logits.nbytes)
