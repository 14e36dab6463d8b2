"""``segq api`` as a real uvicorn process on a loopback port, for the HTTP and browser tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx

from api_client.dev.localstack import free_ports
from api_client.http.auth import hash_key, new_key

REPO = Path(__file__).resolve().parents[2]


def api_key(prefixes: list[str], rate: int = 600, name: str = "") -> tuple[str, dict[str, Any]]:
    """A new key and its SEGQ_API_KEYS entry."""
    key = new_key()
    return key, {"name": name, "sha256": hash_key(key), "prefixes": prefixes, "rate_per_minute": rate}


class ApiProcess:
    """``python -m api_client.cli api`` with ``env``; ``url`` once it answers /healthz."""

    def __init__(self, env: dict[str, str], log: Path, *, keys: Optional[list[dict]] = None) -> None:
        self.port = free_ports(1)[0]
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        if keys is not None:
            self.env["SEGQ_API_KEYS"] = json.dumps(keys)
        self.log = log
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "ApiProcess":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api_client.cli", "api", "--port", str(self.port),
                 "--log-level", "warning"],
                env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"segq api exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"segq api did not answer: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> "ApiProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def sse_events(client: httpx.Client, url: str, headers: dict[str, str], timeout: float = 60) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a Server-Sent Events stream, until the server closes it."""
    found = []
    event, data = "message", []
    with client.stream("GET", url, headers=headers, timeout=httpx.Timeout(timeout)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                found.append((event, json.loads("\n".join(data))))
                event, data = "message", []
    return found
