"""The Spot watcher and its IMDSv2 client, against the fake instance metadata on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from sdworker.settings import Settings
from sdworker.spot import (
    ACTION_PATH,
    REBALANCE_PATH,
    TOKEN_PATH,
    UNREACHABLE,
    MetadataClient,
    Notice,
    SpotWatcher,
)
from sdworker.testing import FakeInstanceMetadata

TTL = "X-aws-ec2-metadata-token-ttl-seconds"


@pytest.fixture
async def imds() -> AsyncIterator[FakeInstanceMetadata]:
    """A fresh fake instance-metadata service."""
    async with FakeInstanceMetadata() as fake:
        yield fake


def settings(endpoint: str, spot: str = "auto", **more: Any) -> Settings:
    """Settings that poll `endpoint` every 50 ms."""
    return Settings(metadata_endpoint=endpoint, spot=spot, spot_interval=0.05, **more)


async def until(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Wait until `condition()` holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def watching(endpoint: str, spot: str = "auto") -> AsyncIterator[list[Notice]]:
    """Run a watcher in the background; yield the notices it hands on, in order."""
    reported: list[Notice] = []
    task = asyncio.create_task(SpotWatcher(settings(endpoint, spot), reported.append).run())
    try:
        yield reported
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_the_fake_refuses_a_get_without_a_token(imds: FakeInstanceMetadata) -> None:
    """A GET without a token is a 401."""
    async with httpx.AsyncClient(base_url=imds.endpoint) as http:
        assert (await http.get(ACTION_PATH)).status_code == 401


@pytest.mark.parametrize("ttl", [None, "0", "21601", "abc", "-5"])
async def test_the_fake_refuses_a_token_without_a_valid_ttl(
    imds: FakeInstanceMetadata, ttl: str | None
) -> None:
    """A token PUT whose TTL header is missing, not a number or outside 1..21600 is a 400."""
    headers = {} if ttl is None else {TTL: ttl}
    async with httpx.AsyncClient(base_url=imds.endpoint) as http:
        assert (await http.put(TOKEN_PATH, headers=headers)).status_code == 400


async def test_a_fake_token_expires_after_its_ttl(imds: FakeInstanceMetadata) -> None:
    """A token of TTL 1 reads for a second, then is refused."""
    async with httpx.AsyncClient(base_url=imds.endpoint) as http:
        token = (await http.put(TOKEN_PATH, headers={TTL: "1"})).text
        headers = {"X-aws-ec2-metadata-token": token}
        assert (await http.get(ACTION_PATH, headers=headers)).status_code == 404
        await asyncio.sleep(1.05)
        assert (await http.get(ACTION_PATH, headers=headers)).status_code == 401


async def test_the_client_reads_nothing_while_nothing_is_scheduled(
    imds: FakeInstanceMetadata,
) -> None:
    """With no interruption or rebalance, both reads are None and one token serves both."""
    async with MetadataClient(imds.endpoint) as client:
        assert await client.instance_action() is None
        assert await client.rebalance() is None
    assert imds.requests[TOKEN_PATH] == 1
    assert imds.statuses[404] == 2


async def test_the_client_renews_a_token_before_it_expires(imds: FakeInstanceMetadata) -> None:
    """A token near the end of its TTL is replaced before use, so no read is refused."""
    async with MetadataClient(imds.endpoint, token_ttl=1) as client:
        await client.instance_action()
        await asyncio.sleep(0.95)
        await client.instance_action()
    assert imds.requests[TOKEN_PATH] == 2
    assert imds.statuses[401] == 0


@pytest.mark.parametrize("kind", ["terminate", "stop"])
async def test_an_instance_action_is_reported_with_its_kind_and_time(
    imds: FakeInstanceMetadata, kind: str
) -> None:
    """A terminate or stop notice arrives with the action's time, two minutes ahead."""
    async with watching(imds.endpoint) as reported:
        at = imds.schedule_interruption(kind, in_seconds=120)
        await until(lambda: bool(reported))
    assert (reported[0].kind, reported[0].at) == (kind, at)
    assert 108 <= reported[0].seconds_left(margin=10) <= 110


async def test_a_hibernate_notice_leaves_no_time(imds: FakeInstanceMetadata) -> None:
    """A hibernate notice is reported with zero seconds left, whatever its time says."""
    async with watching(imds.endpoint) as reported:
        imds.schedule_interruption("hibernate", in_seconds=120)
        await until(lambda: bool(reported))
    assert reported[0].kind == "hibernate"
    assert reported[0].seconds_left() == 0


def test_seconds_left_is_never_negative() -> None:
    """A notice whose time has passed has zero seconds left."""
    notice = Notice("terminate", datetime.now(UTC) - timedelta(seconds=30))
    assert notice.seconds_left(margin=10) == 0


