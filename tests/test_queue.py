"""The job queue on SQS: receive, hand back, visibility changes, dead-lettering, heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from sdworker.aws import PROBE_CONFIG, AwsClients, aws_clients
from sdworker.local import LocalAws, LocalResources
from sdworker.queue import MAX_VISIBILITY_S, Delivery, Heartbeat, JobQueue
from tests.aws_helpers import drain_messages, eventually, queue_counts

TRACE = {"trace": {"DataType": "String", "StringValue": "abc-123"}}


@pytest.fixture(scope="module")
async def clients(moto: LocalAws) -> AsyncIterator[AwsClients]:
    """One set of clients for this module: opening them costs more than most tests here."""
    async with aws_clients() as opened:
        yield opened


def job_queue(clients: AwsClients, url: str, visibility_timeout: int = 30) -> JobQueue:
    """A JobQueue that polls without waiting."""
    return JobQueue(clients.sqs, url, visibility_timeout=visibility_timeout, wait_s=0)


async def receive_one(queue: JobQueue) -> Delivery:
    """Receive exactly one message from `queue`."""
    [delivery] = await queue.receive(10)
    return delivery


async def send_and_receive(
    clients: AwsClients, resources: LocalResources, visibility_timeout: int = 30
) -> tuple[JobQueue, Delivery]:
    """Put one message on the job queue and receive it with the given visibility timeout."""
    await clients.sqs.send_message(
        QueueUrl=resources.queue_url, MessageBody='{"id": "fox-1"}', MessageAttributes=TRACE
    )
    queue = job_queue(clients, resources.queue_url, visibility_timeout)
    return queue, await receive_one(queue)


async def test_receive_returns_body_count_timestamp_and_attributes(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A received message carries its body, receive count, send time and message attributes."""
    before = time.time()
    _, delivery = await send_and_receive(clients, resources)
    assert delivery.body == '{"id": "fox-1"}'
    assert delivery.receive_count == 1
    assert delivery.sent_at is not None
    assert before - 1 <= delivery.sent_at <= time.time() + 1
    assert delivery.attributes["trace"]["StringValue"] == "abc-123"


async def test_receive_on_an_empty_queue_returns_nothing(
    clients: AwsClients, resources: LocalResources
) -> None:
    """With nothing queued, receive returns an empty list."""
    assert await job_queue(clients, resources.queue_url).receive(10) == []


