"""The job queue: receive, delete, hand back, dead-letter, and the visibility heartbeat."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdworker._structlog import structlog
from sdworker.telemetry import untraced

if TYPE_CHECKING:  # typing-only stubs: not imported at run time
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import ChangeMessageVisibilityBatchRequestEntryTypeDef

    from sdworker.telemetry import JobTrace

log = structlog.get_logger("sdworker.queue")

MAX_VISIBILITY_S = 43_200  # SQS caps the total visibility since receipt at 12 h
_BATCH = 10


@dataclass
class Delivery:
    """A received message while this worker holds it; `receipt_handle` is always the newest."""

    message_id: str
    body: str
    receipt_handle: str
    receive_count: int
    sent_at: float | None
    attributes: dict[str, Any]
    received_at: float = field(default_factory=time.monotonic)
    visible_until: float = 0.0
    trace_header: str | None = None  # the AWSTraceHeader system attribute (X-Ray format)
    trace: JobTrace | None = None  # the job's trace while the message is held

    @classmethod
    def from_sqs(cls, message: Any, visibility_timeout: int) -> Delivery:
        """Build from one `ReceiveMessage` entry."""
        system = message.get("Attributes", {})
        sent = system.get("SentTimestamp")
        return cls(
            message_id=message["MessageId"],
            body=message.get("Body", ""),
            receipt_handle=message["ReceiptHandle"],
            receive_count=int(system.get("ApproximateReceiveCount", "1")),
            sent_at=int(sent) / 1000 if sent else None,
            attributes=dict(message.get("MessageAttributes", {})),
            visible_until=time.monotonic() + visibility_timeout,
            trace_header=system.get("AWSTraceHeader"),
        )

    @property
    def queued_ms(self) -> int | None:
        """How long the message waited in the queue before this receive."""
        return None if self.sent_at is None else max(0, int((time.time() - self.sent_at) * 1000))


class JobQueue:
    """One SQS queue, with the per-entry failure checks batch calls need."""

    def __init__(self, sqs: SQSClient, url: str, *, visibility_timeout: int, wait_s: int) -> None:
        self.sqs = sqs
        self.url = url
        self.visibility_timeout = visibility_timeout
        self.wait_s = wait_s

    async def receive(self, max_messages: int) -> list[Delivery]:
        """Long-poll for up to `max_messages` (1 to 10) messages."""
        response = await self.sqs.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=max(1, min(_BATCH, max_messages)),
            WaitTimeSeconds=self.wait_s,
            VisibilityTimeout=self.visibility_timeout,
            MessageSystemAttributeNames=[
                "ApproximateReceiveCount",
                "SentTimestamp",
                "AWSTraceHeader",
            ],
            MessageAttributeNames=["All"],
        )
        return [Delivery.from_sqs(m, self.visibility_timeout) for m in response.get("Messages", [])]

    async def delete(self, delivery: Delivery) -> None:
        """Delete a message whose outcome is recorded."""
        await self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=delivery.receipt_handle)

    async def set_visibility(
        self, deliveries: Sequence[Delivery], timeout_s: int
    ) -> list[Delivery]:
        """Change visibility in batches of ten; return the deliveries whose change failed."""
        failed: list[Delivery] = []
        for start in range(0, len(deliveries), _BATCH):
            failed += await self._set_visibility_batch(
                deliveries[start : start + _BATCH], timeout_s
            )
        return failed

    async def _set_visibility_batch(
        self, batch: Sequence[Delivery], timeout_s: int
    ) -> list[Delivery]:
        entries: list[ChangeMessageVisibilityBatchRequestEntryTypeDef] = [
            {"Id": str(n), "ReceiptHandle": d.receipt_handle, "VisibilityTimeout": timeout_s}
            for n, d in enumerate(batch)
        ]
        response = await self.sqs.change_message_visibility_batch(
            QueueUrl=self.url, Entries=entries
        )
        for failure in response.get("Failed", []):
            log.warning(
                "visibility change failed",
                message_id=batch[int(failure["Id"])].message_id,
                code=failure.get("Code"),
                reason=failure.get("Message"),
            )
        return [batch[int(failure["Id"])] for failure in response.get("Failed", [])]

    async def release(self, deliveries: Sequence[Delivery], delay_s: int = 0) -> None:
        """Hand messages back: visible again after `delay_s` seconds (0 = at once)."""
        if deliveries:
            await self.set_visibility(deliveries, max(0, min(delay_s, MAX_VISIBILITY_S)))

    async def dead_letter_url(self) -> str | None:
        """The URL of the queue's dead-letter queue, from its redrive policy, if it has one."""
        attributes = await self.sqs.get_queue_attributes(
            QueueUrl=self.url, AttributeNames=["RedrivePolicy"]
        )
        policy = attributes.get("Attributes", {}).get("RedrivePolicy")
        if not policy:
            return None
        arn = json.loads(policy)["deadLetterTargetArn"]
        _, _, _, _, account, name = arn.split(":")
        response = await self.sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)
        return response["QueueUrl"]

    async def send_to(self, queue_url: str, delivery: Delivery, reason: str) -> None:
        """Copy the original message, body and attributes, to another queue (the DLQ)."""
        attributes = {k: _attribute_value(v) for k, v in list(delivery.attributes.items())[:9]}
        attributes["sdworker_error"] = {"DataType": "String", "StringValue": reason[:1000] or "-"}
        await self.sqs.send_message(
            QueueUrl=queue_url, MessageBody=delivery.body or " ", MessageAttributes=attributes
        )


