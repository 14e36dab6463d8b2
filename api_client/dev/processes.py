"""Processes the local tools start and stop: a ``segq worker`` subprocess (for ``segq dev``,
the tests and the benchmark) and the one way they are all stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from config.settings import Settings

# `segq worker` with other modules imported first (the tests' fault hooks), so the worker
# under test still starts through the product's own entry point.
_IMPORT_THEN_SEGQ = (
    "import importlib, sys\n"
    "for name in sys.argv.pop(1).split(','):\n"
    "    importlib.import_module(name)\n"
    "from api_client.cli import main\n"
    "sys.exit(main())\n"
)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> Optional[int]:
    """SIGTERM (a Celery worker's warm shutdown: running jobs finish), then SIGKILL after
    ``timeout`` seconds; reaps it either way. Returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class WorkerProcess:
    """One ``segq worker`` subprocess with ``settings`` in its environment, its output in
    ``log_dir``; ``wait_ready`` returns once it answers ``segq health`` as ready."""

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
        cwd: Optional[Path] = None,
    ) -> None:
        """``host``: the part after @ of the worker's name (``%h``: this machine's name, as
        Celery spells it); ``imports``: modules the worker process imports before it starts."""
        self.settings = settings
        host = host.replace("%h", socket.gethostname())
        self.hostname = f"{name or 'w'}-{uuid.uuid4().hex[:6]}@{host}"
        self.log_path = Path(log_dir) / f"{self.hostname.split('@')[0]}.log"
        self.pool = pool
        self.concurrency = concurrency
        self.env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.imports = list(imports)
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None

    def start(self, *, wait: bool = True, timeout: float = 90) -> "WorkerProcess":
        entry = ["-c", _IMPORT_THEN_SEGQ, ",".join(self.imports)] if self.imports else ["-m", "api_client.cli"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *entry, "worker", "--pool", self.pool,
                 "--concurrency", str(self.concurrency), "--hostname", self.hostname,
                 "--loglevel", "INFO"],
                env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def wait_ready(self, timeout: float = 90) -> dict[str, Any]:
        """The worker's health report once it is ready; ``RuntimeError`` if it exits first."""
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
        return (stop_process(self.proc, timeout) if self.proc else 0) or 0

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate(timeout=20)
