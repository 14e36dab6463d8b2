"""Security properties end to end, through a real worker: JSON-only messages (a pickle is
never unpickled), reads and writes confined to their locations, Redis with a password
and over TLS, no S3 credential in any log, status or manifest, Flower behind basic auth,
and no webhook to a loopback address."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from api_client.client import SegmentationClient
from api_client.dev.localstack import LOOPBACK, RedisServer, free_ports
from config.celeryconfig import task_queues
from config.contract import TASK_SEGMENT, JobState, JobStatus
from config.errors import JobFailed, JobNotFound, SegqError
from tests.support.images import encode, noise_rgb
from tests.support.stack import Stack, make_stack
from api_client.dev.processes import WorkerProcess
from tests.support.stack import REPO

ALLOWED = "tenant-a"
PNG = encode(Image.fromarray(noise_rgb(64, 48, seed=11)), "PNG")
TIMEOUT_S = 60
# urllib straight to loopback, whatever proxy the environment names
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def stack(
    redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory, module_monkeypatch
) -> Iterator[Stack]:
    """One worker that may read only ``s3://segq-input/tenant-a/`` and may not call private
    addresses (the shipped default)."""
    s = make_stack(
        redis_server,
        s3_server,
        sam2_repo,
        detr_repo,
        tmp_path_factory.mktemp("logs"),
        module_monkeypatch,
        offline=True,
        allowed_inputs=[f"s3://segq-input/{ALLOWED}/"],
    )
    assert not s.settings.webhook_allow_private
    s.worker(name="sec").start()
    yield s
    s.stop_workers()


def upload(stack: Stack, folder: str, name: str = "cat.png", data: bytes = PNG) -> str:
    return stack.client.upload(data, f"{folder}/{uuid.uuid4().hex[:8]}/{name}")


def final_status(client: SegmentationClient, job_id: str, timeout: float = TIMEOUT_S) -> JobStatus:
    """The final status of a job that may have no record yet (sent as a raw message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = client.status(job_id)
            if st.is_final:
                return st
        except JobNotFound:
            pass
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not final after {timeout}s")


def send_raw(stack: Stack, body: dict[str, Any]) -> str:
    job_id = uuid.uuid4().hex
    queue = task_queues(stack.settings)[TASK_SEGMENT]
    stack.client.celery.send_task(TASK_SEGMENT, args=[body], task_id=job_id, queue=queue)
    return job_id


def assert_worker_alive_and_working(stack: Stack) -> None:
    worker = stack.workers[0]
    assert worker.proc.poll() is None, worker.log()[-4000:]
    st = stack.client.segment(upload(stack, ALLOWED), {"point": [10, 10]}).wait(timeout=TIMEOUT_S)
    assert st.state is JobState.succeeded


# --- JSON only --------------------------------------------------------------------------


class _CreatesFile:
    """Unpickling this opens ``path`` for writing, i.e. creates the file: the stand-in
    for arbitrary code run by ``pickle.loads``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def test_pickled_message_is_refused_logged_and_never_unpickled(
    stack: Stack, tmp_path: Path
) -> None:
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    pickle.loads(pickle.dumps(_CreatesFile(proof))).close()
    assert proof.exists(), "the payload must be live for this test to mean anything"

    app = stack.client.celery
    job_id = uuid.uuid4().hex
    message = app.amqp.as_task_v2(job_id, TASK_SEGMENT, args=[], kwargs={})
    queue = app.amqp.queues[task_queues(stack.settings)[TASK_SEGMENT]]
    with app.producer_or_acquire() as producer:
        producer.publish(
            ([_CreatesFile(marker)], {}, {}),
            serializer="pickle",
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            headers=message.headers,
            **message.properties,
        )

    st = final_status(stack.client, job_id)
    assert st.state is JobState.failed and st.error.code == "invalid_payload"
    assert "untrusted content of type pickle" in st.error.message
    assert "Refusing to deserialize untrusted content of type pickle" in stack.workers[0].log()
    assert not marker.exists()
    assert_worker_alive_and_working(stack)


# --- reads and writes confined ------------------------------------------------------------


def test_reads_stay_inside_the_allowed_prefix_end_to_end(stack: Stack) -> None:
    """Every object named here exists, so ``forbidden_location`` is the guard speaking,
    not a missing key."""
    client = stack.client
    allowed = upload(stack, ALLOWED)
    done = client.segment(allowed, {"point": [5, 5]}).wait(timeout=TIMEOUT_S)
    other_output = f"s3://{stack.settings.output_bucket}/{done.result['outputs']['mask_0.png']}"
    key_in_b = upload(stack, "tenant-b").split("/", 3)[3]
    outside = {
        "other tenant": f"s3://segq-input/{key_in_b}",
        "prefix trick": upload(stack, ALLOWED + "b"),  # tenant-ab/ is not tenant-a/
        "dot-dot out of the prefix": f"s3://segq-input/{ALLOWED}/../{key_in_b}",
        "another job's output": other_output,
    }
    jobs = {why: client.segment(uri, {"point": [5, 5]}) for why, uri in outside.items()}
    jobs["overlay mask from another tenant"] = client.overlay(
        allowed, masks=[outside["other tenant"]]
    )
    for why, job in jobs.items():
        with pytest.raises(JobFailed) as failed:
            job.wait(timeout=TIMEOUT_S)
        assert failed.value.job_code == "forbidden_location", (why, failed.value)


@pytest.mark.parametrize("job_id", ["../../escaped", "a/../../../escaped"])
def test_a_job_id_cannot_steer_outputs_out_of_the_output_prefix(stack: Stack, job_id: str) -> None:
    image = upload(stack, ALLOWED)
    with pytest.raises(SegqError) as refused:  # the client refuses such an id outright
        stack.client.segment(image, {"point": [5, 5]}, job_id=job_id)
    assert refused.value.code == "invalid_payload"
    # sent by hand (with a record made by hand), the worker refuses the id: no outputs
    body = {"task": "segq.segment", "image": image, "prompt": {"point": [5, 5]}, "options": {}}
    stack.client._status.create(job_id, "segq.segment", image)
    stack.client.celery.send_task(
        "segq.segment", args=[body], task_id=job_id, queue=stack.settings.queue_interactive
    )
    with pytest.raises(JobFailed) as failed:
        stack.client.wait(job_id, timeout=TIMEOUT_S)
    assert failed.value.job_code == "invalid_payload" and "job ids are" in failed.value.message
    s3 = stack.s3.client()
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=stack.settings.output_bucket).get("Contents", [])
    ]
    assert not [k for k in keys if "escaped" in k]


# --- Redis credentials and TLS --------------------------------------------------------------


def test_redis_password_works_end_to_end_and_a_wrong_one_fails_at_once(
    s3_server, sam2_repo, detr_repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "pw-" + uuid.uuid4().hex
    with RedisServer(password=password, data_dir=tmp_path / "redis") as server:
        stack = make_stack(
            server, s3_server, sam2_repo, detr_repo, tmp_path, monkeypatch, offline=True
        )
        assert f":{password}@" in stack.settings.redis_url
        worker = stack.worker(name="pw").start()
        try:
            job = stack.client.segment(stack.upload(PNG), {"point": [3, 3]})
            assert job.wait(timeout=TIMEOUT_S).state is JobState.succeeded
        finally:
            stack.stop_workers()
        assert password not in worker.log()

        wrong = stack.settings.model_copy(
            update={"redis_url": stack.settings.redis_url.replace(password, "wrong")}
        )
        uri = stack.upload(PNG)
        with server.client() as probe:  # one connection, reused: it is not counted twice
            before = int(probe.info("stats")["total_connections_received"])
            with pytest.raises(redis.AuthenticationError):
                SegmentationClient(wrong).segment(uri)
            after = int(probe.info("stats")["total_connections_received"])
        assert after - before == 1, "an authentication error must not be retried"

        env = {**stack.env(), **wrong.to_env()}
        started = subprocess.run(
            [sys.executable, "-m", "api_client.cli", "worker", "--pool", "solo"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert started.returncode == 2, started.stderr[-2000:]
        assert "invalid_config" in started.stderr and "refused the credentials" in started.stderr
        assert password not in started.stderr + started.stdout


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate"
)
def test_tls_redis_carries_broker_and_status_end_to_end(
    stack: Stack, s3_server, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with RedisServer(password="tls-pw", tls=(cert, key), data_dir=tmp_path / "redis") as server:
        assert server.url.startswith("rediss://")
        # the server speaks TLS only: a plaintext client on the same port gets nowhere
        plain = server.url.replace("rediss://", "redis://").split("?")[0]
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(plain, socket_connect_timeout=2, socket_timeout=2).ping()

        settings = stack.settings.model_copy(update={"redis_url": server.url})
        with WorkerProcess(settings, tmp_path, extra_env=s3_server.env(), name="tls"):
            client = SegmentationClient(settings)
            job = client.segment(upload(stack, ALLOWED), {"point": [3, 3]})
            assert job.wait(timeout=TIMEOUT_S).state is JobState.succeeded
            assert client._status.redis.connection_pool.connection_class is redis.SSLConnection


# --- no S3 credential anywhere a user or operator looks --------------------------------------


def test_s3_credentials_never_reach_logs_statuses_or_manifests(
    stack: Stack, tmp_path: Path
) -> None:
    s3 = stack.s3
    wrong_secret = "wrong-" + uuid.uuid4().hex
    denied = stack.settings.model_copy(  # affinity off: its job must not follow the embedding
        update={"queue_interactive": "segq.denied", "queue_batch": "segq.denied-batch", "affinity": False}
    )
    denied_worker = WorkerProcess(
        denied,
        stack.log_dir,
        extra_env={**s3.env(), "AWS_SECRET_ACCESS_KEY": wrong_secret},
        name="denied",
    )
    client = stack.client
    good = upload(stack, ALLOWED)
    jobs = [
        client.segment(good, {"point": [4, 4]}),
        client.cutout(good, None),
        client.panoptic(good),
        client.segment(upload(stack, ALLOWED, data=b"not an image")),
    ]
    with denied_worker:
        jobs.append(SegmentationClient(denied).segment(good))
        codes = []
        for job in jobs:
            try:
                job.wait(timeout=TIMEOUT_S)
                codes.append("succeeded")
            except JobFailed as failed:
                codes.append(failed.job_code)
    assert codes == ["succeeded", "succeeded", "succeeded", "invalid_image", "access_denied"]

    store = redis.Redis.from_url(stack.settings.redis_url)
    statuses = [store.get(key) for key in store.scan_iter("segq:job:*")]
    assert len(statuses) >= len(jobs)
    manifests = [client.output(job.id, "manifest.json") for job in jobs[:3]]
    logs = [path.read_bytes() for path in Path(stack.log_dir).glob("*.log")]
    assert len(logs) >= 2
    for secret in (s3.secret_key, s3.access_key, wrong_secret):
        for text in (*statuses, *manifests, *logs):
            assert secret.encode() not in text


# --- Flower ---------------------------------------------------------------------------------


def test_flower_requires_basic_auth(stack: Stack) -> None:
    port = free_ports(1)[0]
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery:app",
            "flower",
            f"--port={port}",
            f"--address={LOOPBACK}",
            "--basic-auth=ops:s3cret",
        ],
        env=stack.env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{LOOPBACK}:{port}/workers"

    def get(credentials: str | None) -> int:
        request = urllib.request.Request(url)
        if credentials:
            request.add_header("Authorization", "Basic " + b64encode(credentials.encode()).decode())
        try:
            with _http.open(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                anonymous = get(None)
                break
            except urllib.error.URLError:
                assert flower.poll() is None and time.monotonic() < deadline, "flower did not start"
                time.sleep(0.2)
        assert anonymous == 401
        assert get("ops:wrong") == 401
        assert get("ops:s3cret") == 200
    finally:
        flower.terminate()
        flower.wait(timeout=20)


# --- webhooks never reach private addresses ------------------------------------------------


class Receiver:
    """A loopback HTTP server that records every POST it gets."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.requests.append(
                    self.rfile.read(int(self.headers.get("Content-Length", 0)))
                )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/hook"


def test_callback_to_loopback_is_refused_at_submit_and_by_the_worker(stack: Stack) -> None:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        good = upload(stack, ALLOWED)
        with pytest.raises(SegqError) as refused:
            stack.client.segment(good, {"point": [4, 4]}, callback_url=receiver.url)
        assert refused.value.code == "invalid_url"

        job_id = send_raw(
            stack,
            {
                "task": TASK_SEGMENT,
                "image": good,
                "prompt": {"point": [4, 4]},
                "callback_url": receiver.url,
            },
        )
        assert final_status(stack.client, job_id).state is JobState.succeeded
        deadline = time.monotonic() + TIMEOUT_S
        while (webhook := stack.client.status(job_id).webhook) is None:
            assert time.monotonic() < deadline, "the refused delivery was never recorded"
            time.sleep(0.1)
        assert webhook["delivered"] is False and webhook["attempts"] == 1
        assert "loopback" in webhook["error"]
        # the receiver works: a direct POST arrives, the worker's never did
        _http.open(
            urllib.request.Request(receiver.url, data=b"{}", method="POST"), timeout=5
        ).close()
        assert receiver.requests == [b"{}"]
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
