"""An HTTP endpoint for S3 event webhooks (MinIO's ``notify_webhook`` target, or anything
that POSTs S3 event JSON).

    segq events serve --host 0.0.0.0 --port 8090 --token "$SEGQ_EVENT_TOKEN"

    mc admin config set myminio notify_webhook:segq \\
        endpoint="http://segq-events:8090/" auth_token="$SEGQ_EVENT_TOKEN"

Answers: 200 with ``{"outcomes": [...]}`` (``api_client.events.EventOutcome``), 400 for
a body that is not JSON or not an S3 event, 401 for a missing or wrong bearer token,
413 for an oversized body, and 503 when the jobs cannot be submitted right now (Redis or
the broker down): MinIO keeps the event in its queue and sends it again, and idempotency
makes the second delivery a duplicate. GET answers 200, for health checks.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Optional

from api_client.events import configured, handle_event
from config.contract import EventRule
from config.errors import InvalidPayload

if TYPE_CHECKING:
    from api_client.client import SegmentationClient

log = logging.getLogger("segq.events")

# One S3 event is a few KB; MinIO sends one per request.
MAX_BODY_BYTES = 1 << 20


class EventServer(ThreadingHTTPServer):
    """A threaded HTTP server that turns POSTed S3 events into jobs."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        client: "SegmentationClient",
        rules: list[EventRule],
        *,
        token: Optional[str] = None,
    ) -> None:
        super().__init__(address, _Handler)
        self.client = client
        self.rules = rules
        self.token = token

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def authorized(self, header: Optional[str]) -> bool:
        if not self.token:
            return True
        scheme, _, credentials = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode())


class _Handler(BaseHTTPRequestHandler):
    server: EventServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._reply(200, {"status": "ok"})

    def do_POST(self) -> None:
        if not self.server.authorized(self.headers.get("Authorization")):
            return self._reply(401, {"code": "unauthorized", "message": "missing or wrong bearer token"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(411, {"code": "length_required", "message": "send a Content-Length"})
        if length > MAX_BODY_BYTES:
            return self._reply(413, {"code": "payload_too_large", "message": f"over {MAX_BODY_BYTES} bytes"})
        body = self.rfile.read(length)
        try:
            event = json.loads(body)
        except ValueError as err:
            return self._reply(400, {"code": "invalid_payload", "message": f"body is not JSON: {err}"})
        try:
            outcomes = handle_event(event, self.server.client, self.server.rules)
        except InvalidPayload as err:
            return self._reply(400, err.to_dict())
        except Exception as exc:  # noqa: BLE001  the sender retries; the server stays up
            log.exception("event not handled")
            return self._reply(503, {"code": "unavailable", "message": f"{type(exc).__name__}: {exc}"})
        self._reply(200, {"outcomes": [o.to_dict() for o in outcomes]})

    def _reply(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="segq-events"')
        if code >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def cmd_events_serve(args: argparse.Namespace) -> int:
    """``segq events serve``: serve until interrupted."""
    from api_client.client import SegmentationClient

    settings, rules = configured()
    # The environment keeps the token out of `ps` output.
    token = args.token or os.environ.get("SEGQ_EVENT_TOKEN")
    server = EventServer((args.host, args.port), SegmentationClient(settings), rules, token=token)
    log.info("listening for S3 events on %s with %d rule(s)%s", server.url, len(rules), "" if token else ", no token")
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
