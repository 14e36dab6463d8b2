"""The real huggingface_hub download code against a loopback server standing in for the hub
(``HF_ENDPOINT``), answering ``/{repo}/resolve/{revision}/{file}`` as the hub does: HEAD
with ``ETag`` / ``X-Repo-Commit`` / ``Content-Length``, GET with the bytes, and the
``X-Error-Code`` headers huggingface_hub turns into its typed errors."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from config.errors import ModelNotAllowed, ModelNotFound, ModelUnavailable
from config.settings import DEFAULT_DETR_REPO, DEFAULT_SAM2_REPO, Settings
from worker.inference import download_models, load_detr, load_sam2
from worker.inference.hub import sam2_files

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    not_a_hub: bool = False  # answer 200 without the hub's headers

    def gets(self, suffix: str) -> int:
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith(suffix))


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            hub.requests.append((self.command, self.path))
            if hub.not_a_hub:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                return self.end_headers()
            parts = unquote(self.path.split("?")[0]).lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, "EntryNotFound")
            repo, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            if repo not in hub.repos:
                return self._error(401, "RepoNotFound")  # what the hub says to anonymous callers
            if revision not in ("main", COMMIT):
                return self._error(404, "RevisionNotFound")
            content = hub.repos[repo].get(filename)
            if content is None:
                return self._error(404, "EntryNotFound")
            self.send_response(200)
            self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body:
                self.wfile.write(content)

        def _error(self, status: int, code: str) -> None:
            message = f"{code} for {self.path}".encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(message)

    return Handler


@pytest.fixture
def hub(sam2_repo: Path, detr_repo: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub(
        repos={
            DEFAULT_SAM2_REPO: {p.name: p.read_bytes() for p in sam2_repo.glob("*.onnx")},
            DEFAULT_DETR_REPO: {
                "onnx/model.onnx": (detr_repo / "onnx" / "model.onnx").read_bytes(),
                "config.json": (detr_repo / "config.json").read_bytes(),
            },
        }
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


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
        load_sam2(hub_settings, repo="someone/else")
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
    assert load_sam2(offline).provider == "CPUExecutionProvider"
    assert load_detr(offline).id2label[3] == "car"
    assert len(hub.requests) == seen
    assert download_models(hub_settings, segment=False, progress=False).keys() == {"detr"}
