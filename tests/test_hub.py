"""The real huggingface_hub download code against a loopback server standing in for the hub
(``HF_ENDPOINT``), answering ``/{repo}/resolve/{revision}/{file}`` as the hub does: HEAD
with ``ETag`` / ``X-Repo-Commit`` / ``Content-Length``, GET with the bytes, and the
``X-Error-Code`` headers huggingface_hub turns into its typed errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from config.errors import ModelNotAllowed, ModelNotFound, ModelUnavailable
from config.settings import DEFAULT_SAM2_REPO, Settings
from worker.inference.hub import download_models
from worker.inference.registry import ModelRegistry
from tests.support.hub import COMMIT, FakeHub
from worker.inference.hub import sam2_files


@pytest.fixture
def hub_settings(tmp_path: Path) -> Settings:
    return Settings(hf_cache_dir=tmp_path / "hf-cache", providers=["CPUExecutionProvider"])


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_first_call_downloads_second_is_a_cache_hit(hub: FakeHub, hub_settings: Settings) -> None:
    files = sam2_files(hub_settings)
    assert files.encoder.read_bytes() == hub.repos[DEFAULT_SAM2_REPO]["encoder.onnx"]
    assert str(files.encoder).startswith(str(hub_settings.hf_cache_dir))
    assert hub.gets("/encoder.onnx") == 1 and hub.gets("/decoder.onnx") == 1
    again = sam2_files(hub_settings)
    assert again == files
    assert hub.gets("/encoder.onnx") == 1 and hub.gets("/decoder.onnx") == 1  # no new GET


def test_offline_works_from_the_cache(
    hub: FakeHub, hub_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sam2_files(hub_settings)
    seen = len(hub.requests)
    assert sam2_files(hub_settings.model_copy(update={"offline": True})) == files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub's own switch counts too
    assert sam2_files(hub_settings) == files
    assert len(hub.requests) == seen  # not even a HEAD
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())  # hub down: the cache still serves
    assert sam2_files(hub_settings) == files


def test_offline_without_cache_says_how_to_fix_it(hub: FakeHub, hub_settings: Settings) -> None:
    with pytest.raises(ModelUnavailable) as err:
        sam2_files(hub_settings.model_copy(update={"offline": True}))
    message = err.value.message
    assert err.value.code == "model_unavailable" and "\n" not in message
    for hint in (
        "encoder.onnx",
        DEFAULT_SAM2_REPO,
        "SEGQ_SAM2_DIR",
        "SEGQ_HF_CACHE_DIR",
        "segq download-models",
    ):
        assert hint in message
    assert hub.requests == []


def test_something_that_is_not_a_hub_is_unavailable(hub: FakeHub, hub_settings: Settings) -> None:
    # A proxy or portal answering 200 without the hub's headers. (A closed port gives the
    # same error, after huggingface_hub's own retries: about 23 s, too slow for a unit test.)
    hub.not_a_hub = True
    with pytest.raises(ModelUnavailable, match="SEGQ_HF_CACHE_DIR"):
        sam2_files(hub_settings)


def test_unknown_repo_file_and_revision_are_not_found(hub: FakeHub, hub_settings: Settings) -> None:
    anything = hub_settings.model_copy(update={"allowed_repos": ["*"]})
    with pytest.raises(ModelNotFound, match="nobody/nothing"):
        sam2_files(anything, repo="nobody/nothing")
    with pytest.raises(ModelNotFound, match="missing.onnx"):
        sam2_files(hub_settings, encoder_file="missing.onnx")
    with pytest.raises(ModelNotFound, match="v9"):
        sam2_files(hub_settings, revision="v9")
    assert sam2_files(hub_settings, revision=COMMIT).encoder.is_file()  # a pinned commit works


def test_disallowed_repo_is_refused_before_any_request(
    hub: FakeHub, hub_settings: Settings
) -> None:
    with pytest.raises(ModelNotAllowed, match="someone/else"):
        ModelRegistry(hub_settings).sam2(repo="someone/else")
    assert hub.requests == []


def test_local_directory_needs_no_hub(
    sam2_repo: Path, detr_repo: Path, hub_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    local = hub_settings.model_copy(update={"sam2_dir": sam2_repo, "detr_dir": detr_repo})
    assert download_models(local, progress=False) == {
        "sam2": {
            "encoder": str(sam2_repo / "encoder.onnx"),
            "decoder": str(sam2_repo / "decoder.onnx"),
        },
        "detr": {
            "model": str(detr_repo / "onnx" / "model.onnx"),
            "config": str(detr_repo / "config.json"),
        },
    }


def test_download_models_fills_the_cache_for_offline_workers(
    hub: FakeHub, hub_settings: Settings
) -> None:
    paths = download_models(hub_settings, progress=False)
    assert set(paths) == {"sam2", "detr"} and all(
        Path(p).is_file() for m in paths.values() for p in m.values()
    )
    seen = len(hub.requests)
    offline = hub_settings.model_copy(update={"offline": True})
    assert ModelRegistry(offline).sam2().provider == "CPUExecutionProvider"
    assert ModelRegistry(offline).detr().id2label[3] == "car"
    assert len(hub.requests) == seen
    assert download_models(hub_settings, segment=False, progress=False).keys() == {"detr"}
