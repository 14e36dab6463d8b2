"""Embedding affinity: prompts on an image go to the worker that holds its SAM 2 embedding.

The encoder costs about 80 decoders, and each worker process caches the embeddings it made.
With N workers Celery hands a click to any of them, so only about 1 in N finds its image's
embedding. So:

- a worker that holds an image's embedding says so in Redis: ``segq:affinity:<identity>``
  names its hostname, with a TTL its heartbeat keeps refreshing; eviction from its cache or
  its death removes the claim (``worker.affinity``);
- each worker also consumes a queue of its own, ``segq.worker.<hostname>``;
- the producer (``Router``) sends a SAM job (segment, cutout, overlay with prompts) on an
  image held by a live worker to that worker's queue, and anything else to the shared queues.
  A job routed to a worker that then dies is not stranded: the recovery sweep moves a dead
  worker's queue back onto the shared ones (``worker.recovery``).

An image's identity is the caller's ``image_id`` when the job gives one, else its S3 URI
with its version id (``JobRequest.affinity_id``). The keys hold a digest of it, so any
identity makes a short, plain key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Optional

import redis
from kombu.utils.scheduling import round_robin_cycle

from config.contract import JobRequest
from config.workers import alive_key

log = logging.getLogger("segq.affinity")

AFFINITY_KEY = "segq:affinity:{digest}"
LEASE_KEY = "segq:encoding:{digest}"
WORKER_QUEUE_PREFIX = "segq.worker."


def digest(identity: str) -> str:
    return hashlib.sha1(identity.encode()).hexdigest()


def affinity_key(identity: str) -> str:
    """Where the hostname of the worker holding ``identity``'s embedding is kept."""
    return AFFINITY_KEY.format(digest=digest(identity))


def lease_key(identity: str) -> str:
    """The short lease a worker takes before encoding ``identity`` (one encode per image)."""
    return LEASE_KEY.format(digest=digest(identity))


def worker_queue(hostname: str) -> str:
    """The queue only ``hostname`` consumes."""
    return f"{WORKER_QUEUE_PREFIX}{hostname}"


def queue_owner(queue: Optional[str]) -> Optional[str]:
    """The hostname whose own queue ``queue`` is, or None for a shared queue."""
    if queue and queue.startswith(WORKER_QUEUE_PREFIX):
        return queue[len(WORKER_QUEUE_PREFIX) :]
    return None


def consuming_holder(client: redis.Redis, hostname: str) -> bool:
    """Whether ``hostname`` is alive (its heartbeat has not expired) and consumes its own queue."""
    raw = client.get(alive_key(hostname))
    if raw is None:
        return False
    try:
        queues = json.loads(raw).get("queues", [])
    except (ValueError, AttributeError):
        return False
    return worker_queue(hostname) in queues


class OwnQueueFirst(round_robin_cycle):
    """kombu's Redis transport polls a worker's queues in this order (its
    ``queue_order_strategy``): the worker's own queue first, then the shared ones round-robin
    as usual. Jobs on the own queue are prompts on embeddings it holds (a decoder run,
    milliseconds), so they never wait behind the cold encodes (seconds each) that the shared
    queue brings; without this a holder alternated, and a click waited for one encode per
    click queued before it (bench/README.md, "Click sessions")."""

    def consume(self, n: int) -> list:
        items = self.items[:n]
        own = [q for q in items if str(q).startswith(WORKER_QUEUE_PREFIX)]
        return own + [q for q in items if not str(q).startswith(WORKER_QUEUE_PREFIX)]


class Router:
    """The producer's side: which queue a job goes to."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def holder(self, identity: str) -> Optional[str]:
        """The live worker holding ``identity``'s embedding, if any."""
        raw = self.redis.get(affinity_key(identity))
        if raw is None:
            return None
        hostname = raw.decode() if isinstance(raw, bytes) else raw
        return hostname if consuming_holder(self.redis, hostname) else None

    def route(self, request: JobRequest, shared_queue: str) -> str:
        """``request``'s queue: its image's holder's own queue for a SAM job on a held
        image, else ``shared_queue``. Routing is an optimisation: a Redis error here sends
        the job to the shared queue."""
        if not request.uses_sam:
            return shared_queue
        try:
            found = self.holder(request.affinity_id)
        except redis.RedisError as err:
            log.warning("affinity lookup failed (%s); job goes to %s", err, shared_queue)
            return shared_queue
        return worker_queue(found) if found else shared_queue
