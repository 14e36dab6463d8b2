"""The models one process has loaded, for one set of settings.

A worker's ``Runtime`` owns one ``ModelRegistry``: the first job (or the warm-up) that
needs SAM 2 or DETR loads it, later ones reuse it, and a job naming another repo, file or
revision loads that model once. The files a (repo, file, revision) resolves to are
remembered too, so a job costs no hub request. Sessions are shared per file: a decoder
named by two requests is one session.

A registry belongs to its settings' model part (``Settings.model_settings``): sharing one
between two runtimes is allowed only when that part is equal (``Runtime`` checks), so no
model outlives the settings it was loaded with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from config.settings import Settings
from worker.inference.hub import DetrFiles, Sam2Files, detr_files, sam2_files
from worker.inference.labels import load_labels

if TYPE_CHECKING:
    import onnxruntime as ort

    from worker.inference.detr import DetrPanopticModel
    from worker.inference.sam2 import Sam2Model

T = TypeVar("T")


class ModelRegistry:
    """Thread-safe. Loading a model can take seconds (a download, a session); two threads
    racing on the same first load may both build it, but they share its sessions, and a
    slow load for one job never blocks another job's model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._files: dict[tuple, Any] = {}
        self._models: dict[Any, Any] = {}
        self._sessions: dict[str, "ort.InferenceSession"] = {}
        self._lock = threading.Lock()

    def sam2(
        self,
        *,
        repo: Optional[str] = None,
        encoder_file: Optional[str] = None,
        decoder_file: Optional[str] = None,
        revision: Optional[str] = None,
    ) -> "Sam2Model":
        """SAM 2 from the configured source, or from the one a job names."""
        from worker.inference.sam2 import Sam2Model

        files: Sam2Files = self._remember(
            self._files,
            ("sam2", repo, encoder_file, decoder_file, revision),
            lambda: sam2_files(
                self.settings, repo=repo, encoder_file=encoder_file,
                decoder_file=decoder_file, revision=revision,
            ),  # fmt: skip
        )
        return self._remember(
            self._models,
            files,
            lambda: Sam2Model(
                self.session(files.encoder), self.session(files.decoder), name=str(files.encoder)
            ),
        )

    def detr(
        self,
        *,
        repo: Optional[str] = None,
        model_file: Optional[str] = None,
        revision: Optional[str] = None,
    ) -> "DetrPanopticModel":
        """DETR-panoptic from the configured source, or from the one a job names."""
        from worker.inference.detr import DetrPanopticModel

        files: DetrFiles = self._remember(
            self._files,
            ("detr", repo, model_file, revision),
            lambda: detr_files(self.settings, repo=repo, model_file=model_file, revision=revision),
        )

        def load() -> DetrPanopticModel:
            id2label, thing_ids = load_labels(files.config)
            return DetrPanopticModel(
                self.session(files.model, detr=True), id2label, thing_ids, name=str(files.model)
            )

        return self._remember(self._models, files, load)

    def session(self, path: Path, *, detr: bool = False) -> "ort.InferenceSession":
        """The session for the model file ``path`` (one per file), made on first use;
        ``detr``: a DETR-panoptic file, its mask head run in chunks of queries."""
        from worker.inference.sessions import create_detr_session, create_session

        key = str(Path(path).resolve())
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                create = create_detr_session if detr else create_session
                session = self._sessions[key] = create(Path(path), self.settings)
        return session

    def load(self, names: list[str]) -> dict[str, Any]:
        """The configured models named ("sam2", "detr"), loaded now."""
        loaders: dict[str, Callable[[], Any]] = {"sam2": self.sam2, "detr": self.detr}
        return {name: loaders[name]() for name in names}

    @staticmethod
    def _remember(store: dict, key: Any, make: Callable[[], T]) -> T:
        if key not in store:
            store[key] = make()
        return store[key]