async def test_a_rebalance_recommendation_is_reported(imds: FakeInstanceMetadata) -> None:
    """A rebalance recommendation arrives with its notice time."""
    async with watching(imds.endpoint) as reported:
        at = imds.recommend_rebalance()
        await until(lambda: bool(reported))
    assert reported == [Notice("rebalance", at)]


async def test_a_rebalance_after_a_terminate_notice_is_reported_too(
    imds: FakeInstanceMetadata,
) -> None:
    """Both notices are handed on, in the order they appeared."""
    async with watching(imds.endpoint) as reported:
        imds.schedule_interruption("terminate")
        await until(lambda: len(reported) == 1)
        imds.recommend_rebalance()
        await until(lambda: len(reported) == 2)
    assert [notice.kind for notice in reported] == ["terminate", "rebalance"]


async def test_each_notice_is_reported_once_though_polled_many_times(
    imds: FakeInstanceMetadata,
) -> None:
    """A notice still published on later polls is not handed on again."""
    async with watching(imds.endpoint) as reported:
        imds.schedule_interruption("terminate")
        imds.recommend_rebalance()
        await until(lambda: imds.requests[ACTION_PATH] >= 10)
    assert sorted(notice.kind for notice in reported) == ["rebalance", "terminate"]
    assert imds.requests[REBALANCE_PATH] >= 9


async def test_a_coroutine_may_receive_the_notices(imds: FakeInstanceMetadata) -> None:
    """An async `on_notice` is awaited."""
    received: list[Notice] = []

    async def on_notice(notice: Notice) -> None:
        await asyncio.sleep(0)
        received.append(notice)

    task = asyncio.create_task(SpotWatcher(settings(imds.endpoint), on_notice).run())
    imds.schedule_interruption("stop")
    await until(lambda: bool(received))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert received[0].kind == "stop"


async def test_an_expired_token_is_renewed_and_polling_goes_on(
    imds: FakeInstanceMetadata,
) -> None:
    """After a 401 the watcher fetches a new token and still sees the next notice."""
    async with watching(imds.endpoint) as reported:
        await until(lambda: imds.requests[ACTION_PATH] >= 2)
        imds.expire_tokens()
        imds.schedule_interruption("terminate")
        await until(lambda: bool(reported))
    assert imds.statuses[401] >= 1
    assert imds.requests[TOKEN_PATH] == 2


async def test_a_bad_document_is_logged_and_polling_goes_on(imds: FakeInstanceMetadata) -> None:
    """An unreadable instance action is logged once; a later good one is reported."""
    with capture_logs() as logs:
        async with watching(imds.endpoint) as reported:
            imds.action = {"action": "explode", "time": "soon"}
            await until(lambda: imds.requests[ACTION_PATH] >= 5)
            imds.schedule_interruption("terminate")
            await until(lambda: bool(reported))
    failures = [line for line in logs if line["event"].startswith("instance metadata read failed")]
    assert len(failures) == 1
    assert reported[0].kind == "terminate"


async def test_auto_gives_up_quickly_when_the_token_request_hangs(
    imds: FakeInstanceMetadata,
) -> None:
    """As in a pod with hop limit 1: one probe, one log line, no notice, done within 2 s."""
    imds.hang_token_requests(True)
    imds.schedule_interruption("terminate")
    reported: list[Notice] = []
    started = time.monotonic()
    with capture_logs() as logs:
        await SpotWatcher(settings(imds.endpoint, "auto"), reported.append).run()
    assert time.monotonic() - started < 2
    assert [line["event"] for line in logs] == [UNREACHABLE]
    assert reported == []
    assert imds.requests[ACTION_PATH] == 0


async def test_auto_gives_up_when_nothing_listens() -> None:
    """A refused connection also turns the watcher off at once."""
    reported: list[Notice] = []
    endpoint = f"http://127.0.0.1:{free_port()}"
    with capture_logs() as logs:
        await SpotWatcher(settings(endpoint, "auto"), reported.append).run()
    assert [line["event"] for line in logs] == [UNREACHABLE]
    assert reported == []


async def test_off_never_asks(imds: FakeInstanceMetadata) -> None:
    """With the watcher off not a single request reaches instance metadata."""
    imds.schedule_interruption("terminate")
    reported: list[Notice] = []
    await SpotWatcher(settings(imds.endpoint, "off"), reported.append).run()
    assert reported == []
    assert not imds.requests


async def test_on_keeps_trying_until_metadata_answers(imds: FakeInstanceMetadata) -> None:
    """With the watcher on, a hanging token request is retried until it is answered."""
    imds.hang_token_requests(True)
    imds.schedule_interruption("terminate")
    async with watching(imds.endpoint, "on") as reported:
        await until(lambda: imds.requests[TOKEN_PATH] >= 1)
        await asyncio.sleep(0.2)
        assert reported == []
        imds.hang_token_requests(False)
        await until(lambda: bool(reported))
    assert reported[0].kind == "terminate"
    assert imds.requests[TOKEN_PATH] >= 2
