"""The worker runs segq's four tasks and nothing else, refuses ids no status can be kept
under, and every hook segq takes in a library's internals still works the way it relies on
(a library upgrade that moves one fails here, loudly, rather than quietly in production).
"""

from __future__ import annotations

import inspect
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from celery import Celery
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request

from api_client.client import SegmentationClient
from config.celeryconfig import celery_config
from config.contract import TASKS, check_idempotency_key, check_job_id
from config.errors import InvalidPayload, JobNotFound
from config.queues import UNACKED_HASH, queue_depths
from config.settings import Settings
from tests.support.stack import Stack
from worker.webhooks import connection_to

# --- only segq's tasks --------------------------------------------------------------------


def final_status(stack: Stack, job_id: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = stack.client.status(job_id)
            if st.is_final:
                return st
        except JobNotFound:
            pass
        time.sleep(0.1)
    return None


@pytest.mark.parametrize(
    "name, args",
    [
        ("celery.accumulate", [1, 2]),
        ("celery.backend_cleanup", []),
        ("celery.chord_unlock", ["group-id", []]),
        ("celery.map", [{"task": "segq.segment"}, [[1]]]),
        ("os.system", ["true"]),
    ],
)
def test_celery_built_ins_and_other_names_are_refused_with_a_status(stack: Stack, name, args) -> None:
    job_id = uuid.uuid4().hex
    stack.client.celery.send_task(name, args=args, task_id=job_id, queue=stack.settings.queue_batch)
    st = final_status(stack, job_id)
    assert st is not None and st.error.code == "unknown_task", st
    assert "segq runs segq.segment" in st.error.message


def test_the_worker_app_registers_builtins_but_runs_only_segq_tasks(stack: Stack) -> None:
    """Celery adds its built-ins to every app's registry; the worker's consumer keeps
    strategies for segq's four alone (``worker.hardening.Consumer.update_strategies``)."""
    registered = stack.client.celery.control.inspect(
        destination=[stack.workers[0].hostname], timeout=5
    ).registered()
    assert sorted(registered[stack.workers[0].hostname]) == sorted(TASKS)


@pytest.mark.parametrize("bad", ["", "x" * 129, "a b", "tab\there", "../escape", "é"])
def test_job_ids_and_idempotency_keys_must_be_plain(bad: str) -> None:
    with pytest.raises(InvalidPayload):
        check_job_id(bad)
    if bad not in ("../escape", "é", "x" * 129):
        with pytest.raises(InvalidPayload):
            check_idempotency_key(bad)
    assert check_idempotency_key("upload-1234/v=3") == "upload-1234/v=3"


@pytest.mark.parametrize("bad_id", ["", "x" * 200, "new\nline"])
def test_a_raw_message_with_an_id_no_status_can_hold_is_dropped_and_the_worker_goes_on(
    stack: Stack, bad_id: str
) -> None:
    client = stack.client
    body = {"task": "segq.segment", "image": "s3://segq-input/none.jpg"}
    client.celery.send_task("segq.segment", args=[body], task_id=bad_id, queue=stack.settings.queue_interactive)
    r = redis.Redis.from_url(stack.settings.redis_url)
    time.sleep(1.0)
    assert not [k for k in r.scan_iter("segq:job:*") if k.decode().endswith(bad_id or ":")]
    # the next job is served as usual
    uri = stack.upload(b"not an image", "x.jpg")
    job = client.segment(uri)
    st = final_status(stack, job.id)
    assert st is not None and st.error.code == "invalid_image"


def test_the_client_refuses_empty_and_odd_ids_and_keys_at_submit(settings: Settings) -> None:
    client = SegmentationClient(settings)
    for kwargs in ({"job_id": ""}, {"job_id": "a/b"}, {"idempotency_key": ""}, {"idempotency_key": "a b"}):
        with pytest.raises(InvalidPayload):
            client.submit("segment", "s3://segq-input/x.jpg", **kwargs)


# --- pins on library internals ----------------------------------------------------------------


def test_celery_consumer_hooks_segq_overrides_are_still_there() -> None:
    """``worker.hardening.Consumer`` overrides these; each must still be what Celery calls."""
    for name, params in {
        "update_strategies": [],
        "create_task_handler": ["promise"],
        "on_decode_error": ["message", "exc"],
        "on_unknown_task": ["body", "message", "exc"],
        "on_invalid_task": ["body", "message", "exc"],
    }.items():
        method = getattr(CeleryConsumer, name)
        assert list(inspect.signature(method).parameters)[1 : 1 + len(params)] == params, name
    source = inspect.getsource(CeleryConsumer.update_strategies)
    assert "self.strategies[name]" in source  # the dict update_strategies fills, by task name
    assert "signals.task_unknown.send" in inspect.getsource(CeleryConsumer.on_unknown_task)
    assert "signals.task_rejected.send" in inspect.getsource(CeleryConsumer.on_invalid_task)
    # CheckedRequest wraps Request's constructor, which unpacks the body
    assert list(inspect.signature(Request.__init__).parameters)[:2] == ["self", "message"]


def test_kombu_keeps_delivered_unacknowledged_messages_where_the_queue_gauges_count_them(
    redis_url: str,
) -> None:
    """``config.queues`` counts in-flight jobs from kombu's Redis transport: the ``unacked``
    hash, each entry ``[message, exchange, routing_key]``."""
    settings = Settings(redis_url=redis_url)
    app = Celery("pin", config_source=celery_config(settings), set_as_current=False)
    queue = settings.queue_interactive
    app.send_task("segq.segment", args=[{}], task_id="pin-1", queue=queue)
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, no_ack=False)
        message = simple.get(timeout=5)
        client = redis.Redis.from_url(redis_url)
        assert client.hlen(UNACKED_HASH) == 1
        entry = json.loads(next(iter(client.hvals(UNACKED_HASH))))
        assert entry[2] == queue and entry[0]["headers"]["id"] == "pin-1"
        assert queue_depths(client, [queue]) == {queue: (0, 1)}
        message.ack()
        simple.close()
    assert queue_depths(client, [queue]) == {queue: (0, 0)}


def test_http_client_opens_its_socket_through_the_connections_create_connection() -> None:
    """Webhooks POST to the address they vetted, with the URL's own name in Host (and, for
    https, SNI): ``worker.webhooks.connection_to`` relies on ``HTTPConnection.connect``
    calling the instance's ``_create_connection``."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers["Host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        conn = connection_to("http", "hooks.example.invalid", port, "127.0.0.1", timeout=5)
        conn.request("GET", "/")  # the name never resolves: the socket went to 127.0.0.1
        assert conn.getresponse().status == 204
        assert seen == [f"hooks.example.invalid:{port}"]
        conn.close()
        accepted = socket.socket()
        accepted.bind(("127.0.0.1", 0))
        accepted.listen()
        tls = connection_to("https", "hooks.example.invalid", accepted.getsockname()[1], "127.0.0.1", 2)
        with pytest.raises(OSError):  # no TLS server there: the handshake fails...
            tls.connect()
        assert accepted.accept()[0]  # ...after the TCP connection went to the vetted address
        accepted.close()
    finally:
        server.shutdown()
        server.server_close()
