"""Upload events -> jobs, against real Redis (status and broker) and moto's SQS server on
loopback (the HTTP endpoint, ``POST /v1/events/s3``, is tested in test_http_api.py). No
worker runs: the tests read what was enqueued from the status store and from the Celery
messages on the broker's queue lists."""

from __future__ import annotations

import base64
import json
from typing import Any, Iterator, Optional
from urllib.parse import unquote_plus

import boto3
import pytest
import redis

from api_client import events
from api_client.client import SegmentationClient
from api_client.events import handle_event, lambda_handler
from api_client.events.sqs import SqsPoller
from config.contract import EventRule, JobState
from config.errors import InvalidConfig, InvalidPayload
from config.settings import Settings, get_settings

BUCKET = "segq-input"
RULES = [
    {"bucket": BUCKET, "prefix": "uploads/", "task": "panoptic", "options": {"min_score": 0.6}},
    {"bucket": BUCKET, "prefix": "uploads/", "task": "cutout", "prompt": {"point": [10, 20]}},
    {"bucket": BUCKET, "prefix": "clicks/", "task": "segment", "suffixes": [".png"]},
    {"bucket": "segq-output", "task": "segment"},
    {"bucket": "elsewhere", "task": "segment"},
]


# --- real-format events (AWS "Event message structure", MinIO bucket notifications) ----


def s3_record(
    key: str,
    *,
    bucket: str = BUCKET,
    event: str = "ObjectCreated:Put",
    version: Optional[str] = "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY",
    etag: str = "0123456789abcdef0123456789abcdef",
    source: str = "aws:s3",
) -> dict[str, Any]:
    obj: dict[str, Any] = {"key": key, "size": 1024, "eTag": etag, "sequencer": "0A1B2C3D4E5F678901"}
    if version:
        obj["versionId"] = version
    return {
        "eventVersion": "2.1",
        "eventSource": source,
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-24T12:00:00.000Z",
        "eventName": event,
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.7"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "segq-uploads",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": obj,
        },
    }  # fmt: skip


def aws_event(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


def sns_envelope(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:segq-uploads",
        "Subject": "Amazon S3 Notification",
        "Message": json.dumps(event),
        "Timestamp": "2026-11-24T12:00:00.100Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQvi2egU3N8=",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }


def lambda_sqs_event(*bodies: dict[str, Any]) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"059f36b4-87a3-44ab-83d2-66197189317{i}",
                "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1545082649183"},
                "messageAttributes": {},
                "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:segq-uploads",
                "awsRegion": "us-east-1",
            }
            for i, body in enumerate(bodies)
        ]
    }


