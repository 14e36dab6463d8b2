"""The embedding cache: LRU by bytes, counters, one computation per key under concurrency,
and a cached embedding sparing the SAM 2 encoder."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from config.contract import Prompt
from config.settings import Settings
from worker.inference.cache import EmbeddingCache
from worker.inference.sam2 import Sam2Model
from worker.inference.sessions import create_session


@dataclass
class Blob:
    nbytes: int


def test_lru_evicts_least_recently_used_by_bytes() -> None:
    cache: EmbeddingCache[Blob] = EmbeddingCache(max_bytes=100)
    cache.put("a", Blob(40))
    cache.put("b", Blob(40))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", Blob(40))  # 120 > 100: "b" goes
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 80 and len(cache) == 2
    cache.put("d", Blob(90))  # needs both others out
    assert list(cache._items) == ["d"] and cache.nbytes == 90
    cache.put("huge", Blob(101))  # larger than the whole cache: not kept, nothing evicted
    assert "huge" not in cache and "d" in cache
    cache.put("d", Blob(10))  # replacing re-counts the bytes
    assert cache.nbytes == 10


def test_counts_hits_and_misses() -> None:
    cache: EmbeddingCache[Blob] = EmbeddingCache(max_bytes=100)
    assert cache.get("x") is None
    assert cache.get_or_compute("x", lambda: Blob(1)).nbytes == 1
    assert cache.get_or_compute("x", lambda: Blob(2)).nbytes == 1
    assert (cache.hits, cache.misses) == (1, 2)


def test_concurrent_misses_on_one_key_compute_once() -> None:
    cache: EmbeddingCache[Blob] = EmbeddingCache(max_bytes=1000)
    calls = []
    release = threading.Event()

    def compute() -> Blob:
        calls.append(1)
        release.wait(5)
        return Blob(10)

    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(cache.get_or_compute, "same", compute) for _ in range(8)]
        other = pool.submit(cache.get_or_compute, "other", lambda: Blob(5))
        assert other.result(5).nbytes == 5  # a different key is not held up
        release.set()
        results = [f.result(5) for f in futures]
    assert len(calls) == 1
    assert all(r is results[0] for r in results)
    assert cache.misses == 2 and cache.hits == 7
    assert cache._computing == {}


def test_a_failed_computation_caches_nothing() -> None:
    cache: EmbeddingCache[Blob] = EmbeddingCache(max_bytes=100)

    def fail() -> Blob:
        raise RuntimeError("decode failed")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("k", fail)
    assert "k" not in cache and cache._computing == {}
    assert cache.get_or_compute("k", lambda: Blob(3)).nbytes == 3


class CountingSession:
    """A real session that counts its runs."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.runs = 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self._session.run(*args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        self.runs += 1
        return self._session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def test_second_prompt_on_a_cached_image_runs_only_the_decoder(sam2_repo: Path) -> None:
    settings = Settings(providers=["CPUExecutionProvider"])
    encoder = CountingSession(create_session(sam2_repo / "encoder.onnx", settings))
    decoder = CountingSession(create_session(sam2_repo / "decoder.onnx", settings))
    model = Sam2Model(encoder, decoder, name="counting")
    cache: EmbeddingCache = EmbeddingCache(max_bytes=64 << 20)
    loads = []

    def load() -> Image.Image:
        loads.append(1)
        return Image.new("RGB", (640, 427), (90, 60, 30))

    first = model.embed_cached(load, "s3://b/k#etag1", cache)
    masks_a = model.predict(first, Prompt(point=(100, 100)))
    second = model.embed_cached(load, "s3://b/k#etag1", cache)
    masks_b = model.predict(second, Prompt(point=(400, 300)))
    assert second is first
    assert (encoder.runs, decoder.runs, len(loads)) == (1, 2, 1)
    assert (cache.hits, cache.misses) == (1, 1)
    assert not np.array_equal(masks_a[0].mask, masks_b[0].mask)

    model.embed_cached(load, "s3://b/k#etag2", cache)  # a new version is a new image
    assert encoder.runs == 2
    assert all(key.startswith("counting|") for key in cache._items)


def test_cache_is_bounded_by_embedding_bytes(sam2_repo: Path) -> None:
    settings = Settings(providers=["CPUExecutionProvider"])
    encoder = CountingSession(create_session(sam2_repo / "encoder.onnx", settings))
    model = Sam2Model(encoder, create_session(sam2_repo / "decoder.onnx", settings))
    image = Image.new("RGB", (64, 48))
    size = model.encode(image).nbytes
    assert size == 4 * (32 * 256 * 256 + 64 * 128 * 128 + 256 * 64 * 64)
    cache: EmbeddingCache = EmbeddingCache(max_bytes=2 * size)
    for key in ("one", "two", "three"):
        model.embed_cached(image, key, cache)
    assert len(cache) == 2 and cache.nbytes == 2 * size
    runs = encoder.runs
    model.embed_cached(image, "one", cache)  # evicted: encoded again
    assert encoder.runs == runs + 1
    model.embed_cached(image, "three", cache)  # still there
    assert encoder.runs == runs + 1