async def test_received_message_is_invisible_to_others(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A message this worker holds is in flight, not visible."""
    await send_and_receive(clients, resources)
    assert await queue_counts(clients, resources.queue_url) == (0, 1)


async def test_release_makes_the_message_visible_at_once(
    clients: AwsClients, resources: LocalResources
) -> None:
    """Releasing with no delay hands the message straight back to the queue."""
    queue, delivery = await send_and_receive(clients, resources)
    await queue.release([delivery])
    assert await queue_counts(clients, resources.queue_url) == (1, 0)


async def test_receive_count_grows_after_a_release(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A released message comes back with a higher receive count (each attempt counts)."""
    queue, delivery = await send_and_receive(clients, resources)
    await queue.release([delivery])
    again = await receive_one(queue)
    assert again.message_id == delivery.message_id
    assert again.receive_count == 2


async def test_delete_removes_the_message(clients: AwsClients, resources: LocalResources) -> None:
    """A deleted message is gone from the queue."""
    queue, delivery = await send_and_receive(clients, resources)
    await queue.delete(delivery)
    assert await queue_counts(clients, resources.queue_url) == (0, 0)


async def test_invalid_receipt_handle_is_reported_not_raised(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A visibility change SQS refuses for one entry is returned, and the others still apply."""
    queue, delivery = await send_and_receive(clients, resources)
    bogus = Delivery("not-a-message", "", "not-a-handle", 1, None, {})
    failed = await queue.set_visibility([delivery, bogus], 0)
    assert failed == [bogus]
    assert await queue_counts(clients, resources.queue_url) == (1, 0)


async def test_handle_of_a_deleted_message_is_reported(
    clients: AwsClients, resources: LocalResources
) -> None:
    """Changing the visibility of a message already deleted reports that delivery as failed."""
    queue, delivery = await send_and_receive(clients, resources)
    await queue.delete(delivery)
    assert await queue.set_visibility([delivery], 30) == [delivery]


async def test_visibility_changes_go_in_batches_of_ten(
    clients: AwsClients, resources: LocalResources
) -> None:
    """More than ten deliveries are changed in several batch calls, all of them applied."""
    queue = job_queue(clients, resources.queue_url)
    entries = [{"Id": str(n), "MessageBody": f"m{n}"} for n in range(10)]
    await clients.sqs.send_message_batch(QueueUrl=resources.queue_url, Entries=entries)
    await clients.sqs.send_message(QueueUrl=resources.queue_url, MessageBody="m10")
    held = await queue.receive(10)
    held += await queue.receive(10)
    assert len(held) == 11
    assert await queue.set_visibility(held, 0) == []
    assert await queue_counts(clients, resources.queue_url) == (11, 0)


async def test_dead_letter_url_comes_from_the_redrive_policy(
    clients: AwsClients, resources: LocalResources
) -> None:
    """The DLQ is found from the job queue's redrive policy."""
    assert await job_queue(clients, resources.queue_url).dead_letter_url() == resources.dlq_url


async def test_dead_letter_url_is_none_without_a_redrive_policy(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A queue without a redrive policy has no DLQ."""
    assert await job_queue(clients, resources.results_queue_url).dead_letter_url() is None


async def test_send_to_copies_body_and_attributes_and_adds_the_error(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A dead-lettered copy keeps the body and attributes and says why in `sdworker_error`."""
    queue, delivery = await send_and_receive(clients, resources)
    await queue.send_to(resources.dlq_url, delivery, "id: required")
    [copy] = await drain_messages(clients, resources.dlq_url)
    assert copy["Body"] == delivery.body
    attributes = {name: value["StringValue"] for name, value in copy["MessageAttributes"].items()}
    assert attributes == {"trace": "abc-123", "sdworker_error": "id: required"}


async def test_beat_extends_a_message_about_to_become_visible(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A held message whose visibility is about to end is kept invisible past its timeout."""
    queue, delivery = await send_and_receive(clients, resources, visibility_timeout=1)
    heartbeat = Heartbeat(queue)
    heartbeat.hold(delivery)
    await asyncio.sleep(0.7)
    await heartbeat.beat()
    await asyncio.sleep(0.6)
    assert await queue_counts(clients, resources.queue_url) == (0, 1)


async def test_dropped_message_is_no_longer_extended(
    clients: AwsClients, resources: LocalResources
) -> None:
    """After drop, the heartbeat leaves the message alone and it reappears when its time ends."""
    queue, delivery = await send_and_receive(clients, resources, visibility_timeout=1)
    heartbeat = Heartbeat(queue)
    heartbeat.hold(delivery)
    heartbeat.drop([delivery])
    await asyncio.sleep(0.7)
    await heartbeat.beat()
    await asyncio.sleep(0.6)
    assert not heartbeat.is_held(delivery.message_id)
    assert await queue_counts(clients, resources.queue_url) == (1, 0)


async def test_running_heartbeat_holds_a_message_for_several_timeouts(
    clients: AwsClients, resources: LocalResources
) -> None:
    """The heartbeat task keeps a message invisible well past its one-second timeout."""
    queue, delivery = await send_and_receive(clients, resources, visibility_timeout=1)
    heartbeat = Heartbeat(queue)
    heartbeat.hold(delivery)
    task = asyncio.create_task(heartbeat.run())
    try:
        await asyncio.sleep(2.5)
        assert await queue_counts(clients, resources.queue_url) == (0, 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_beat_never_asks_past_the_twelve_hour_total(
    clients: AwsClients, resources: LocalResources
) -> None:
    """Near the 12 h limit, the extension is cut to what is left, so SQS accepts it."""
    queue, delivery = await send_and_receive(clients, resources, visibility_timeout=30)
    delivery.received_at = time.monotonic() - (MAX_VISIBILITY_S - 2.5)
    delivery.visible_until = time.monotonic()
    heartbeat = Heartbeat(queue)
    heartbeat.hold(delivery)
    await heartbeat.beat()
    assert await queue_counts(clients, resources.queue_url) == (0, 1)
    await asyncio.sleep(1.3)
    assert await queue_counts(clients, resources.queue_url) == (1, 0)


async def test_hold_of_a_duplicate_delivery_keeps_the_newest_receipt_handle(
    clients: AwsClients, resources: LocalResources
) -> None:
    """When the same message is received again, the held delivery takes the new handle."""
    queue, first = await send_and_receive(clients, resources)
    heartbeat = Heartbeat(queue)
    heartbeat.hold(first)
    await queue.release([first])
    second = await receive_one(queue)
    original_handle = first.receipt_handle
    held = heartbeat.hold(second)
    assert held is first
    assert held.receipt_handle == second.receipt_handle != original_handle


async def test_the_heartbeat_outlives_a_network_failure() -> None:
    """A connection error during a beat is logged and counted; the heartbeat keeps running."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        async with aws_clients(PROBE_CONFIG) as dead:
            queue = JobQueue(dead.sqs, "http://127.0.0.1:9/1/q", visibility_timeout=1, wait_s=0)
            heartbeat = Heartbeat(queue)
            heartbeat.hold(Delivery("m", "{}", "r", 1, None, {}, visible_until=0.0))
            running = asyncio.create_task(heartbeat.run())

            async def failed_twice() -> bool:  # the second failure comes from a later beat
                return heartbeat.failures >= 2 or running.done()

            try:
                await eventually(failed_twice)
                assert not running.done()
            finally:  # a heartbeat left running would log into the next tests
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
