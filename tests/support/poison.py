"""Fault injection for the fault tests. Test code only: a test worker imports this module
before it starts (``WorkerProcess(imports=[...])``); product code never knows about it.

A job whose image key contains a marker misbehaves after the worker has marked it
``running``, so its status says ``running`` when the fault hits:

- ``slow-``: sleeps ``POISON_SLOW_S`` seconds (default 3) before doing its work;
- ``kill-``: SIGKILLs its own process on every delivery (a poison job);
- ``torn-``: on its first attempt writes its first output, then SIGKILLs its process
  before the other outputs and the manifest (a worker lost halfway through its uploads).

Under the threads pool the process is the whole worker; under prefork, one pool child.
Each kill is first appended to the file named by ``POISON_LOG`` (if set), so a test can
count how often the fault really fired.

The hooks wrap ``worker.jobs.run_job`` and ``Storage.write`` rather than using a Celery
signal because ``task_prerun`` fires before the job's status is ``running``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from worker import jobs
from config.storage import Storage

SLOW_S = float(os.environ.get("POISON_SLOW_S", "3"))
LOG = os.environ.get("POISON_LOG")

_real_run_job = jobs.run_job
_real_write = Storage.write
_tearing = threading.local()


def _die(job_id: str, why: str) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{why} {job_id} pid={os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _run_job(runtime: Any, request: Any, job_id: str, **kwargs: Any) -> Any:
    key = request.ref.key
    if "slow-" in key:
        time.sleep(SLOW_S)
    if "kill-" in key:
        _die(job_id, "kill")
    first_attempt = runtime.status.get(job_id).attempts == 1
    _tearing.job_id = job_id if "torn-" in key and first_attempt else None
    try:
        return _real_run_job(runtime, request, job_id, **kwargs)
    finally:
        _tearing.job_id = None


def _write(self: Storage, key: str, *args: Any, **kwargs: Any) -> str:
    uri = _real_write(self, key, *args, **kwargs)
    job_id = getattr(_tearing, "job_id", None)
    if job_id is not None:
        _die(job_id, "torn")
    return uri


jobs.run_job = _run_job
Storage.write = _write
