"""Compiled kernels (numba, optional) and the threads that run them.

Every kernel here has a plain numpy reference beside the code that calls it, and tests
check the two equal; without numba installed the reference runs. Kernels are compiled
with numba's defaults for floating point (no fast-math, no fused multiply-add), so each
float32 operation rounds as numpy's does, in the same order. They release the GIL
(``nogil``), and ``split_rows`` runs one over row ranges on a small pool, one thread per
core, which is how 2 cores finish in about half the time.

``SEGQ_NUMBA=0`` turns the kernels off (the numpy references run instead).
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

try:
    if os.environ.get("SEGQ_NUMBA", "1") == "0":
        raise ImportError("SEGQ_NUMBA=0")
    import numba
except ImportError:
    numba = None

ENABLED = numba is not None


def kernel(fn: Callable) -> Optional[Callable]:
    """``fn`` compiled lazily with numba (nogil, cached on disk where the package directory
    is writable), or None without numba: callers then take their numpy path."""
    if numba is None:
        return None
    options = dict(nogil=True, boundscheck=False, error_model="numpy")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return numba.njit(cache=True, **options)(fn)
    except Exception:  # no writable cache location: compile on first use each process
        return numba.njit(**options)(fn)


_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()
_on_pool_thread = threading.local()
THREADS = max(1, os.cpu_count() or 1)


def shared_pool() -> ThreadPoolExecutor:
    """One thread per core for GIL-free work (kernels, zlib, ISA-L), shared process-wide."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="segq-accel")
        return _pool


def _forget_pool_in_child() -> None:
    """A forked child (Celery prefork) has none of its parent's threads: a pool made before
    the fork would queue work no thread runs. The child makes its own on first use."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def on_pool_thread() -> bool:
    return getattr(_on_pool_thread, "active", False)


def run_all(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Results of ``jobs`` in order, run on the shared pool; inline when there is one job
    or when called from a pool thread (a job never waits behind its own pool)."""
    if len(jobs) <= 1 or on_pool_thread():
        return [job() for job in jobs]
    futures = [shared_pool().submit(_marked, job) for job in jobs]
    return [f.result() for f in futures]


def _marked(job: Callable[[], Any]) -> Any:
    _on_pool_thread.active = True
    try:
        return job()
    finally:
        _on_pool_thread.active = False


def warm_imaging_kernels() -> None:
    """Compile (or load from numba's disk cache) the imaging kernels for the array types
    the pipelines use, so the first job does not pay for it; a no-op without numba."""
    if not ENABLED:
        return
    import numpy as np
    from PIL import Image

    from worker.imaging import compose, masks
    from worker.imaging.decode import DecodedImage

    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    image = DecodedImage(rgb=rgb, alpha=None, width=4, height=4, format="PNG", mode="RGB")
    mask = np.eye(4, dtype=bool)
    compose.cutout(image, mask)
    compose.cutout_png(image, mask)
    for labels in (mask.astype(np.int32), mask.astype(np.uint16)):
        compose.overlay(image, labels)
        compose.overlay_png(image, labels)
        masks.rle_encode_labels(labels, [1])
    compose.overlay(image, [mask])
    masks.rle_encode(mask)


def split_rows(fn: Callable[[int, int], Any], height: int, *, min_rows: int = 64,
               pieces: Optional[int] = None) -> list[Any]:
    """``fn(y0, y1)`` over consecutive row ranges covering ``0..height``, in parallel:
    ``pieces`` ranges (default one per thread), none shorter than ``min_rows``."""
    count = pieces if pieces is not None else THREADS
    count = max(1, min(count, height // max(1, min_rows)))
    bounds = [round(i * height / count) for i in range(count + 1)]
    return run_all([
        (lambda a=a, b=b: fn(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a
    ])
