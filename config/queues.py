"""Queue depth and in-flight jobs per queue, read from the Redis broker at scrape time.

Flower has no such gauge, and an autoscaler (KEDA, an HPA on an external metric) needs
one that works even when no worker runs, so ``serve_metrics`` serves it from the worker's
metrics endpoint and from ``segq metrics`` alike.

Kombu's Redis transport keeps each queue as a list named after the queue, and every
delivered-but-unacknowledged message in the ``unacked`` hash as ``[message, exchange,
routing_key]``: those are the jobs in flight.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

import redis
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from config.errors import InvalidConfig
from config.settings import Settings

UNACKED_HASH = "unacked"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def readable_broker(broker_url: str) -> bool:
    """Whether the gauges can be read from this broker: only kombu's Redis transport
    keeps queues as lists that can be counted from outside."""
    return broker_url.startswith(REDIS_SCHEMES)


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{queue: (waiting, in_flight)}``."""
    queues = list(queues)
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.llen(q)
    waiting = pipe.execute()
    in_flight = dict.fromkeys(queues, 0)
    for raw in client.hscan_iter(UNACKED_HASH):
        try:
            routing_key = json.loads(raw[1])[2]
        except (ValueError, IndexError, TypeError):
            continue
        if routing_key in in_flight:
            in_flight[routing_key] += 1
    return {q: (int(w), in_flight[q]) for q, w in zip(queues, waiting)}


def own_queues(client: redis.Redis) -> list[str]:
    """Workers' own queues (embedding affinity) that hold jobs now: Redis drops an empty
    list, so a worker's queue shows only while prompts wait for it."""
    from config.affinity import WORKER_QUEUE_PREFIX  # config.affinity imports kombu; keep it lazy

    found = client.scan_iter(match=f"{WORKER_QUEUE_PREFIX}*", count=500, _type="list")
    return sorted({k.decode() if isinstance(k, bytes) else k for k in found})


class QueueCollector(Collector):
    def __init__(self, broker_url: str, queues: Iterable[str]) -> None:
        self.client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        self.queues = list(queues)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = GaugeMetricFamily("segq_queue_depth", "Jobs waiting in the queue", labels=["queue"])
        flight = GaugeMetricFamily("segq_queue_in_flight", "Jobs delivered and not yet acknowledged", labels=["queue"])
        up = GaugeMetricFamily("segq_broker_up", "1 when the broker answered this scrape")
        try:
            depths = queue_depths(self.client, [*self.queues, *own_queues(self.client)])
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        for q, (w, f) in depths.items():
            waiting.add_metric([q], w)
            flight.add_metric([q], f)
        up.add_metric([], 1)
        yield from (waiting, flight, up)


def serve_metrics(
    settings: Settings,
    port: int,
    *,
    host: str = "0.0.0.0",
    registry: CollectorRegistry = REGISTRY,
    require_gauges: bool = False,
) -> Any:
    """Serve ``registry``, with the queue gauges of ``settings``' broker where it is Redis,
    over HTTP on ``port`` (0: any free one); returns the server (its ``server_port``).
    ``require_gauges``: refuse a broker the gauges cannot read instead of serving without."""
    if readable_broker(settings.broker):
        registry.register(QueueCollector(settings.broker, settings.queues))
    elif require_gauges:
        scheme = settings.broker.split(":", 1)[0]  # not the whole URL: it may hold a password
        raise InvalidConfig(f"queue depth is read from a Redis broker, not {scheme}://")
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