def minio_event(key: str, *, version: str = "7c3b1e8a-2f4d-4f6e-9a51-0f5c2d9e8b11") -> dict[str, Any]:
    record = s3_record(key, event="s3:ObjectCreated:Put", version=version, source="minio:s3")
    record["eventVersion"] = "2.0"
    record["s3"]["object"].update(contentType="image/jpeg", userDefined={"content-type": "image/jpeg"})
    record["source"] = {"host": "10.0.0.12", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"}
    return {"EventName": "s3:ObjectCreated:Put", "Key": f"{BUCKET}/{unquote_plus(key)}", "Records": [record]}


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture
def client(settings: Settings) -> SegmentationClient:
    return SegmentationClient(settings)


@pytest.fixture
def rules() -> list[EventRule]:
    return Settings(event_rules=RULES).event_rules


def enqueued(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery messages on the broker's queue lists, by job id: the job payloads."""
    r = redis.Redis.from_url(settings.redis_url)
    found = {}
    for queue in (settings.queue_interactive, settings.queue_batch):
        for raw in r.lrange(queue, 0, -1):
            message = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            found[message["headers"]["id"]] = {**args[0], "queue": queue}
    return found


def submitted(outcomes: list[events.EventOutcome]) -> list[events.EventOutcome]:
    return [o for o in outcomes if o.status == "submitted"]


# --- rules -------------------------------------------------------------------------------


def test_rules_load_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGQ_EVENT_RULES", json.dumps(RULES[:2]))
    rules = Settings().event_rules
    assert [r.task for r in rules] == ["segq.panoptic", "segq.cutout"]
    assert rules[0].suffixes == [".jpg", ".jpeg", ".png", ".webp", ".avif"]


@pytest.mark.parametrize(
    "rule, problem",
    [
        ({"bucket": BUCKET, "task": "classify"}, "unknown task"),
        ({"bucket": BUCKET, "task": "segment", "prompt": {"point": [1]}}, "prompt"),
        ({"bucket": BUCKET, "task": "segment", "options": {"colour": "red"}}, "unknown option"),
        ({"bucket": BUCKET, "task": "segment", "sufixes": [".jpg"]}, "sufixes"),
        ({"task": "segment"}, "bucket"),
        ({"bucket": BUCKET}, "task"),
    ],
)
def test_bad_rules_are_refused_at_load_naming_the_rule(
    rule: dict[str, Any], problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEGQ_EVENT_RULES", json.dumps([RULES[0], rule]))
    get_settings.cache_clear()
    try:
        with pytest.raises(InvalidConfig, match=rf"SEGQ_EVENT_RULES\[1\].*{problem}") as err:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert err.value.code == "invalid_config"


# --- handle_event --------------------------------------------------------------------------


def test_an_upload_becomes_one_queued_job_per_matching_rule(
    client: SegmentationClient, rules: list[EventRule], settings: Settings
) -> None:
    outcomes = handle_event(aws_event(s3_record("uploads/cat.jpg")), client, rules)

    assert [(o.status, o.task, o.rule) for o in outcomes] == [
        ("submitted", "segq.panoptic", 0),
        ("submitted", "segq.cutout", 1),
    ]
    messages = enqueued(settings)
    for o in outcomes:
        status = client.status(o.job_id)
        assert (status.state, status.task, status.image) == (JobState.queued, o.task, f"s3://{BUCKET}/uploads/cat.jpg")
        assert messages[o.job_id]["version_id"] == "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY"
    panoptic, cutout = (messages[o.job_id] for o in outcomes)
    assert panoptic["task"] == "segq.panoptic" and panoptic["queue"] == settings.queue_batch
    assert panoptic["options"]["min_score"] == 0.6
    assert cutout["task"] == "segq.cutout" and cutout["queue"] == settings.queue_interactive
    assert cutout["prompt"] == {"point": [10.0, 20.0]}


def test_a_redelivered_event_makes_no_second_job(
    client: SegmentationClient, rules: list[EventRule], settings: Settings
) -> None:
    event = aws_event(s3_record("uploads/cat.jpg"))
    first = handle_event(event, client, rules)
    again = handle_event(json.loads(json.dumps(event)), client, rules)

    assert [o.status for o in again] == ["duplicate", "duplicate"]
    assert [o.job_id for o in again] == [o.job_id for o in first]
    assert len(enqueued(settings)) == 2


def test_a_new_version_of_the_same_key_is_a_new_job(client: SegmentationClient, rules: list[EventRule]) -> None:
    first = handle_event(aws_event(s3_record("uploads/cat.jpg", version="v1")), client, rules)
    second = handle_event(aws_event(s3_record("uploads/cat.jpg", version="v2")), client, rules)
    assert [o.status for o in second] == ["submitted", "submitted"]
    assert {o.job_id for o in first}.isdisjoint(o.job_id for o in second)


def test_without_versioning_the_etag_tells_uploads_apart(client: SegmentationClient, rules: list[EventRule]) -> None:
    one = handle_event(aws_event(s3_record("clicks/a.png", version=None, etag="aaaa")), client, rules)
    same = handle_event(aws_event(s3_record("clicks/a.png", version="null", etag='"aaaa"')), client, rules)
    other = handle_event(aws_event(s3_record("clicks/a.png", version=None, etag="bbbb")), client, rules)
    assert [o.status for o in one + same + other] == ["submitted", "duplicate", "submitted"]


def test_keys_are_url_decoded(client: SegmentationClient, rules: list[EventRule], settings: Settings) -> None:
    # "uploads/my photo été (1).JPG" as S3 encodes it in events.
    outcomes = handle_event(aws_event(s3_record("uploads/my+photo+%C3%A9t%C3%A9+%281%29.JPG")), client, rules)

    image = f"s3://{BUCKET}/uploads/my photo été (1).JPG"
    assert [o.status for o in outcomes] == ["submitted", "submitted"]
    assert {enqueued(settings)[o.job_id]["image"] for o in outcomes} == {image}
    assert client.status(outcomes[0].job_id).image == image


@pytest.mark.parametrize(
    "record, reason",
    [
        (s3_record("uploads/notes.txt"), "not an image suffix"),
        (s3_record("uploads/"), "not an image suffix"),
        (s3_record("uploads/cat.jpg", event="ObjectRemoved:Delete"), "not an object creation"),
        (s3_record("incoming/cat.jpg"), "no rule"),
        (s3_record("any/cat.jpg", bucket="unknown-bucket"), "no rule"),
        (s3_record("jobs/abc/cutout.png", bucket="segq-output"), "output bucket"),
        (s3_record("cat.jpg", bucket="elsewhere"), "forbidden_location"),
        (s3_record("uploads/a/../../secret.jpg"), "forbidden_location"),
    ],
)
def test_objects_that_are_not_ours_to_process_are_ignored(
    client: SegmentationClient, rules: list[EventRule], settings: Settings, record: dict, reason: str
) -> None:
    outcomes = handle_event(aws_event(record), client, rules)

    assert outcomes and all(o.status == "ignored" and reason in o.reason for o in outcomes)
    assert enqueued(settings) == {}


def test_the_suffix_is_per_rule(client: SegmentationClient, rules: list[EventRule]) -> None:
    [jpg] = handle_event(aws_event(s3_record("clicks/a.jpg")), client, rules)
    [png] = handle_event(aws_event(s3_record("clicks/a.png")), client, rules)
    assert (jpg.status, png.status) == ("ignored", "submitted")


def test_one_event_with_several_records(client: SegmentationClient, rules: list[EventRule]) -> None:
    event = aws_event(s3_record("uploads/a.jpg"), s3_record("uploads/b.txt"), s3_record("clicks/c.png"))
    outcomes = handle_event(event, client, rules)
    assert [(o.status, o.image.rsplit("/", 1)[1]) for o in outcomes] == [
        ("submitted", "a.jpg"),
        ("submitted", "a.jpg"),
        ("ignored", "b.txt"),
        ("ignored", "b.txt"),
        ("submitted", "c.png"),
    ]


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda e: sns_envelope(e), id="sns"),
        pytest.param(lambda e: lambda_sqs_event(e), id="sqs-lambda"),
        pytest.param(lambda e: lambda_sqs_event(sns_envelope(e)), id="sns-in-sqs"),
        pytest.param(
            lambda e: {"Records": [{"EventSource": "aws:sns", "Sns": {"Message": json.dumps(e)}}]}, id="sns-lambda"
        ),
    ],
)
def test_envelopes_are_unwrapped(client: SegmentationClient, rules: list[EventRule], wrap: Any) -> None:
    outcomes = handle_event(wrap(aws_event(s3_record("clicks/x%20y.png"))), client, rules)
    assert [(o.status, o.image) for o in outcomes] == [("submitted", f"s3://{BUCKET}/clicks/x y.png")]


