"""Job webhooks: when a job with a ``callback_url`` ends ``succeeded`` or ``failed``, POST
its outcome there, signed, with retries.

The request::

    POST <callback_url>
    Content-Type: application/json
    X-Segq-Event: job.succeeded | job.failed
    X-Segq-Delivery: <id, the same on every attempt: receivers dedupe on it>
    X-Segq-Timestamp: <unix seconds of this attempt>
    X-Segq-Signature: sha256=<hex HMAC-SHA256(webhook_secret, "{timestamp}.{body}")>

    {"event": "job.succeeded", "job_id": ..., "task": ..., "state": ..., "image": ...,
     "result": {...} | "error": {"code": ..., "message": ...},
     "created_at": ..., "started_at": ..., "finished_at": ..., "attempts": ...}

Verifying, on the receiving side (any language; this is ``verify_signature``): take the
raw body bytes as received (before any JSON parsing), compute
``HMAC-SHA256(secret, timestamp + "." + body)`` in hex, compare it with the header after
``sha256=`` in constant time, and refuse timestamps more than five minutes from now so a
captured request cannot be replayed later. Without ``SEGQ_WEBHOOK_SECRET`` no signature
header is sent.

Delivery happens after the job's status is final and never changes it: connection
errors, timeouts, 429 and 5xx are retried with exponential backoff and full jitter (the
job retry settings, ``retry_backoff_s`` and ``retry_backoff_max_s``), up to
``webhook_max_attempts``; other answers are final (a 3xx is not followed, since a
redirect could lead past the URL guard). The outcome comes back as a ``DeliveryResult``
for the caller to store.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

from config.contract import JobState, JobStatus
from config.errors import InvalidURL
from config.retry import full_jitter
from config.settings import Settings
from config.urlguard import check_url

log = logging.getLogger("segq.webhooks")

EVENTS = {JobState.succeeded: "job.succeeded", JobState.failed: "job.failed"}
SIGNATURE_PREFIX = "sha256="
USER_AGENT = "segq-webhook/1"
# The receiver's answer is not used; reading a little of it lets the connection close
# cleanly without letting a hostile receiver stream forever.
MAX_RESPONSE_BYTES = 64 << 10


@dataclass(frozen=True)
class DeliveryResult:
    """What happened to one webhook, for the job's status (``webhook``)."""

    event: str
    delivery_id: str
    delivered: bool
    attempts: int
    status_code: Optional[int] = None
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Segq-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes | str,
    signature: str,
    tolerance_s: float = 300,
    *,
    now: Optional[float] = None,
) -> bool:
    """True when ``signature`` is segq's signature of the raw ``body`` at ``timestamp``
    and the timestamp is within ``tolerance_s`` of ``now`` (replay protection)."""
    try:
        sent_at = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - sent_at) > tolerance_s:
        return False
    raw = body.encode() if isinstance(body, str) else body
    return hmac.compare_digest(sign(secret, timestamp, raw).encode(), str(signature).encode())


def deliver_for_job(settings: Settings, status: JobStatus, callback_url: Optional[str]) -> Optional[DeliveryResult]:
    """POST the final ``status`` to ``callback_url``. None when there is nothing to send
    (no URL, or a job that did not end succeeded or failed). Never raises: a webhook
    cannot fail the job it reports on."""
    event = EVENTS.get(status.state)
    if not callback_url or event is None:
        return None
    delivery_id = uuid.uuid4().hex
    try:
        body = json.dumps(_payload(event, status), separators=(",", ":")).encode()
        return deliver(settings, callback_url, event, body, delivery_id=delivery_id)
    except Exception as exc:  # noqa: BLE001  a bug here must not reach the job runner
        log.exception("webhook for job %s crashed", status.job_id)
        return DeliveryResult(event, delivery_id, False, 0, error=f"{type(exc).__name__}: {exc}")


