"""What operators see: Flower's view of workers and tasks, the worker's Prometheus
metrics, the standalone queue exporter (``segq metrics``) and ``segq health``, all against
a real worker, a password-protected Redis broker and S3 with signature checks."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families

from api_client.dev.localstack import RedisServer, free_ports
from config.affinity import worker_queue
from config.contract import TASK_SEGMENT, JobState
from config.errors import JobFailed
from tests.support.images import sample_jpeg
from tests.support.stack import Stack, make_stack
from tests.support.stack import REPO

T = TypeVar("T")
REDIS_PASSWORD = "redis-pw-7f3a91c2"
FLOWER_AUTH = ("ops", "flower-pw-2b8e")
PHOTO = sample_jpeg()
SEGQ = Path(sys.executable).with_name("segq")  # the installed console script


def _get(url: str, auth: tuple[str, str] | None = None, timeout: float = 10) -> str:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.read().decode()


def _poll(probe: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    """The first truthy ``probe()`` within ``timeout`` seconds; connection errors while a
    server starts count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
            last = value
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{what} not seen within {timeout}s (last: {last!r})")


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, labels): value}`` from a Prometheus endpoint."""
    text = _get(f"http://127.0.0.1:{port}/metrics")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def _segq(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The ``segq`` console script, as an operator or a container health check runs it."""
    return subprocess.run(
        [str(SEGQ), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


class _Process:
    """A long-running subprocess (Flower, the exporter) with its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=open(log, "wb"),
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory) -> Iterator[RedisServer]:
    """A broker with a password, so the test can look for it in what Flower serves."""
    server = RedisServer(password=REDIS_PASSWORD, data_dir=tmp_path_factory.mktemp("redis-auth"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="module")
def obs(secured_redis, s3_server, sam2_repo, detr_repo, metrics_port, tmp_path_factory,
        module_monkeypatch) -> Iterator[Stack]:
    """A stack whose one worker serves Prometheus metrics on ``metrics_port``."""
    s = make_stack(secured_redis, s3_server, sam2_repo, detr_repo, tmp_path_factory.mktemp("logs"),
                   module_monkeypatch, metrics_port=metrics_port)
    s.worker(name="obs").start()
    yield s
    s.stop_workers()


@pytest.fixture(scope="module")
def flower(obs: Stack) -> Iterator[str]:
    """A real Flower on a free loopback port, talking to the stack's broker; its URL."""
    port = free_ports(1)[0]
    proc = _Process(
        [sys.executable, "-m", "celery", "-A", "worker.celery:app", "flower", f"--port={port}",
         "--address=127.0.0.1", f"--basic-auth={':'.join(FLOWER_AUTH)}"],
        obs.env(), obs.log_dir / "flower.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _poll(lambda: proc.proc.poll() is None and _get(f"{url}/healthcheck"), "flower up", 30)
    except TimeoutError:
        proc.stop()
        raise AssertionError(f"flower did not start:\n{proc.log()[-3000:]}") from None
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def photo_uri(obs: Stack) -> str:
    return obs.upload(PHOTO, "photo.jpg")


# --- Flower -----------------------------------------------------------------------------


def test_flower_shows_the_worker_and_the_finished_task_without_secrets(obs, flower, photo_uri):
    worker = obs.workers[0].hostname
    workers = _poll(
        lambda: (w := json.loads(_get(f"{flower}/api/workers?refresh=1", FLOWER_AUTH))).get(worker) and w,
        "the worker in Flower",
    )
    assert TASK_SEGMENT in workers[worker]["registered"]
    assert {q["name"] for q in workers[worker]["active_queues"]} == {
        obs.settings.queue_interactive, obs.settings.queue_batch, worker_queue(worker)}

    job = obs.client.segment(photo_uri, {"point": [321, 123]})
    assert job.wait(timeout=60).state is JobState.succeeded
    info = _poll(
        lambda: (t := json.loads(_get(f"{flower}/api/task/info/{job.id}", FLOWER_AUTH)))["state"]
        == "SUCCESS" and t,
        "the finished task in Flower",
    )
    assert info["name"] == TASK_SEGMENT and info["worker"] == worker
    assert json.loads(info["args"])[0]["image"] == photo_uri
    assert json.loads(info["args"])[0]["prompt"] == {"point": [321, 123]}
    listed = json.loads(_get(f"{flower}/api/tasks", FLOWER_AUTH))
    assert listed[job.id]["name"] == TASK_SEGMENT

    pages = ["/api/workers?refresh=1", "/api/tasks", f"/api/task/info/{job.id}",
             "/api/queues/length", "/api/task/types", "/", "/workers", f"/worker/{worker}",
             "/tasks", f"/task/{job.id}", "/broker", "/metrics"]
    secrets = {"redis password": REDIS_PASSWORD, "S3 secret key": obs.s3.secret_key}
    broker_address = f"@127.0.0.1:{obs.redis.port}/"  # where a password would sit in a URL
    assert broker_address in _get(f"{flower}/api/workers?refresh=1", FLOWER_AUTH)
    for page in pages:
        body = _get(flower + page, FLOWER_AUTH)
        for what, secret in secrets.items():
            assert secret not in body, f"Flower's {page} shows the {what}"


def test_flower_refuses_requests_without_its_password(flower):
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(f"{flower}/api/workers")
    assert info.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(f"{flower}/api/tasks", ("ops", "wrong"))
    assert info.value.code == 401


# --- the worker's metrics ---------------------------------------------------------------


def test_worker_metrics_count_jobs_stages_cache_and_models(obs, metrics_port, photo_uri):
    before = _scrape(metrics_port)
    client = obs.client
    fresh = obs.upload(PHOTO, "fresh.jpg")  # a new object: its first prompt misses the cache
    assert client.segment(fresh, {"point": [100, 100]}).wait(timeout=60).state is JobState.succeeded
    hit = client.segment(fresh, {"point": [600, 400]}).wait(timeout=60)
    assert hit.result["embedding_cache"] == "hit"
    with pytest.raises(JobFailed):
        client.segment(fresh, {"point": [99999, 1]}).wait(timeout=60)
    after = _scrape(metrics_port)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("segq_jobs_total", task=TASK_SEGMENT, state="succeeded", code="") == 2
    assert delta("segq_jobs_total", task=TASK_SEGMENT, state="failed", code="prompt_out_of_bounds") == 1
    assert delta("segq_embedding_cache_total", result="miss") == 1
    assert delta("segq_embedding_cache_total", result="hit") == 1
    for stage in ("download", "decode", "encode_image", "decode_prompt", "encode_output", "upload"):
        assert delta("segq_stage_seconds_count", task=TASK_SEGMENT, stage=stage) == 2, stage
        assert delta("segq_stage_seconds_sum", task=TASK_SEGMENT, stage=stage) > 0, stage
    assert _value(after, "segq_model_load_seconds") > 0
    assert _value(after, "segq_execution_provider", model="sam2", provider="CPUExecutionProvider") == 1
    assert _value(after, "segq_execution_provider", model="detr", provider="CPUExecutionProvider") == 1


# --- queue gauges: the worker's endpoint and `segq metrics` -----------------------------


@pytest.fixture(scope="module")
def exporter(obs: Stack, tmp_path_factory) -> Iterator[int]:
    """``segq metrics`` for the stack's broker on a free port, with no worker of its own."""
    port = free_ports(1)[0]
    proc = _Process([sys.executable, "-m", "api_client.cli", "metrics", "--port", str(port),
                     "--host", "127.0.0.1"], obs.env(), obs.log_dir / "exporter.log")
    try:
        _poll(lambda: proc.proc.poll() is None and _scrape(port), "the exporter", 30)
    except TimeoutError:
        proc.stop()
        raise AssertionError(f"segq metrics did not start:\n{proc.log()[-3000:]}") from None
    yield port
    proc.stop()


def test_queue_gauges_show_waiting_and_in_flight_jobs(obs, metrics_port, exporter, photo_uri):
    queue, other = obs.settings.queue_interactive, obs.settings.queue_batch
    worker = obs.workers[0].hostname
    control = obs.client.celery.control
    control.cancel_consumer(queue, destination=[worker], reply=True, timeout=5)
    try:
        # an image no worker holds yet, so the jobs go to the shared queue (embedding affinity)
        fresh = obs.upload(PHOTO, "gauges.jpg")
        jobs = [obs.client.segment(fresh, {"point": [10 * i + 5, 20]}) for i in range(3)]
        # Take one message as a worker does (acks late): it leaves the queue and is in flight.
        with Connection(obs.settings.broker) as conn, conn.SimpleQueue(queue) as q:
            message = q.get(timeout=5)
            for port in (metrics_port, exporter):
                seen = _scrape(port)
                assert _value(seen, "segq_queue_depth", queue=queue) == 2, port
                assert _value(seen, "segq_queue_in_flight", queue=queue) == 1, port
                assert _value(seen, "segq_queue_depth", queue=other) == 0, port
                assert _value(seen, "segq_broker_up") == 1, port
            message.requeue()
    finally:
        control.add_consumer(queue, destination=[worker], reply=True, timeout=5)
    assert all(job.wait(timeout=60).state is JobState.succeeded for job in jobs)
    drained = _scrape(exporter)
    assert _value(drained, "segq_queue_depth", queue=queue) == 0
    assert _value(drained, "segq_queue_in_flight", queue=queue) == 0


def test_exporter_serves_only_the_queue_gauges(exporter):
    names = {name for name, _ in _scrape(exporter)}
    assert names == {"segq_queue_depth", "segq_queue_in_flight", "segq_broker_up"}


def test_exporter_reports_a_broker_that_is_down(obs, tmp_path):
    port, dead = free_ports(2)
    env = {**obs.env(), "SEGQ_REDIS_URL": f"redis://127.0.0.1:{dead}/0"}
    proc = _Process([sys.executable, "-m", "api_client.cli", "metrics", "--port", str(port),
                     "--host", "127.0.0.1"], env, tmp_path / "exporter.log")
    try:
        seen = _poll(lambda: proc.proc.poll() is None and _scrape(port), "the exporter", 30)
        assert _value(seen, "segq_broker_up") == 0
        assert not any(name == "segq_queue_depth" for name, _ in seen)
    finally:
        proc.stop()


def test_exporter_refuses_a_broker_it_cannot_read(obs):
    env = {**obs.env(), "SEGQ_BROKER_URL": "amqp://guest:secret-pw@127.0.0.1:1//"}
    done = _segq(env, "metrics", "--port", str(free_ports(1)[0]))
    assert done.returncode == 2 and "invalid_config" in done.stderr
    assert "secret-pw" not in done.stderr


# --- segq health ------------------------------------------------------------------------


def test_health_of_a_ready_worker_exits_zero_with_providers_and_probe_time(obs):
    done = _segq(obs.env(), "health", "--hostname", obs.workers[0].hostname)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ready"] is True
    assert report["providers"] == {"sam2": "CPUExecutionProvider", "detr": "CPUExecutionProvider"}
    assert report["probe_ms"] >= 0


def test_health_of_a_missing_worker_exits_nonzero(obs):
    done = _segq(obs.env(), "health", "--hostname", "nobody@nowhere", "--timeout", "2")
    assert done.returncode == 1
    assert "no answer from nobody@nowhere" in done.stderr


def test_health_without_a_hostname_asks_every_worker_on_this_host(stack):
    """As a container's HEALTHCHECK runs it: no --hostname, whatever the worker is named."""
    worker = stack.worker(name="local", host=socket.gethostname(), concurrency=1).start()
    try:
        done = _segq(stack.env(), "health", "--timeout", "3")
        assert done.returncode == 0, done.stderr
        reports = json.loads(done.stdout)
        assert worker.hostname in reports and reports[worker.hostname]["ready"] is True
        assert all(name.endswith("@" + socket.gethostname()) for name in reports)
    finally:
        worker.terminate()


def test_health_with_redis_down_says_so_in_one_line(obs):
    dead = free_ports(1)[0]
    done = _segq({**obs.env(), "SEGQ_REDIS_URL": f"redis://127.0.0.1:{dead}/0"}, "health")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "queue_unavailable" in done.stderr and "Redis is unreachable" in done.stderr


def test_health_of_a_prefork_worker_counts_every_child(stack) -> None:
    """The prefork parent holds no models; it is ready once each pool child has loaded
    them and run its probe."""
    worker = stack.worker(pool="prefork", concurrency=2, name="pre").start()
    try:
        report = worker.wait_ready(timeout=90)
        assert report["pool"] == "prefork" and report["children"] == 2
        assert report["providers"]["sam2"] == "CPUExecutionProvider" and report["probe_ms"] is not None
    finally:
        worker.terminate()
