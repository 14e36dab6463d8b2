"""The HTTP API (``segq api``) as web apps use it: a real uvicorn process on loopback in
front of the real stack (Redis, ``weed mini`` S3, a worker with the tiny test models).

Upload through the presigned POST, submit, follow the job's Server-Sent Events to its
final state, fetch the outputs; every error status; keys that may not use a bucket;
idempotent resubmits; Redis or the broker stopped mid-request gives 503 in seconds and
leaves nothing half-created; S3 upload events on the same app and the same keys.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from typing import Any, Iterator

import httpx
import pytest
import redis
from PIL import Image

from api_client.cli import main as segq
from api_client.dev import sample_image
from api_client.dev.localstack import RedisServer
from api_client.http.auth import hash_key
from tests.support.api import ApiProcess, api_key, sse_events
from tests.support.services import INPUT_BUCKET
from tests.support.stack import Stack

pytestmark = pytest.mark.timeout(120)

MAX_IMAGE_BYTES = 200_000
RULES = [{"bucket": INPUT_BUCKET, "prefix": "events/", "task": "segment", "suffixes": [".png"]}]


class Api:
    def __init__(self, url: str, keys: dict[str, str]) -> None:
        self.url = url
        self.keys = keys
        self.http = httpx.Client(base_url=url, timeout=30)

    def auth(self, who: str = "main") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def upload(self, data: bytes, who: str = "main", **body: Any) -> tuple[httpx.Response, str]:
        form = self.http.post("/v1/uploads", json={"filename": "photo.jpg", **body}, headers=self.auth(who))
        assert form.status_code == 201, form.text
        answer = form.json()
        sent = httpx.post(answer["url"], data=answer["fields"], files={"file": ("photo.jpg", data)}, timeout=30)
        return sent, answer["image"]

    def submit(self, body: dict, who: str = "main", key: str | None = None) -> httpx.Response:
        headers = self.auth(who)
        if key:
            headers["Idempotency-Key"] = key
        return self.http.post("/v1/jobs", json=body, headers=headers)


@pytest.fixture(scope="module")
def api(stack: Stack, tmp_path_factory) -> Iterator[Api]:
    main, main_entry = api_key([f"s3://{INPUT_BUCKET}/"], name="main")
    other, other_entry = api_key([f"s3://{INPUT_BUCKET}/elsewhere/"], name="other")
    slow, slow_entry = api_key([f"s3://{INPUT_BUCKET}/"], rate=2, name="slow")
    env = {**stack.env(), "SEGQ_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
           "SEGQ_EVENT_RULES": json.dumps(RULES), "SEGQ_API_CORS_ORIGINS": '["http://app.example"]'}  # fmt: skip
    log = tmp_path_factory.mktemp("api") / "api.log"
    with ApiProcess(env, log, keys=[main_entry, other_entry, slow_entry]) as process:
        yield Api(process.url, {"main": main, "other": other, "slow": slow})


def errors_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def test_upload_submit_follow_events_and_fetch_outputs(api: Api) -> None:
    sent, image = api.upload(sample_image())
    assert sent.status_code in (200, 201, 204), sent.text
    assert image.startswith(f"s3://{INPUT_BUCKET}/uploads/")

    body = {"task": "segment", "image": image, "prompt": {"point": [320, 240]}, "options": {"multimask": True}}
    created = api.submit(body, key="click-1")
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["state"] == "queued" and created.headers["location"] == f"/v1/jobs/{job['job_id']}"

    events = sse_events(api.http, f"/v1/jobs/{job['job_id']}/events", api.auth())
    states = [data["state"] for name, data in events if name == "status"]
    assert states[-1] == "succeeded" and "running" in states, events
    assert all(s != "succeeded" for s in states[:-1])
    final = events[-1][1]
    assert final["result"]["embedding_cache"] == "miss" and len(final["result"]["masks"]) == 3

    # the same key and body again: the first job, 200; the same key, another body: 409
    again = api.submit(body, key="click-1")
    assert again.status_code == 200 and again.json()["job_id"] == job["job_id"]
    conflict = api.submit({**body, "prompt": {"point": [10, 10]}}, key="click-1")
    assert conflict.status_code == 409 and errors_of(conflict)["code"] == "idempotency_conflict"

    status = api.http.get(f"/v1/jobs/{job['job_id']}", headers=api.auth())
    assert status.status_code == 200 and status.json()["state"] == "succeeded"
    outputs = api.http.get(f"/v1/jobs/{job['job_id']}/outputs", headers=api.auth()).json()
    assert {"mask_0.png", "mask_2.png", "manifest.json"} <= set(outputs["outputs"])
    mask = httpx.get(outputs["outputs"]["mask_0.png"], timeout=10)  # presigned: no credentials
    assert mask.status_code == 200
    assert Image.open(io.BytesIO(mask.content)).size == (final["result"]["width"], final["result"]["height"])
    direct = api.http.get(f"/v1/jobs/{job['job_id']}/outputs/mask_0.png", headers=api.auth())
    assert direct.status_code == 200 and direct.content == mask.content

    # an event stream opened after the end: the final state, then the end
    late = sse_events(api.http, f"/v1/jobs/{job['job_id']}/events", api.auth())
    assert [d["state"] for _, d in late] == ["succeeded"]

    # a click session goes through the API whole: refine the first click, several boxes
    refine = {"task": "segment", "image": image, "prompt": {"point": [300, 250], "refine": job["job_id"]}}
    many = {"task": "segment", "image": image, "image_id": "api-photo",
            "prompts": [{"box": [10, 20, 200, 150]}, {"box": [250, 60, 300, 200]}]}  # fmt: skip
    for body, check in ((refine, lambda r: r["refined"] == [job["job_id"]]), (many, lambda r: len(r["prompts"]) == 2)):
        created = api.submit(body)
        assert created.status_code == 201, created.text
        done = sse_events(api.http, f"/v1/jobs/{created.json()['job_id']}/events", api.auth())[-1][1]
        assert done["state"] == "succeeded" and check(done["result"]), done


def test_the_upload_policy_refuses_a_file_over_the_limit(api: Api) -> None:
    sent, image = api.upload(b"\xff" * (MAX_IMAGE_BYTES + 1))
    # S3 itself checks the signed policy's content-length-range
    assert sent.status_code == 400 and "EntityTooLarge" in sent.text, sent.text


def test_a_text_file_fails_its_job_with_a_code_in_words(api: Api) -> None:
    sent, image = api.upload(b"just some text, not a photo\n" * 10)
    job = api.submit({"task": "cutout", "image": image, "prompt": {"point": [1, 1]}}).json()
    events = sse_events(api.http, f"/v1/jobs/{job['job_id']}/events", api.auth())
    final = events[-1][1]
    assert final["state"] == "failed" and final["error"]["code"] in ("invalid_image", "unsupported_image")
    assert final["error"]["message"]
    outputs = api.http.get(f"/v1/jobs/{job['job_id']}/outputs", headers=api.auth())
    assert outputs.status_code == 409 and errors_of(outputs)["code"] == "invalid_transition"


def test_cancel_a_queued_job_then_409_once_it_is_final(api: Api, stack: Stack) -> None:
    image = stack.upload(sample_image())
    with stack.paused(stack.settings.queue_batch):
        job = api.submit({"task": "panoptic", "image": image}).json()
        cancelled = api.http.delete(f"/v1/jobs/{job['job_id']}", headers=api.auth())
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = api.http.delete(f"/v1/jobs/{job['job_id']}", headers=api.auth())
    assert again.status_code == 409 and errors_of(again)["code"] == "invalid_transition"


def test_keys_see_only_their_prefixes(api: Api, stack: Stack) -> None:
    image = stack.upload(sample_image())  # s3://segq-input/uploads/...: not "other"'s
    refused = api.submit({"task": "segment", "image": image}, who="other")
    assert refused.status_code == 403 and errors_of(refused)["code"] == "forbidden_location"
    job = api.submit({"task": "segment", "image": image}).json()
    seen = api.http.get(f"/v1/jobs/{job['job_id']}", headers=api.auth("other"))
    assert seen.status_code == 403
    form = api.http.post("/v1/uploads", json={"filename": "x.jpg"}, headers=api.auth("other")).json()
    assert form["image"].startswith(f"s3://{INPUT_BUCKET}/elsewhere/uploads/")
    outside = api.http.post("/v1/uploads", json={"prefix": f"s3://{INPUT_BUCKET}/"}, headers=api.auth("other"))
    assert outside.status_code == 403
    # outside SEGQ_ALLOWED_INPUTS: no key may use it
    nowhere = api.submit({"task": "segment", "image": "s3://segq-output/jobs/x.png"})
    assert nowhere.status_code == 403


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_payload"),
        (json.dumps({"task": "segment", "image": "s3://segq-input/a.jpg", "prompt": {"point": [1]}}), 422, "invalid_prompt"),
        (json.dumps({"task": "segment", "image": "s3://segq-input/a.jpg", "options": {"sharpen": 1}}), 422, "unknown_option"),
        (json.dumps({"task": "blur", "image": "s3://segq-input/a.jpg"}), 422, "unknown_task"),
        (json.dumps({"task": "segment", "image": "http://example.com/a.jpg"}), 422, "invalid_payload"),
        (json.dumps({"task": "segment", "image": "s3://segq-input/a.jpg", "x": "y" * 70_000}), 413, "payload_too_large"),
    ],
    ids=["not-json", "bad-prompt", "unknown-option", "unknown-task", "not-s3", "too-large"],
)  # fmt: skip
def test_bad_requests_get_their_status_and_code(api: Api, body: Any, status: int, code: str) -> None:
    answer = api.http.post("/v1/jobs", content=body, headers={**api.auth(), "Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    assert errors_of(answer)["code"] == code


def test_bodies_and_headers_are_bounded(api: Api) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"task": "segment", "image": "s3://segq-input/a.jpg", "x": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}'

    chunked = api.http.post("/v1/jobs", content=chunks(), headers={**api.auth(), "Content-Type": "application/json"})
    assert chunked.status_code == 413 and errors_of(chunked)["code"] == "payload_too_large"
    huge_header = api.http.get("/healthz", headers={"X-Padding": "p" * 20_000})
    assert huge_header.status_code == 431 and errors_of(huge_header)["code"] == "headers_too_large"


def test_auth_and_lookup_errors(api: Api) -> None:
    body = {"task": "segment", "image": "s3://segq-input/a.jpg"}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": api.keys["main"]}):
        answer = api.http.post("/v1/jobs", json=body, headers=headers)
        assert answer.status_code == 401 and errors_of(answer)["code"] == "unauthorized"
        assert answer.headers["www-authenticate"].startswith("Bearer")
    missing = api.http.get(f"/v1/jobs/{uuid.uuid4().hex}", headers=api.auth())
    assert missing.status_code == 404 and errors_of(missing)["code"] == "job_not_found"
    assert api.http.get("/v1/jobs/bad%20id", headers=api.auth()).status_code == 404
    bad_key = api.submit(body, key="has spaces")
    assert bad_key.status_code == 400
    assert errors_of(api.http.get("/v1/nothing-here"))["code"] == "not_found"


def test_rate_limit_is_429_with_retry_after(api: Api) -> None:
    codes = [api.http.get("/v1/jobs/x", headers=api.auth("slow")) for _ in range(3)]
    assert [c.status_code for c in codes] == [404, 404, 429]
    assert errors_of(codes[2])["code"] == "rate_limited" and int(codes[2].headers["retry-after"]) >= 1


def test_cors_headers_for_the_configured_origin(api: Api) -> None:
    preflight = api.http.options("/v1/jobs", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,idempotency-key"})  # fmt: skip
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    other = api.http.options("/v1/jobs", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_openapi_from_the_contract_and_docs_served_locally(api: Api) -> None:
    doc = api.http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert {"JobRequest", "Prompt", "JobStatus"} <= set(schemas)
    assert set(schemas["Prompt"]["properties"]) == {"point", "points", "labels", "box", "refine"}
    assert {"prompt", "prompts", "image_id"} <= set(schemas["JobRequest"]["properties"])
    assert doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobRequest"
    }
    page = api.http.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert api.http.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert api.http.get("/healthz").json() == {"status": "ok"}
    ready = api.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] == "ok"


def test_s3_events_on_the_same_app_with_the_same_keys(api: Api) -> None:
    record = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": INPUT_BUCKET},
              "object": {"key": "events/cat.png", "eTag": "abc123", "versionId": "v1"}}}  # fmt: skip
    event = {"EventName": "s3:ObjectCreated:Put", "Records": [record]}
    first = api.http.post("/v1/events/s3", json=event, headers=api.auth())
    assert first.status_code == 200, first.text
    [outcome] = first.json()["outcomes"]
    assert outcome["status"] == "submitted" and outcome["task"] == "segq.segment"
    assert api.http.post("/v1/events/s3", json=event, headers=api.auth()).json()["outcomes"][0]["status"] == "duplicate"
    assert api.http.post("/v1/events/s3", json=event).status_code == 401
    assert api.http.post("/v1/events/s3", json=event, headers=api.auth("other")).status_code == 403
    malformed = api.http.post("/v1/events/s3", json={"hello": "world"}, headers=api.auth())
    assert malformed.status_code == 400 and errors_of(malformed)["code"] == "invalid_payload"


def test_redis_or_broker_down_is_503_in_seconds_and_leaves_nothing(stack: Stack, tmp_path) -> None:
    """Statuses in one Redis, the broker in another. The broker stopped: the status record
    is made, the publish fails, the record is taken back: 503 and nothing left. Redis
    stopped: 503 at once. Each request has 8 s, well under the producer's 17 s budget."""
    with RedisServer(data_dir=tmp_path / "status") as status_redis, \
            RedisServer(data_dir=tmp_path / "broker") as broker:  # fmt: skip
        env = {**stack.env(), "SEGQ_REDIS_URL": status_redis.url, "SEGQ_BROKER_URL": broker.url}
        with ApiProcess(env, tmp_path / "api.log", keys=[]) as api:
            http = httpx.Client(base_url=api.url, timeout=8)
            body = {"task": "segment", "image": f"s3://{INPUT_BUCKET}/uploads/a.jpg"}
            store = redis.Redis.from_url(status_redis.url)

            broker.stop()
            answer = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
            assert answer.status_code == 503 and errors_of(answer)["code"] == "queue_unavailable"
            assert answer.headers["retry-after"]
            assert store.keys("segq:*") == [], "a job was half-created"
            assert http.get("/readyz").status_code == 503

            status_redis.stop()
            for request in (lambda: http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"}),
                            lambda: http.get(f"/v1/jobs/{uuid.uuid4().hex}"),
                            lambda: http.get("/readyz")):  # fmt: skip
                answer = request()
                assert answer.status_code == 503, answer.text

            status_redis.start()
            broker.start()
            created = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
            assert created.status_code == 201, created.text
            assert [k.decode() for k in store.keys("segq:job:*")] == [f"segq:job:{created.json()['job_id']}"]


def test_api_key_create_prints_the_key_once_and_its_hashed_entry(capsys) -> None:
    assert segq(["api-key", "create", "--prefix", "s3://segq-input/photos/", "--rate", "30"]) == 0
    out = capsys.readouterr().out
    key = out.split("API key (shown once; give it to the client): ")[1].split()[0]
    entry = json.loads(out.split("SEGQ_API_KEYS='")[1].split("'")[0])[0]
    assert entry["sha256"] == hash_key(key) and key not in json.dumps(entry)
    assert entry["prefixes"] == ["s3://segq-input/photos/"] and entry["rate_per_minute"] == 30


def test_the_open_api_refuses_to_listen_beyond_loopback() -> None:
    done = subprocess.run([sys.executable, "-m", "api_client.cli", "api", "--host", "0.0.0.0"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "loopback" in done.stderr
