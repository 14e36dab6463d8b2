"""Upload events -> jobs: S3 event notifications become segq jobs by configured rules.

    SEGQ_EVENT_RULES='[{"bucket": "segq-input", "prefix": "uploads/", "task": "panoptic"},
                       {"bucket": "segq-input", "prefix": "uploads/", "task": "cutout"}]'

Every new object under a rule's bucket and prefix whose name ends in one of its image
suffixes becomes one job per matching rule. Accepted envelopes, all reduced to their S3
records by ``s3_records``:

- AWS S3 event notifications (``{"Records": [{"eventName": "ObjectCreated:Put", "s3": ...}]}``);
- the same inside an SNS notification (``{"Type": "Notification", "Message": "<json>"}``);
- the same inside an SQS message body, or Lambda's SQS and SNS trigger events;
- MinIO's webhook events (``{"EventName": "s3:ObjectCreated:Put", "Key": ..., "Records": [...]}``).

Delivery of these events is at least once (S3, SNS and SQS all redeliver), so each job
is submitted with an idempotency key made of the object's bucket, key, version (its
versionId, else its ETag, else the event's sequencer), the task and the rule: the same
upload seen twice makes one job, while a new upload under the same key makes a new one.

Entry points: ``handle_event`` (any caller), ``lambda_handler`` (AWS Lambda),
``api_client.events.sqs`` (a long-polling SQS consumer) and ``POST /v1/events/s3`` of
the HTTP API (``api_client.http``; for MinIO's webhook).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional
from urllib.parse import unquote_plus

from config.contract import EventRule, S3Ref
from config.errors import InvalidConfig, InvalidPayload, SegqError
from config.settings import Settings, get_settings

if TYPE_CHECKING:
    from api_client.client import SegmentationClient

log = logging.getLogger("segq.events")

TEST_EVENT = "s3:TestEvent"


def configured() -> tuple[Settings, list[EventRule]]:
    """The environment's settings and event rules, for the entry points: ``InvalidConfig``
    when either is malformed, or when there are no rules (every event would be ignored)."""
    settings = get_settings()
    if not settings.event_rules:
        raise InvalidConfig("no SEGQ_EVENT_RULES: every event would be ignored")
    return settings, list(settings.event_rules)


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadedObject:
    """The part of one S3 event record segq cares about."""

    event_name: str
    bucket: str
    key: str
    version_id: Optional[str]
    etag: Optional[str]
    sequencer: Optional[str]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "UploadedObject":
        try:
            s3 = record["s3"]
            obj = s3["object"]
            name, bucket, raw_key = record["eventName"], s3["bucket"]["name"], obj["key"]
        except (KeyError, TypeError) as err:
            raise InvalidPayload(f"S3 event record without {err}") from None
        # "null" is what versioning-suspended buckets report: there is no version to pin.
        version = obj.get("versionId") if obj.get("versionId") not in (None, "", "null") else None
        etag = (obj.get("eTag") or "").strip('"') or None
        # Keys arrive form-encoded ("my+photo%C3%A9.jpg" is "my photoé.jpg").
        return cls(name, bucket, unquote_plus(raw_key), version, etag, obj.get("sequencer") or None)

    @property
    def created(self) -> bool:
        # AWS says "ObjectCreated:Put"; MinIO says "s3:ObjectCreated:Put".
        return self.event_name.removeprefix("s3:").startswith("ObjectCreated:")

    @property
    def revision(self) -> str:
        return self.version_id or self.etag or self.sequencer or ""

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


Status = Literal["submitted", "duplicate", "ignored"]


@dataclass(frozen=True)
class EventOutcome:
    """What became of one object (for one rule, once a rule matched its location)."""

    status: Status
    image: str
    reason: Optional[str] = None
    rule: Optional[int] = None
    task: Optional[str] = None
    job_id: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def s3_records(event: Any) -> Iterator[dict[str, Any]]:
    """The S3 records inside ``event``, whatever the envelope; ``InvalidPayload`` if it
    is none of the known ones. S3's ``s3:TestEvent`` (sent when a notification is
    configured) has none."""
    if not isinstance(event, dict):
        raise InvalidPayload(f"an event must be a JSON object, got {type(event).__name__}")
    if event.get("Event") == TEST_EVENT:
        return
    if event.get("Type") == "Notification" and "Message" in event:  # SNS
        yield from s3_records(_json(event["Message"], "SNS Message"))
        return
    records = event.get("Records")
    if not isinstance(records, list):
        raise InvalidPayload("not an S3 event notification: no Records list")
    for record in records:
        if not isinstance(record, dict):
            raise InvalidPayload("an event record must be a JSON object")
        if "s3" in record:
            yield record
        elif record.get("eventSource") == "aws:sqs" and "body" in record:  # Lambda SQS trigger
            yield from s3_records(_json(record["body"], "SQS message body"))
        elif isinstance(record.get("Sns"), dict):  # Lambda SNS trigger
            yield from s3_records(_json(record["Sns"].get("Message"), "SNS Message"))
        else:
            raise InvalidPayload("event record is neither an S3 record nor an SQS/SNS envelope")


def _json(text: Any, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError) as err:
        raise InvalidPayload(f"{what} is not JSON: {err}") from None


def idempotency_key(obj: UploadedObject, task: str, rule_index: int) -> str:
    parts = json.dumps([obj.bucket, obj.key, obj.revision, task, rule_index])
    return "event:" + hashlib.sha256(parts.encode()).hexdigest()


def handle_event(event: Any, client: "SegmentationClient", rules: list[EventRule]) -> list[EventOutcome]:
    """Submit the jobs ``event`` calls for and say what became of each object.

    Raises ``InvalidPayload`` for something that is not an S3 event. Faults that may pass
    (Redis or the broker unreachable) propagate, so the event's sender delivers it again;
    the jobs already submitted are then recognised as duplicates.
    """
    outcomes: list[EventOutcome] = []
    for record in s3_records(event):
        outcomes.extend(_handle_object(UploadedObject.from_record(record), client, rules))
    return outcomes


def _handle_object(obj: UploadedObject, client: "SegmentationClient", rules: list[EventRule]) -> list[EventOutcome]:
    def ignored(reason: str, **kw: Any) -> EventOutcome:
        return EventOutcome("ignored", obj.uri, reason, **kw)

    if not obj.created:
        return [ignored(f"not an object creation ({obj.event_name})")]
    if obj.bucket == client.settings.output_bucket:
        return [ignored("in the output bucket: segq never processes its own outputs")]
    matching = [(i, rule) for i, rule in enumerate(rules) if rule.matches_location(obj.bucket, obj.key)]
    if not matching:
        return [ignored("no rule for this bucket and prefix")]
    if any(rule.matches_suffix(obj.key) for _, rule in matching):
        try:
            client.storage.check_readable(S3Ref(bucket=obj.bucket, key=obj.key))
        except SegqError as err:
            return [ignored(f"{err.code}: {err.message}")]

    outcomes = []
    for index, rule in matching:
        if not rule.matches_suffix(obj.key):
            outcomes.append(ignored(f"not an image suffix ({', '.join(rule.suffixes)})", rule=index, task=rule.task))
            continue
        try:
            job = client.submit(
                rule.task, obj.uri, rule.prompt, version_id=obj.version_id,
                idempotency_key=idempotency_key(obj, rule.task, index), **rule.options,
            )  # fmt: skip
        except SegqError as err:
            if err.retryable:
                raise
            outcomes.append(ignored(f"{err.code}: {err.message}", rule=index, task=rule.task))
            continue
        status: Status = "submitted" if job.created else "duplicate"
        log.info("%s %s job %s for %s (rule %d)", status, rule.task, job.id, obj.uri, index)
        outcomes.append(EventOutcome(status, obj.uri, rule=index, task=rule.task, job_id=job.id))
    return outcomes


# --- adapters --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _lambda_setup() -> tuple["SegmentationClient", list[EventRule]]:
    from api_client.client import SegmentationClient

    settings, rules = configured()
    return SegmentationClient(settings), rules


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """AWS Lambda entry point for S3, SNS or SQS triggers; settings from ``SEGQ_*``.
    The client is made once per Lambda container and reused by later invocations. An
    exception fails the invocation, so Lambda retries it and idempotency dedupes."""
    client, rules = _lambda_setup()
    return {"outcomes": [o.to_dict() for o in handle_event(event, client, rules)]}
