"""Embedding affinity on a cluster of real worker processes: prompts on an image go to the
worker holding its embedding, concurrent cold jobs encode it once (the encode lease), a
killed holder's queue goes back to the shared queue and its image is encoded once more;
plus the claims, the lease and the sweep against real Redis."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Iterator

import pytest
import redis
from celery import Celery
from PIL import Image

from api_client.client import SegmentationClient
from config.affinity import Router, affinity_key, lease_key, worker_queue
from config.celeryconfig import celery_config
from config.contract import parse_request
from config.settings import Settings
from config.status import StatusStore
from config.workers import WorkerRegistry
from tests.support.images import encode, noise_rgb
from tests.support.stack import Stack, make_stack
from worker.affinity import Reroute, WorkerAffinity
from worker.inference.cache import EmbeddingCache
from worker.recovery import Recovery

TTL_S = 2.0
WAIT_S = 60


def _image(seed: int) -> bytes:
    return encode(Image.fromarray(noise_rgb(96, 64, seed=seed)), "PNG")


@pytest.fixture(scope="module")
def cluster(redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory, module_monkeypatch) -> Iterator[Stack]:
    """Three SAM-only workers (threads, concurrency 1) whose encodes take a second."""
    s = make_stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory.mktemp("logs"),
                   module_monkeypatch, worker_heartbeat_ttl_s=TTL_S, load_models=["sam2"])  # fmt: skip
    workers = [s.worker(name=f"aff{i}", concurrency=1, imports=["tests.support.slow_encode"]) for i in range(3)]
    for w in workers:
        w.env["SLOW_ENCODE_S"] = "1"
        w.start(wait=False)
    for w in workers:
        w.wait_ready(timeout=120)
    yield s
    s.stop_workers()


def _misses(statuses) -> int:
    return sum(st.result["embedding_cache"] == "miss" for st in statuses)


def test_prompts_follow_the_embedding_and_refine_on_its_holder(cluster: Stack) -> None:
    client = cluster.client
    image = cluster.upload(_image(1), "click.png")
    first = client.segment(image, {"point": [20, 20]})
    assert first.queue == cluster.settings.queue_interactive  # nobody holds it yet
    holder = first.wait(timeout=WAIT_S).worker
    jobs = [client.segment(image, {"point": [10 + 15 * i, 30]}) for i in range(4)]
    assert {j.queue for j in jobs} == {worker_queue(holder)}
    done = [j.wait(timeout=WAIT_S) for j in jobs]
    assert {st.worker for st in done} == {holder}
    assert [st.result["embedding_cache"] for st in done] == ["hit"] * 4
    # a click refining the last one runs where its mask is, and a cutout shares the embedding
    refined = client.segment(image, {"point": [60, 40], "refine": jobs[-1].id}).wait(timeout=WAIT_S)
    assert refined.worker == holder and refined.result["refined"] == [jobs[-1].id]
    cut = client.cutout(image, {"box": [5, 5, 40, 30]})
    assert cut.queue == worker_queue(holder) and cut.wait(timeout=WAIT_S).result["embedding_cache"] == "hit"
    boxes = client.segment(image, prompts=[{"box": [0, 0, 30, 30]}, {"box": [40, 20, 50, 40]}]).wait(timeout=WAIT_S)
    assert boxes.worker == holder and len(boxes.result["prompts"]) == 2


def test_concurrent_cold_jobs_encode_the_image_once(cluster: Stack) -> None:
    client = cluster.client
    image = cluster.upload(_image(2), "cold.png")
    jobs = [client.segment(image, {"point": [10 + 20 * i, 20]}) for i in range(3)]
    assert {j.queue for j in jobs} == {cluster.settings.queue_interactive}
    done = [j.wait(timeout=WAIT_S) for j in jobs]
    assert _misses(done) == 1, [(st.worker, st.result["embedding_cache"]) for st in done]
    encoder = next(st.worker for st in done if st.result["embedding_cache"] == "miss")
    assert {st.worker for st in done} == {encoder}  # the others waited and followed it


def test_a_killed_holders_queue_is_drained_and_its_image_encoded_once_more(cluster: Stack) -> None:
    client = cluster.client
    image = cluster.upload(_image(3), "killed.png")
    holder = client.segment(image, {"point": [20, 20]}).wait(timeout=WAIT_S).worker
    victim = next(w for w in cluster.workers if w.hostname == holder)
    victim.kill()
    jobs = [client.segment(image, {"point": [10 + 15 * i, 30]}) for i in range(4)]
    assert jobs[0].queue == worker_queue(holder)  # its heartbeat has not expired yet
    done = [j.wait(timeout=WAIT_S) for j in jobs]
    assert holder not in {st.worker for st in done}
    assert _misses(done) == 1
    broker = redis.Redis.from_url(cluster.settings.redis_url)
    assert broker.llen(worker_queue(holder)) == 0
    # the router no longer sends anything to the dead worker
    assert client.segment(image, {"point": [50, 50]}).queue != worker_queue(holder)


def test_affinity_off_sends_every_job_to_the_shared_queue(cluster: Stack) -> None:
    client = SegmentationClient(cluster.settings.model_copy(update={"affinity": False}))
    image = cluster.upload(_image(4), "off.png")
    holder = client.segment(image, {"point": [20, 20]}).wait(timeout=WAIT_S).worker
    assert holder and client.segment(image, {"point": [30, 30]}).queue == cluster.settings.queue_interactive


# --- the parts, against real Redis -----------------------------------------------------------


def _request(**extra) -> object:
    return parse_request({"task": "segment", "image": "s3://b/k.png", **extra}, max_bytes=65536, max_points=64)


def _beat(registry: WorkerRegistry, *hosts: str) -> None:
    for h in hosts:
        registry.beat(h, {"queues": ["segq.interactive", worker_queue(h)]})


def test_claims_route_to_live_holders_and_leave_with_eviction(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    registry = WorkerRegistry(client, ttl_s=5)
    router = Router(client)
    w1 = WorkerAffinity(client, "w1@t", heartbeat_ttl_s=5)
    request = _request()
    assert router.route(request, "shared") == "shared"
    w1.held(request.affinity_id, "sam2|s3://b/k.png#etag")
    assert router.route(request, "shared") == "shared"  # w1 has no heartbeat
    _beat(registry, "w1@t")
    assert router.route(request, "shared") == worker_queue("w1@t")
    assert router.route(_request(image_id="other"), "shared") == "shared"
    assert router.route(_request(task="panoptic"), "shared") == "shared"  # not a SAM job

    ttl = client.pttl(affinity_key(request.affinity_id))
    client.pexpire(affinity_key(request.affinity_id), 1000)
    w1.refresh()  # the heartbeat extends the claim
    assert client.pttl(affinity_key(request.affinity_id)) > 1000 and ttl > 1000
    client.delete(affinity_key(request.affinity_id))  # lost (a Redis restart without persistence)
    w1.refresh()
    assert client.get(affinity_key(request.affinity_id)) == b"w1@t"

    # evicted from the cache: the claim goes; a claim taken over by w2 is left alone
    cache = EmbeddingCache(max_bytes=100, on_evict=w1.evicted)

    class Blob:
        nbytes = 60

    cache.put("sam2|s3://b/k.png#etag", Blob())
    cache.put("sam2|other", Blob())  # evicts the first
    assert client.get(affinity_key(request.affinity_id)) is None
    w1.held(request.affinity_id, "sam2|s3://b/k.png#etag")
    client.set(affinity_key(request.affinity_id), "w2@t")
    w1.evicted("sam2|s3://b/k.png#etag")
    assert client.get(affinity_key(request.affinity_id)) == b"w2@t"


def test_the_lease_makes_a_second_worker_wait_and_follow(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    registry = WorkerRegistry(client, ttl_s=5)
    _beat(registry, "w1@t", "w2@t")
    w1 = WorkerAffinity(client, "w1@t", heartbeat_ttl_s=5)
    w2 = WorkerAffinity(client, "w2@t", heartbeat_ttl_s=5)
    identity = "s3://b/lease.png"
    entered, release = threading.Event(), threading.Event()

    def encode_on_w1() -> None:
        with w1.guard(identity).encoding("sam2|e"):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=encode_on_w1)
    t.start()
    assert entered.wait(10)
    assert client.get(lease_key(identity)) == b"w1@t"
    outcome: list = []

    def cold_on_w2() -> None:
        try:
            with w2.guard(identity).encoding("sam2|e"):
                outcome.append("encoded")
        except Reroute as move:
            outcome.append(move.hostname)

    t2 = threading.Thread(target=cold_on_w2)
    t2.start()
    time.sleep(0.3)
    assert outcome == []  # waiting for w1's embedding
    release.set()
    t.join(10)
    t2.join(10)
    assert outcome == ["w1@t"]  # followed it
    assert client.get(lease_key(identity)) is None and client.get(affinity_key(identity)) == b"w1@t"
    # a job already sent to w2's own queue encodes there instead of moving again
    with w2.guard(identity, may_reroute=False).encoding("sam2|e"):
        pass
    assert client.get(affinity_key(identity)) == b"w2@t"


def test_a_lease_of_a_dead_worker_is_void_and_an_abandoned_one_expires(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    registry = WorkerRegistry(client, ttl_s=5)
    _beat(registry, "w2@t", "w3@t")
    w2 = WorkerAffinity(client, "w2@t", heartbeat_ttl_s=5, lease_s=0.6)
    client.set(lease_key("img-a"), "dead@t", px=60_000)  # its worker has no heartbeat
    started = time.monotonic()
    with w2.guard("img-a").encoding("sam2|a"):
        assert client.get(lease_key("img-a")) == b"w2@t"
    assert time.monotonic() - started < 5
    client.set(lease_key("img-b"), "w3@t", px=600)  # alive, but it never finishes
    with w2.guard("img-b").encoding("sam2|b"):
        assert client.get(lease_key("img-b")) == b"w2@t"  # after the lease expired
    assert client.get(affinity_key("img-b")) == b"w2@t"


def test_the_sweep_moves_a_dead_workers_queue_to_the_shared_queue(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url)
    app = Celery("drain", config_source=celery_config(settings), set_as_current=False)
    client = redis.Redis.from_url(redis_url)
    registry = WorkerRegistry(client, ttl_s=5)
    _beat(registry, "live@t")
    ids = [uuid.uuid4().hex for _ in range(3)]
    for job_id in ids[:2]:
        app.send_task("segq.segment", args=[{}], task_id=job_id, queue=worker_queue("dead@t"))
    app.send_task("segq.overlay", args=[{}], task_id=ids[2], queue=worker_queue("dead@t"))
    app.send_task("segq.segment", args=[{}], task_id="mine", queue=worker_queue("live@t"))
    report = Recovery(app, registry, StatusStore(redis_url, ttl_s=60), interval_s=1).sweep()
    assert report.drained == {worker_queue("dead@t"): 3}
    assert client.llen(worker_queue("dead@t")) == 0 and client.llen(worker_queue("live@t")) == 1
    moved = [json.loads(m) for m in client.lrange(settings.queue_interactive, 0, -1)]
    assert sorted(m["headers"]["id"] for m in moved) == sorted(ids[:2])
    assert {m["properties"]["delivery_info"]["routing_key"] for m in moved} == {settings.queue_interactive}
    batch = json.loads(client.lrange(settings.queue_batch, 0, -1)[0])
    assert batch["headers"]["id"] == ids[2]


def test_a_worker_polls_its_own_queue_first_and_the_shared_ones_round_robin() -> None:
    from kombu.utils.scheduling import cycle_by_name

    settings = Settings()
    cycle = cycle_by_name(celery_config(settings)["broker_transport_options"]["queue_order_strategy"])()
    cycle.update(["segq.interactive", "segq.batch", worker_queue("w@t")])
    assert cycle.consume(3) == [worker_queue("w@t"), "segq.interactive", "segq.batch"]
    cycle.rotate("segq.interactive")
    assert cycle.consume(3) == [worker_queue("w@t"), "segq.batch", "segq.interactive"]


def test_the_queue_gauge_shows_a_workers_own_queue_while_jobs_wait_there(redis_url: str) -> None:
    from config.queues import QueueCollector

    settings = Settings(redis_url=redis_url)
    app = Celery("gauge", config_source=celery_config(settings), set_as_current=False)
    app.send_task("segq.segment", args=[{}], task_id="waiting", queue=worker_queue("w@t"))

    def depths() -> dict[str, float]:
        (family,) = [f for f in QueueCollector(redis_url, settings.queues).collect() if f.name == "segq_queue_depth"]
        return {s.labels["queue"]: s.value for s in family.samples}

    assert depths() == {settings.queue_interactive: 0, settings.queue_batch: 0, worker_queue("w@t"): 1}
    redis.Redis.from_url(redis_url).delete(worker_queue("w@t"))
    assert worker_queue("w@t") not in depths()
