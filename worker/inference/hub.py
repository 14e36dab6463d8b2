"""Model files: a Hugging Face hub repo through ``huggingface_hub``'s cache, or a local directory.

A hub repo is fetched with ``hf_hub_download`` (cache dir, revision pin and offline mode
from ``Settings``; ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` as huggingface_hub
reads them). A per-call repo or revision names a hub version, so it bypasses a configured
local directory; a repo other than the configured one must be in ``allowed_repos``.
Every failure becomes a ``ModelError`` whose message says what to do about it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from huggingface_hub import hf_hub_download, is_offline_mode
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import silent_tqdm

from config.errors import ModelNotAllowed, ModelNotFound, ModelUnavailable
from config.settings import Settings

log = logging.getLogger(__name__)

HOW_TO_FIX = (
    "set SEGQ_SAM2_DIR / SEGQ_DETR_DIR to a local directory with the files, SEGQ_HF_CACHE_DIR "
    "to a filled huggingface_hub cache, or run `segq download-models` where the hub is reachable"
)


@dataclass(frozen=True)
class ModelSource:
    """Where one model's files come from: a local directory, or a hub repo at a revision."""

    repo: str
    revision: Optional[str] = None
    local_dir: Optional[Path] = None

    def __str__(self) -> str:
        if self.local_dir is not None:
            return str(self.local_dir)
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"


@dataclass(frozen=True)
class Sam2Files:
    encoder: Path
    decoder: Path


@dataclass(frozen=True)
class DetrFiles:
    model: Path
    config: Optional[Path]  # None: no config.json, labels come from the COCO table


def model_source(
    settings: Settings, model: str, *, repo: Optional[str] = None, revision: Optional[str] = None
) -> ModelSource:
    """The source of ``model`` ("sam2" or "detr") after per-call overrides, checked against
    ``allowed_repos``."""
    default_repo: str = getattr(settings, f"{model}_repo")
    local_dir: Optional[Path] = getattr(settings, f"{model}_dir")
    if repo is None and revision is None and local_dir is not None:
        return ModelSource(repo=default_repo, local_dir=Path(local_dir))
    repo = repo or default_repo
    if (
        repo != default_repo
        and "*" not in settings.allowed_repos
        and repo not in settings.allowed_repos
    ):
        raise ModelNotAllowed(
            f"model repo {repo!r} is not allowed here; "
            f"allowed: {', '.join(settings.allowed_repos)}",
            repo=repo,
        )
    return ModelSource(repo=repo, revision=revision or getattr(settings, f"{model}_revision"))


def fetch(
    source: ModelSource, filename: str, settings: Settings, *, progress: bool = False
) -> Path:
    """The local path of ``filename`` from ``source``, downloading it into the cache if needed."""
    _check_relative(filename)
    if source.local_dir is not None:
        path = source.local_dir / filename
        if not path.is_file():
            raise ModelNotFound(f"{filename!r} is not in the model directory {source.local_dir}")
        return path
    try:
        return Path(
            hf_hub_download(
                source.repo,
                filename,
                revision=source.revision,
                cache_dir=settings.hf_cache_dir,
                local_files_only=settings.offline or _env_offline(),
                endpoint=os.environ.get("HF_ENDPOINT") or None,
                library_name="segq",
                tqdm_class=None if progress else silent_tqdm,
            )
        )
    except RevisionNotFoundError:
        raise ModelNotFound(
            f"revision {source.revision!r} of {source.repo} does not exist on the hub",
            repo=source.repo,
            revision=source.revision,
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"model repo {source.repo!r} does not exist on the hub (or is private or gated "
            f"and no HF_TOKEN allows it)",
            repo=source.repo,
        ) from None
    except LocalEntryNotFoundError:
        raise ModelUnavailable(
            f"cannot get {filename} of {source}: the hub is unreachable or offline mode is on, "
            f"and the file is not cached; {HOW_TO_FIX}",
            repo=source.repo,
            file=filename,
        ) from None
    except EntryNotFoundError:
        raise ModelNotFound(
            f"{source} has no file {filename!r}", repo=source.repo, file=filename
        ) from None
    except HFValidationError as e:
        raise ModelNotFound(f"{source.repo!r} is not a valid hub repo id: {e}") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelUnavailable(
            f"cannot download {filename} of {source}: {e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}; {HOW_TO_FIX}",
            repo=source.repo,
            file=filename,
        ) from None


def sam2_files(
    settings: Settings,
    *,
    repo: Optional[str] = None,
    encoder_file: Optional[str] = None,
    decoder_file: Optional[str] = None,
    revision: Optional[str] = None,
    progress: bool = False,
) -> Sam2Files:
    source = model_source(settings, "sam2", repo=repo, revision=revision)
    return Sam2Files(
        encoder=fetch(
            source, encoder_file or settings.sam2_encoder_file, settings, progress=progress
        ),
        decoder=fetch(
            source, decoder_file or settings.sam2_decoder_file, settings, progress=progress
        ),
    )


def detr_files(
    settings: Settings,
    *,
    repo: Optional[str] = None,
    model_file: Optional[str] = None,
    revision: Optional[str] = None,
    progress: bool = False,
) -> DetrFiles:
    source = model_source(settings, "detr", repo=repo, revision=revision)
    model = fetch(source, model_file or settings.detr_model_file, settings, progress=progress)
    try:
        config = fetch(source, settings.detr_config_file, settings, progress=progress)
    except ModelNotFound:
        log.warning(
            "%s has no %s; DETR labels come from the COCO table", source, settings.detr_config_file
        )
        config = None
    return DetrFiles(model=model, config=config)


def download_models(
    settings: Settings, *, segment: bool = True, panoptic: bool = True, progress: bool = True
) -> dict[str, dict[str, Optional[str]]]:
    """Fill the cache with the configured models ahead of time (``segq download-models``).

    Returns the local path of every file, by model and role.
    """
    out: dict[str, dict[str, Optional[str]]] = {}
    if segment:
        sam2 = sam2_files(settings, progress=progress)
        out["sam2"] = {"encoder": str(sam2.encoder), "decoder": str(sam2.decoder)}
    if panoptic:
        detr = detr_files(settings, progress=progress)
        out["detr"] = {"model": str(detr.model), "config": detr.config and str(detr.config)}
    return out


def _check_relative(filename: str) -> None:
    parts = PurePosixPath(filename).parts
    if not filename or filename.startswith(("/", "\\")) or ".." in parts or "\\" in filename:
        raise ModelNotAllowed(
            f"model file name {filename!r} must be a relative path inside the repo"
        )


def _env_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; a later change still counts here.
    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {
        "1",
        "ON",
        "YES",
        "TRUE",
    }