def test_minio_events(client: SegmentationClient, rules: list[EventRule], settings: Settings) -> None:
    event = minio_event("uploads/dog+%26+cat.webp")
    outcomes = handle_event(event, client, rules)
    assert [o.status for o in outcomes] == ["submitted", "submitted"]
    assert enqueued(settings)[outcomes[0].job_id]["image"] == f"s3://{BUCKET}/uploads/dog & cat.webp"
    assert [o.status for o in handle_event(event, client, rules)] == ["duplicate", "duplicate"]


def test_s3_test_event_is_accepted_and_does_nothing(client: SegmentationClient, rules: list[EventRule]) -> None:
    test_event = {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2026-11-24T12:00:00.000Z",
        "Bucket": BUCKET,
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    }
    assert handle_event(test_event, client, rules) == []
    assert handle_event(sns_envelope(test_event), client, rules) == []


@pytest.mark.parametrize(
    "event",
    [
        [],
        {"hello": "world"},
        {"Records": "x"},
        {"Records": [{"s3": {}}]},
        {"Records": [{"eventSource": "aws:sqs", "body": "{not json"}]},
    ],
)
def test_malformed_events_are_invalid_payloads(client: SegmentationClient, rules: list[EventRule], event: Any) -> None:
    with pytest.raises(InvalidPayload):
        handle_event(event, client, rules)


def test_lambda_handler_takes_settings_from_the_environment(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEGQ_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("SEGQ_EVENT_RULES", json.dumps(RULES[2:3]))
    get_settings.cache_clear()
    events._lambda_setup.cache_clear()
    try:
        answer = lambda_handler(lambda_sqs_event(aws_event(s3_record("clicks/p.png"))), context=None)
    finally:
        get_settings.cache_clear()
        events._lambda_setup.cache_clear()

    [outcome] = answer["outcomes"]
    assert outcome["status"] == "submitted" and outcome["task"] == "segq.segment"
    assert SegmentationClient(settings).status(outcome["job_id"]).state is JobState.queued


# --- the SQS poller ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqs() -> Iterator[Any]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield boto3.client(
            "sqs", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
    finally:
        server.stop()


def test_sqs_poller_submits_dedupes_and_deletes(
    sqs: Any, client: SegmentationClient, rules: list[EventRule], settings: Settings
) -> None:
    queue = sqs.create_queue(QueueName="segq-uploads")["QueueUrl"]
    upload = aws_event(s3_record("clicks/one.png"))
    bodies = [
        upload,
        upload,  # S3 delivered the same event twice
        sns_envelope(aws_event(s3_record("clicks/two.png"))),
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET},
        aws_event(s3_record("clicks/three.txt")),
    ]
    for body in bodies:
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(body))
    sqs.send_message(QueueUrl=queue, MessageBody="this is not an event")

    received = SqsPoller(queue, client, rules, sqs, wait_time_s=1).run(max_messages=6, stop_after=30)

    assert received == 6
    images = sorted(m["image"] for m in enqueued(settings).values())
    assert images == [f"s3://{BUCKET}/clicks/one.png", f"s3://{BUCKET}/clicks/two.png"]
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    # Everything handled was deleted; only the malformed message waits for the DLQ.
    assert (attrs["ApproximateNumberOfMessages"], attrs["ApproximateNumberOfMessagesNotVisible"]) == ("0", "1")



def test_malformed_rules_in_the_environment_are_an_invalid_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGQ_EVENT_RULES", "[{not json")
    get_settings.cache_clear()
    try:
        with pytest.raises(InvalidConfig, match="event_rules"):
            events.configured()
    finally:
        get_settings.cache_clear()
