"""S3 upload events from an SQS queue (S3 -> SQS, or S3 -> SNS -> SQS) become jobs:
``segq events sqs --queue-url URL``."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from api_client.events import EventOutcome, _json, configured, handle_event
from config.contract import EventRule
from config.errors import InvalidPayload

if TYPE_CHECKING:
    from api_client.client import SegmentationClient

log = logging.getLogger("segq.events")


class SqsPoller:
    """Consume S3 events from an SQS queue (S3 -> SQS, or S3 -> SNS -> SQS).

    A message is deleted only after its jobs are submitted: if this process dies, or
    Redis is briefly away, the message comes back after the visibility timeout and
    idempotency turns it into duplicates. A message that is not an S3 event is logged
    and left alone, so the queue's redrive policy moves it to a dead-letter queue.
    """

    def __init__(
        self,
        queue_url: str,
        client: "SegmentationClient",
        rules: list[EventRule],
        sqs_client: Any = None,
        *,
        wait_time_s: int = 20,
    ) -> None:
        if sqs_client is None:
            import boto3

            sqs_client = boto3.client("sqs", region_name=client.settings.s3_region)
        self.queue_url = queue_url
        self.client = client
        self.rules = rules
        self.sqs = sqs_client
        self.wait_time_s = wait_time_s
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Finish the current receive and return from ``run``."""
        self._stopping.set()

    def run(self, max_messages: Optional[int] = None, stop_after: Optional[float] = None) -> int:
        """Poll until ``stop()``, ``max_messages`` received or ``stop_after`` seconds;
        returns the number of messages received."""
        deadline = None if stop_after is None else time.monotonic() + stop_after
        received = 0
        while not self._stopping.is_set():
            wait = self.wait_time_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, int(left))
            batch = 10 if max_messages is None else min(10, max_messages - received)
            if batch <= 0:
                break
            response = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=batch, WaitTimeSeconds=wait
            )
            for message in response.get("Messages", []):
                received += 1
                self.handle_message(message)
        return received

    def handle_message(self, message: dict[str, Any]) -> Optional[list[EventOutcome]]:
        """Handle one SQS message; None if it was left on the queue."""
        message_id = message.get("MessageId")
        try:
            outcomes = handle_event(_json(message.get("Body"), "SQS message body"), self.client, self.rules)
        except InvalidPayload as err:
            log.error("SQS message %s is not an S3 event, left for the dead-letter queue: %s", message_id, err)
            return None
        except Exception:  # noqa: BLE001  the poller outlives a Redis or broker outage
            log.exception("SQS message %s not handled; it will be delivered again", message_id)
            return None
        self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        return outcomes


def cmd_events_sqs(args: argparse.Namespace) -> int:
    """``segq events sqs --queue-url URL``: poll until interrupted."""
    import boto3

    from api_client.client import SegmentationClient

    settings, rules = configured()
    sqs = boto3.client("sqs", region_name=args.region or settings.s3_region, endpoint_url=args.endpoint_url)
    poller = SqsPoller(args.queue_url, SegmentationClient(settings), rules, sqs)
    log.info("polling %s with %d rule(s)", args.queue_url, len(rules))
    poller.run(max_messages=args.max_messages)
    return 0