def _attribute_value(value: dict[str, Any]) -> Any:
    keep = ("DataType", "StringValue", "BinaryValue")
    return {key: value[key] for key in keep if key in value}


class Heartbeat:
    """Keeps every held message invisible while its job runs, until it is deleted or released."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.held: dict[str, Delivery] = {}
        self.failures = 0  # failed calls and failed entries, for the metrics
        self.lock = asyncio.Lock()  # a hand-back and a beat never cross: see `beat`

    def hold(self, delivery: Delivery) -> Delivery:
        """Start extending `delivery`; a duplicate receive refreshes the held receipt handle."""
        held = self.held.get(delivery.message_id)
        if held is None:
            self.held[delivery.message_id] = delivery
            return delivery
        held.receipt_handle = delivery.receipt_handle
        held.visible_until = delivery.visible_until
        return held

    def drop(self, deliveries: Iterable[Delivery]) -> None:
        """Stop extending these deliveries (deleted or handed back)."""
        for delivery in deliveries:
            self.held.pop(delivery.message_id, None)

    def is_held(self, message_id: str) -> bool:
        """Whether this worker already holds the message."""
        return message_id in self.held

    async def run(self) -> None:
        """Extend due messages every few seconds, half a visibility timeout before they expire."""
        timeout = self.queue.visibility_timeout
        while True:
            await asyncio.sleep(max(0.2, min(5.0, timeout / 4)))
            try:
                with untraced():  # one call for many jobs, every few seconds: not a trace each
                    await self.beat()
            except Exception as error:  # the heartbeat must outlive any failure: log and go on
                self.failures += 1
                log.warning("heartbeat failed; retrying", error=repr(error))

    async def beat(self) -> None:
        """Extend every held message whose visibility ends within half a timeout."""
        now = time.monotonic()
        timeout = self.queue.visibility_timeout
        due = [d for d in self.held.values() if d.visible_until - now < timeout / 2]
        by_extension: dict[int, list[Delivery]] = {}
        for delivery in due:
            extension = min(timeout, int(MAX_VISIBILITY_S - (now - delivery.received_at)) - 1)
            if extension > 0:
                by_extension.setdefault(extension, []).append(delivery)
        for extension, deliveries in by_extension.items():
            async with self.lock:  # a message handed back meanwhile must not be hidden again
                batch = [d for d in deliveries if self.held.get(d.message_id) is d]
                failed = await self.queue.set_visibility(batch, extension) if batch else []
            self.failures += len(failed)
            for delivery in batch:
                if delivery not in failed:
                    delivery.visible_until = now + extension