def deliver(
    settings: Settings, url: str, event: str, body: bytes, *, delivery_id: Optional[str] = None
) -> DeliveryResult:
    """POST ``body`` to ``url`` with retries; see the module notes for the rules."""
    delivery_id = delivery_id or uuid.uuid4().hex
    attempts = settings.webhook_max_attempts
    for attempt in range(1, attempts + 1):
        outcome = _attempt(settings, url, event, body, delivery_id)
        if outcome.status_code is not None and 200 <= outcome.status_code < 300:
            log.info("webhook %s delivered to %s (HTTP %d)", delivery_id, _safe(url), outcome.status_code)
            return DeliveryResult(event, delivery_id, True, attempt, outcome.status_code)
        if not outcome.retryable or attempt == attempts:
            break
        delay = _backoff(attempt, settings, outcome.retry_after)
        log.info("webhook %s to %s: %s; attempt %d in %.2fs",
                 delivery_id, _safe(url), outcome.error, attempt + 1, delay)  # fmt: skip
        time.sleep(delay)
    log.warning("webhook %s to %s not delivered after %d attempt(s): %s",
                delivery_id, _safe(url), attempt, outcome.error)  # fmt: skip
    return DeliveryResult(event, delivery_id, False, attempt, outcome.status_code, outcome.error)


@dataclass(frozen=True)
class _Outcome:
    status_code: Optional[int] = None
    error: Optional[str] = None
    retryable: bool = False
    retry_after: Optional[float] = None


def _attempt(settings: Settings, url: str, event: str, body: bytes, delivery_id: str) -> _Outcome:
    """One try: vet the URL (again: DNS answers change), sign, POST."""
    try:
        ip = check_url(url, allow_private=settings.webhook_allow_private)
    except InvalidURL as err:
        # A name that does not resolve may be a DNS blip; a refused address is final.
        return _Outcome(error=str(err), retryable=err.details.get("reason") == "unresolvable")
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Segq-Event": event,
        "X-Segq-Delivery": delivery_id,
        "X-Segq-Timestamp": timestamp,
    }
    secret = settings.webhook_secret.get_secret_value()
    if secret:
        headers["X-Segq-Signature"] = sign(secret, timestamp, body)
    try:
        status_code, retry_after = _post(url, ip, body, headers, settings.webhook_timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        return _Outcome(error=f"{type(exc).__name__}: {exc}", retryable=True)
    retryable = status_code == 429 or status_code >= 500
    return _Outcome(status_code, f"HTTP {status_code}", retryable, retry_after)


def _payload(event: str, status: JobStatus) -> dict[str, Any]:
    fields = {"job_id", "task", "state", "image", "result", "error", "created_at", "started_at",
              "finished_at", "attempts"}  # fmt: skip
    return {"event": event, **status.model_dump(mode="json", include=fields, exclude_none=True)}


def _post(url: str, ip: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, Optional[float]]:
    """One POST to the vetted ``ip``, with the URL's own host in ``Host`` and TLS SNI
    (and certificate checks), so the name is not resolved a second time."""
    parts = urlsplit(url)
    conn = connection_to(parts.scheme, parts.hostname or "", parts.port, ip, timeout)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", target, body, headers)
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        return response.status, _retry_after(response.getheader("Retry-After"))
    finally:
        conn.close()


def connection_to(
    scheme: str, host: str, port: Optional[int], ip: str, timeout: float
) -> http.client.HTTPConnection:
    """An HTTP(S) connection for ``host`` whose socket goes to the vetted address ``ip``.

    The one reach into http.client's internals: ``HTTPConnection.connect`` (and so
    ``HTTPSConnection.connect``, before its TLS handshake) opens its socket through the
    instance's ``_create_connection``. Pointing that at ``ip`` keeps everything else (Host
    header, SNI, certificate hostname) on the URL's name, so the name is not resolved a
    second time; ``tests/test_webhooks.py`` pins that behaviour."""
    cls = http.client.HTTPSConnection if scheme.lower() == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=timeout)
    conn._create_connection = (  # type: ignore[attr-defined]
        lambda address, *args: socket.create_connection((ip, address[1]), *args)
    )
    return conn


def _retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # the HTTP-date form is rare from webhook receivers; backoff covers it


def _backoff(attempt: int, settings: Settings, retry_after: Optional[float]) -> float:
    """Full jitter spreads the retries of many jobs whose receiver went down together;
    a receiver's Retry-After is honoured up to the backoff cap."""
    cap = settings.retry_backoff_max_s
    delay = full_jitter(attempt - 1, settings.retry_backoff_s, cap)
    return min(cap, max(delay, retry_after or 0.0))


def _safe(url: str) -> str:
    """The URL without its query, which often carries the receiver's own token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
