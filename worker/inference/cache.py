"""A per-process LRU of SAM 2 image embeddings, bounded by bytes.

Keys name an image's content (``"s3://bucket/key#etag"``), so a second prompt on the same
object skips the encoder. Concurrent misses on one key compute it once: the others wait for
that result instead of running the encoder again. ``on_evict`` hears of every key that leaves
the cache to make room (the worker then stops advertising that it holds the image).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, Optional, Protocol, TypeVar


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=Sized)


class EmbeddingCache(Generic[T]):
    def __init__(self, max_bytes: int, *, on_evict: Optional[Callable[[str], None]] = None) -> None:
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self.hits = 0
        self.misses = 0
        self.nbytes = 0
        self._items: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()
        self._computing: dict[str, tuple[threading.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> Optional[T]:
        """The value under ``key`` (now the most recently used), or None; counts a hit or miss."""
        value = self._lookup(key)
        with self._lock:
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
        return value

    def peek(self, key: str) -> Optional[T]:
        """The value under ``key`` or None, counting neither a hit nor a miss."""
        return self._lookup(key)

    def put(self, key: str, value: T) -> None:
        """Store ``value``, evicting least recently used entries to stay within ``max_bytes``.
        A value larger than the whole cache is not stored."""
        size = value.nbytes
        gone: list[str] = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            if size <= self.max_bytes:
                self._items[key] = value
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    evicted_key, evicted = self._items.popitem(last=False)
                    self.nbytes -= evicted.nbytes
                    gone.append(evicted_key)
        self._evicted(gone)

    def _evicted(self, keys: list[str]) -> None:
        if self.on_evict is None:
            return
        for key in keys:  # outside the lock: the callback may talk to Redis
            try:
                self.on_evict(key)
            except Exception:  # noqa: BLE001  an eviction must never fail a job
                import logging

                logging.getLogger("segq.worker").exception("on_evict(%s) failed", key)

    def get_or_compute(self, key: str, compute: Callable[[], T]) -> T:
        value = self._lookup(key)
        if value is None:
            with self._computing_lock(key):
                value = self._lookup(key)  # another thread may have computed it meanwhile
                if value is None:
                    with self._lock:
                        self.misses += 1
                    value = compute()
                    self.put(key, value)
                    return value
        with self._lock:
            self.hits += 1
        return value

    def clear(self) -> None:
        with self._lock:
            gone = list(self._items)
            self._items.clear()
            self.nbytes = 0
        self._evicted(gone)

    def _lookup(self, key: str) -> Optional[T]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    @contextmanager
    def _computing_lock(self, key: str) -> Iterator[None]:
        with self._lock:
            lock, waiters = self._computing.setdefault(key, (threading.Lock(), [0]))
            waiters[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                waiters[0] -= 1
                if waiters[0] == 0:
                    del self._computing[key]
