"""A loopback server standing in for the Hugging Face hub (``HF_ENDPOINT``), answering
``/{repo}/resolve/{revision}/{file}`` as the hub does: HEAD with ``ETag`` /
``X-Repo-Commit`` / ``Content-Length``, GET with the bytes, and the ``X-Error-Code``
headers huggingface_hub turns into its typed errors. It serves the tiny test models under
the public repo names, so the real download code runs end to end."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from config.settings import DEFAULT_DETR_REPO, DEFAULT_SAM2_REPO

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


def public_repos(sam2_repo: Path, detr_repo: Path) -> dict[str, dict[str, bytes]]:
    """The tiny test models under the public repos' names and file layouts."""
    return {
        DEFAULT_SAM2_REPO: {p.name: p.read_bytes() for p in sam2_repo.glob("*.onnx")},
        DEFAULT_DETR_REPO: {
            "onnx/model.onnx": (detr_repo / "onnx" / "model.onnx").read_bytes(),
            "config.json": (detr_repo / "config.json").read_bytes(),
        },
    }


@contextmanager
def serving(fake: FakeHub) -> Iterator[FakeHub]:
    """Serve ``fake`` on a free loopback port (its ``url``) inside the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub(sam2_repo: Path, detr_repo: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with serving(FakeHub(repos=public_repos(sam2_repo, detr_repo))) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield fake


