"""The model layer: SAM 2 and DETR-panoptic over onnxruntime, files through huggingface_hub.

``load_sam2(settings)`` and ``load_detr(settings)`` return models ready to run. Each is
loaded once per process for the files it resolves to, so a job naming another repo or
revision loads that model once and later jobs reuse it; the files a (repo, file, revision)
resolves to are also remembered, so a job costs no hub request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, TypeVar

from config.settings import Settings
from worker.inference.cache import EmbeddingCache
from worker.inference.detr import DetrPanopticModel, PanopticResult, PanopticSegment
from worker.inference.hub import DetrFiles, Sam2Files, detr_files, download_models, sam2_files
from worker.inference.labels import load_labels
from worker.inference.sam2 import Sam2Embedding, Sam2Mask, Sam2Model
from worker.inference.sessions import get_session

__all__ = [
    "DetrPanopticModel",
    "EmbeddingCache",
    "PanopticResult",
    "PanopticSegment",
    "Sam2Embedding",
    "Sam2Mask",
    "Sam2Model",
    "download_models",
    "load_detr",
    "load_sam2",
    "preload",
]

T = TypeVar("T")

_files: dict[tuple, Any] = {}
_models: dict[tuple, Any] = {}


def load_sam2(
    settings: Settings,
    *,
    repo: Optional[str] = None,
    encoder_file: Optional[str] = None,
    decoder_file: Optional[str] = None,
    revision: Optional[str] = None,
) -> Sam2Model:
    request = (
        "sam2",
        _source_settings(settings, "sam2"),
        repo,
        encoder_file,
        decoder_file,
        revision,
    )
    files: Sam2Files = _remember(
        _files,
        request,
        lambda: sam2_files(
            settings,
            repo=repo,
            encoder_file=encoder_file,
            decoder_file=decoder_file,
            revision=revision,
        ),
    )
    return _remember(
        _models,
        (files, *_runtime_settings(settings)),
        lambda: Sam2Model(
            get_session(files.encoder, settings),
            get_session(files.decoder, settings),
            name=str(files.encoder),
            max_points=settings.max_points,
        ),
    )


def load_detr(
    settings: Settings,
    *,
    repo: Optional[str] = None,
    model_file: Optional[str] = None,
    revision: Optional[str] = None,
) -> DetrPanopticModel:
    request = ("detr", _source_settings(settings, "detr"), repo, model_file, revision)
    files: DetrFiles = _remember(
        _files,
        request,
        lambda: detr_files(settings, repo=repo, model_file=model_file, revision=revision),
    )

    def load() -> DetrPanopticModel:
        id2label, thing_ids = load_labels(files.config)
        return DetrPanopticModel(
            get_session(files.model, settings), id2label, thing_ids, name=str(files.model)
        )

    return _remember(_models, (files, *_runtime_settings(settings)), load)


def preload(settings: Settings) -> dict[str, str]:
    """Load the models named in ``settings.load_models`` (before a worker takes work);
    returns the execution provider each runs on."""
    loaders = {"sam2": load_sam2, "detr": load_detr}
    return {name: loaders[name](settings).provider for name in settings.load_models}


def _remember(store: dict[tuple, Any], key: tuple, make: Callable[[], T]) -> T:
    # No lock: two threads racing on a first load both build it (sessions are shared
    # anyway), and a slow download for one job never blocks another job's model.
    if key not in store:
        store[key] = make()
    return store[key]


def _source_settings(settings: Settings, model: str) -> tuple:
    names = ("repo", "revision", "dir") + (
        ("encoder_file", "decoder_file") if model == "sam2" else ("model_file", "config_file")
    )
    return (
        *(getattr(settings, f"{model}_{n}") for n in names),
        settings.hf_cache_dir,
        settings.offline,
        tuple(settings.allowed_repos),
    )


def _runtime_settings(settings: Settings) -> tuple:
    return (
        tuple(settings.providers),
        settings.intra_op_threads,
        settings.inter_op_threads,
        settings.max_points,
    )
