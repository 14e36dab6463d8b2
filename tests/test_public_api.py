"""The producer's public surface, as httpx checks its own: ``api_client.__all__`` is exactly
what the package offers, and the asyncio client is a true twin of the blocking one."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types

import api_client
from api_client import AsyncJob, AsyncSegmentationClient, Job, SegmentationClient


def public(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls) if not name.startswith("_")}


def test_all_is_exactly_the_public_names():
    names = {
        name for name, value in vars(api_client).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }  # fmt: skip
    assert sorted(api_client.__all__) == sorted(names)
    assert api_client.__all__ == sorted(api_client.__all__)


def test_the_readme_import_works_in_a_fresh_interpreter():
    code = "from api_client import SegmentationClient, AsyncSegmentationClient; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "ok"


def test_the_async_client_has_every_method_of_the_sync_one_awaitable():
    sync_methods = public(SegmentationClient) - {"storage", "celery"}
    async_methods = public(AsyncSegmentationClient) - {"sync"}  # .sync.celery, .sync.storage
    assert sync_methods <= async_methods, sync_methods - async_methods
    for name in sync_methods - {"settings"}:
        assert inspect.iscoroutinefunction(getattr(AsyncSegmentationClient, name)), name
        sync_params = list(inspect.signature(getattr(SegmentationClient, name)).parameters)
        async_params = list(inspect.signature(getattr(AsyncSegmentationClient, name)).parameters)
        assert sync_params == async_params or "kwargs" in sync_params + async_params, name


def test_the_async_job_mirrors_the_job():
    assert public(Job) - {"client"} == public(AsyncJob) - {"client"}
    for name in public(Job) - {"client", "id", "task", "created"}:
        assert inspect.iscoroutinefunction(getattr(AsyncJob, name)), name
