"""The worker's side of embedding affinity (``config.affinity`` has the idea and the keys).

``WorkerAffinity`` belongs to one worker process (one hostname):

- ``held(identity, entry)``: this worker now holds the embedding cached under ``entry`` for
  the image ``identity``; ``segq:affinity:<identity>`` names it, with a TTL that ``refresh``
  (run with each heartbeat) keeps extending;
- ``evicted(entry)``: the embedding cache dropped ``entry`` (its ``on_evict``); the claim is
  deleted if it still names this worker and no other entry of that image remains;
- ``guard(identity, may_reroute)``: what a job wraps around a cold encode. Before encoding
  it takes a short lease, ``segq:encoding:<identity>`` (SET NX PX). If another live worker
  holds the lease, the job waits (bounded by the lease) for that worker's claim and then
  ``Reroute``s to it, or encodes itself once the lease is gone; a lease whose worker died is
  void at once. A job already on this worker's own queue never moves again (no ping-pong):
  it encodes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import redis

from config.affinity import affinity_key, consuming_holder, lease_key
from config.workers import alive_key

log = logging.getLogger("segq.affinity")

# delete / extend a key only while it still names us
_DELETE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# extend our claim, or make it again if it is gone (expired through a Redis outage, say);
# a claim another worker has taken meanwhile is left to it
_EXTEND_IF = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if not v then return redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
return 0
"""
POLL_S = 0.05


class Reroute(Exception):
    """The job should run on ``hostname``, which holds (or is making) its image's embedding."""

    def __init__(self, hostname: str, identity: str) -> None:
        super().__init__(f"{identity} is held by {hostname}")
        self.hostname = hostname
        self.identity = identity


class WorkerAffinity:
    def __init__(
        self,
        client: redis.Redis,
        hostname: str,
        *,
        heartbeat_ttl_s: float,
        lease_s: float = 30.0,
    ) -> None:
        self.redis = client
        self.hostname = hostname
        self.record_ttl_ms = int(max(4 * heartbeat_ttl_s, 10.0) * 1000)
        self.lease_ms = max(1, int(lease_s * 1000))
        self._lock = threading.Lock()
        self._identity_of: dict[str, str] = {}  # cache entry -> image identity
        self._entries: dict[str, set[str]] = {}  # image identity -> cache entries
        self._delete_if = client.register_script(_DELETE_IF)
        self._extend_if = client.register_script(_EXTEND_IF)

    # --- claims -----------------------------------------------------------------------

    def held(self, identity: str, entry: str) -> None:
        """This worker holds ``entry`` (``identity``'s embedding): claim the image. Cheap
        when already claimed (no Redis call)."""
        with self._lock:
            known = self._identity_of.get(entry) == identity
            self._identity_of[entry] = identity
            self._entries.setdefault(identity, set()).add(entry)
        if not known:
            self.redis.set(affinity_key(identity), self.hostname, px=self.record_ttl_ms)

    def evicted(self, entry: str) -> None:
        """The cache dropped ``entry``; unclaim its image unless another entry holds it."""
        with self._lock:
            identity = self._identity_of.pop(entry, None)
            if identity is None:
                return
            entries = self._entries.get(identity, set())
            entries.discard(entry)
            if entries:
                return
            self._entries.pop(identity, None)
        self._delete_if(keys=[affinity_key(identity)], args=[self.hostname])

    def refresh(self) -> None:
        """Extend every claim of this worker, or make it again where it is gone (run with
        each heartbeat); a claim another worker took meanwhile is left to it."""
        with self._lock:
            identities = list(self._entries)
        if not identities:
            return
        pipe = self.redis.pipeline(transaction=False)
        for identity in identities:
            self._extend_if(keys=[affinity_key(identity)], args=[self.hostname, self.record_ttl_ms], client=pipe)
        pipe.execute()

    def drop_all(self) -> None:
        """A warm shutdown: unclaim everything at once."""
        with self._lock:
            identities = list(self._entries)
            self._entries.clear()
            self._identity_of.clear()
        for identity in identities:
            try:
                self._delete_if(keys=[affinity_key(identity)], args=[self.hostname])
            except redis.RedisError:
                return  # they expire by themselves

    @property
    def identities(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    # --- the encode lease ----------------------------------------------------------------

    def guard(self, identity: str, *, may_reroute: bool = True) -> "EncodeGuard":
        return EncodeGuard(self, identity, may_reroute)

    def _other_holder(self, identity: str) -> Optional[str]:
        raw = self.redis.get(affinity_key(identity))
        if raw is None:
            return None
        hostname = raw.decode()
        if hostname == self.hostname or not consuming_holder(self.redis, hostname):
            return None
        return hostname

    @contextmanager
    def _lease(self, identity: str, entry: str, may_reroute: bool) -> Iterator[None]:
        key = lease_key(identity)
        deadline = time.monotonic() + self.lease_ms / 1000 + 1.0
        owned = False
        waited = False
        while True:
            if may_reroute:
                holder = self._other_holder(identity)
                if holder is not None:
                    raise Reroute(holder, identity)
            if self.redis.set(key, self.hostname, nx=True, px=self.lease_ms):
                owned = True
                break
            if not may_reroute:
                break  # a job sent to this worker encodes here; no waiting for others
            raw = self.redis.get(key)
            owner = raw.decode() if raw is not None else None
            if owner is None:
                continue  # released just now: look again
            if owner == self.hostname:
                break  # another of this worker's own jobs (another model) is encoding it
            if self.redis.get(alive_key(owner)) is None:
                self._delete_if(keys=[key], args=[owner])  # its worker died: void
                log.warning("encode lease of %s on %s was void: its worker is dead", owner, identity)
                continue
            if time.monotonic() > deadline:
                log.warning("waited past the encode lease of %s on %s; encoding here", owner, identity)
                break
            if not waited:
                log.info("%s is being encoded by %s; waiting for it", identity, owner)
                waited = True
            time.sleep(POLL_S)
        try:
            yield
            self.held(identity, entry)
        finally:
            if owned:
                try:
                    self._delete_if(keys=[key], args=[self.hostname])
                except redis.RedisError:
                    pass  # it expires


class EncodeGuard:
    """One job's view: ``encoding(entry)`` wraps a cold encode, ``held(entry)`` notes a hit."""

    def __init__(self, affinity: WorkerAffinity, identity: str, may_reroute: bool) -> None:
        self.affinity = affinity
        self.identity = identity
        self.may_reroute = may_reroute

    def encoding(self, entry: str):
        return self.affinity._lease(self.identity, entry, self.may_reroute)  # noqa: SLF001

    def held(self, entry: str) -> None:
        self.affinity.held(self.identity, entry)
