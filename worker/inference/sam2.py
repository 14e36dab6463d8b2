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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional, Union

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

    def embed_cached(
        self,
        image: ImageSource,
        key: Optional[str],
        cache: Optional[EmbeddingCache],
        size: Optional[tuple[int, int]] = None,
    ) -> Sam2Embedding:
        """The embedding of ``image`` (or of what the loader returns), from ``cache`` under
        ``key`` when it is there. ``key`` names the image's content (e.g. an S3 URI with its
        ETag); the model's name is added to it, so models never share entries. ``size`` as
        for ``encode``."""

        def compute() -> Sam2Embedding:
            return self.encode(image() if callable(image) else image, size)

        if cache is None or key is None:
            return compute()
        return cache.get_or_compute(f"{self.name}|{key}", compute)

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

    def predict(
        self,
        embedding: Sam2Embedding,
        prompt: Optional[Prompt],
        *,
        multimask: bool = False,
        min_score: Optional[float] = None,
    ) -> list[Sam2Mask]:
        """Masks at the original size for ``prompt`` (None: the image centre).

        ``multimask``: every candidate, best first; otherwise the one with the highest
        predicted IoU. Candidates scoring under ``min_score`` are dropped either way.
        """
        width, height = embedding.image_size
        coords, labels = self.prompt_arrays(prompt, width, height)
        binding = self.decoder.io_binding()
        for name in EMBEDDING_NAMES:
            binding.bind_ortvalue_input(name, embedding.features[name])
        for name, array in (
            ("point_coords", coords),
            ("point_labels", labels),
            ("mask_input", self._mask_input),
            ("has_mask_input", self._has_mask_input),
        ):
            binding.bind_cpu_input(name, array)
        for name in DECODER_OUTPUTS:
            binding.bind_output(name, "cpu")  # small: 3 x 256 x 256 logits and 3 scores
        self.decoder.run_with_iobinding(binding)
        logits, scores = (out[0] for out in binding.copy_outputs_to_cpu())
        order = np.argsort(-scores, kind="stable") if multimask else [int(np.argmax(scores))]
        return [
            Sam2Mask(
                mask=upsample_mask(logits[i], height, width),
                score=float(scores[i]),
                index=int(i),
                logits_lowres=logits[i].copy(),
            )
            for i in order
            if min_score is None or scores[i] >= min_score
        ]
