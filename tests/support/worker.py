"""A real ``segq worker`` subprocess for integration and fault tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from config.settings import Settings

REPO = Path(__file__).resolve().parents[2]

# `segq worker` with test-only modules imported first (e.g. tests.support.poison), so the
# worker under test still starts through the product's own entry point.
_IMPORT_THEN_SEGQ = (
    "import importlib, sys\n"
    "for name in sys.argv.pop(1).split(','):\n"
    "    importlib.import_module(name)\n"
    "from api_client.cli import main\n"
    "sys.exit(main())\n"
)


def settings_env(settings: Settings) -> dict[str, str]:
    """The SEGQ_* environment that reproduces ``settings`` in another process."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, (list, dict, bool)):
            env[f"SEGQ_{name.upper()}"] = json.dumps(value)
        else:
            env[f"SEGQ_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        *,
        pool: str = "threads",
        concurrency: int = 2,
        extra_env: Optional[dict[str, str]] = None,
        name: Optional[str] = None,
        host: str = "test",
        imports: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.hostname = f"{name or 'w'}-{uuid.uuid4().hex[:6]}@{host}"
        self.log_path = Path(log_dir) / f"{self.hostname.split('@')[0]}.log"
        self.pool = pool
        self.concurrency = concurrency
        self.env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.imports = list(imports)
        self.proc: Optional[subprocess.Popen] = None

    def start(self, *, wait: bool = True, timeout: float = 90) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        entry = ["-c", _IMPORT_THEN_SEGQ, ",".join(self.imports)] if self.imports else ["-m", "api_client.cli"]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "worker", "--pool", self.pool,
             "--concurrency", str(self.concurrency), "--hostname", self.hostname,
             "--loglevel", "INFO"],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90) -> dict[str, Any]:
        from api_client.health import ask_workers

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            report = ask_workers(self.settings, hostname=self.hostname, timeout=0.5).get(self.hostname)
            if report and report.get("ready"):
                return report
        raise TimeoutError(f"worker {self.hostname} not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the process dies mid-whatever, as a lost node would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM: Celery's warm shutdown, running jobs finish first."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate(timeout=20)
