"""Spot interruption notices from EC2 instance metadata (IMDSv2), each handed on once.

`SDWORKER_SPOT=auto` (the default) probes the endpoint once with a short timeout and stays off when
nothing answers, as in a pod whose node keeps the hop limit at 1: there SIGTERM from the node drain
is the signal that arrives. `on` keeps trying; `off` never asks. Example::

    watcher = SpotWatcher(settings, on_notice=lambda notice: print(notice.kind, notice.at))
    task = asyncio.create_task(watcher.run())
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, get_args

import httpx

from sdworker._structlog import structlog
from sdworker.settings import Settings
from sdworker.tls import verify_for

NoticeKind = Literal["terminate", "stop", "hibernate", "rebalance"]
NoticeHandler = Callable[["Notice"], Awaitable[None] | None]

TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL = 21_600  # six hours, the longest IMDSv2 grants
PROBE_TIMEOUT = 1.0  # a pod with hop limit 1 never gets an answer: give up quickly
READ_TIMEOUT = 2.0
MAX_BACKOFF = 60.0
UNREACHABLE = (
    "instance metadata not reachable: Spot watcher off; SIGTERM from the node drain still works"
)
_ACTIONS = frozenset(get_args(NoticeKind)) - {"rebalance"}

log = structlog.get_logger("sdworker.spot")


@dataclass(frozen=True)
class Notice:
    """A Spot instance action (`terminate`, `stop`, `hibernate`) or a rebalance recommendation.

    `at` is the instance action's `time`, or the rebalance's `noticeTime`.
    """

    kind: NoticeKind
    at: datetime | None

    def seconds_left(self, margin: float = 0.0, now: datetime | None = None) -> float:
        """Seconds from `now` until `at` less `margin`, never negative; 0 for hibernate.

        A rebalance has no deadline: its `at` is when it was issued, so this is usually 0.
        """
        if self.kind == "hibernate" or self.at is None:
            return 0.0
        left = (self.at - (now or datetime.now(UTC))).total_seconds() - margin
        return max(0.0, left)


def parse_time(text: Any) -> datetime:
    """An instance-metadata time such as `2026-11-25T08:22:00Z`, as an aware UTC datetime."""
    if not isinstance(text, str):
        raise ValueError(f"instance metadata time is not a string: {text!r}")
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def action_notice(data: Any) -> Notice:
    """The notice in a `spot/instance-action` document `{"action", "time"}`."""
    if not isinstance(data, dict) or data.get("action") not in _ACTIONS:
        raise ValueError(f"unknown Spot instance action in {data!r}")
    return Notice(data["action"], parse_time(data.get("time")))


def rebalance_notice(data: Any) -> Notice:
    """The notice in an `events/recommendations/rebalance` document `{"noticeTime"}`."""
    if not isinstance(data, dict):
        raise ValueError(f"unexpected rebalance recommendation {data!r}")
    return Notice("rebalance", parse_time(data.get("noticeTime")))


class MetadataClient:
    """An IMDSv2 client: a session token refreshed before it expires, and the two Spot reads.

    Example: `async with MetadataClient("http://169.254.169.254") as imds: await imds.rebalance()`.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = READ_TIMEOUT,
        probe_timeout: float = PROBE_TIMEOUT,
        token_ttl: int = TOKEN_TTL,
    ) -> None:
        # No proxy from the environment: metadata is link-local, as the AWS SDKs treat it.
        self._http = httpx.AsyncClient(
            base_url=endpoint.rstrip("/"),
            timeout=timeout,
            trust_env=False,
            verify=verify_for(endpoint),
        )
        self.timeout, self.probe_timeout, self.token_ttl = timeout, probe_timeout, token_ttl
        self._token: str | None = None
        self._expires = 0.0

    async def __aenter__(self) -> MetadataClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def probe(self) -> None:
        """Fetch a token within `probe_timeout`; raises `httpx.HTTPError` if none comes."""
        await self._put_token(self.probe_timeout)

    async def fetch_token(self) -> str:
        """A new session token; raises `httpx.HTTPError` on a timeout, a refusal or a 4xx."""
        return await self._put_token(self.timeout)

    async def _put_token(self, seconds: float) -> str:
        """PUT for a token of `token_ttl` seconds, waiting at most `seconds` for each step."""
        headers = {TTL_HEADER: str(self.token_ttl)}
        response = await self._http.put(TOKEN_PATH, headers=headers, timeout=seconds)
        response.raise_for_status()
        self._token, self._expires = response.text, time.monotonic() + self.token_ttl
        return self._token

    async def token(self) -> str:
        """The token held, or a new one once less than a minute (or 10 % of its TTL) is left."""
        left = self._expires - time.monotonic()
        if self._token is None or left < min(60.0, 0.1 * self.token_ttl):
            return await self.fetch_token()
        return self._token

    async def get(self, path: str) -> Any:
        """The JSON at `path`, or None on 404; on a 401 one new token and one more try."""
        response = await self._get(path)
        if response.status_code == 401:
            self._token = None
            response = await self._get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    async def _get(self, path: str) -> httpx.Response:
        """GET `path` with the session token."""
        return await self._http.get(path, headers={TOKEN_HEADER: await self.token()})

    async def instance_action(self) -> Notice | None:
        """The scheduled Spot instance action, or None while there is none."""
        data = await self.get(ACTION_PATH)
        return None if data is None else action_notice(data)

    async def rebalance(self) -> Notice | None:
        """The rebalance recommendation, or None while there is none."""
        data = await self.get(REBALANCE_PATH)
        return None if data is None else rebalance_notice(data)


class SpotWatcher:
    """Polls instance metadata every `spot_interval` seconds and reports each new notice once.

    Notices reach `on_notice` (a function or a coroutine function) in the order they appear: an
    instance action, a rebalance recommendation, either first. `notices` lists those reported.
    """

    def __init__(self, settings: Settings, on_notice: NoticeHandler) -> None:
        self.settings = settings
        self.on_notice = on_notice
        self.notices: list[Notice] = []
        self.watching = False
        self._failing = False

    async def run(self) -> None:
        """Watch until cancelled; return at once when off, or when `auto` finds no metadata."""
        if self.settings.spot == "off":
            return
        async with MetadataClient(self.settings.metadata_endpoint) as client:
            if await self._connect(client):
                self.watching = True
                try:
                    await self._poll(client)
                finally:
                    self.watching = False

    async def _connect(self, client: MetadataClient) -> bool:
        """Probe for a token: once under `auto`, until it answers under `on` (backing off)."""
        delay = self.settings.spot_interval
        while True:
            try:
                await client.probe()
            except httpx.HTTPError as error:
                if self.settings.spot == "auto":
                    log.info(
                        UNREACHABLE,
                        endpoint=self.settings.metadata_endpoint,
                        error=_describe(error),
                    )
                    return False
                log.warning(
                    "instance metadata not reachable; trying again",
                    endpoint=self.settings.metadata_endpoint,
                    error=_describe(error),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF)
            else:
                log.info(
                    "Spot watcher on",
                    endpoint=self.settings.metadata_endpoint,
                    interval=self.settings.spot_interval,
                )
                return True

    async def _poll(self, client: MetadataClient) -> None:
        """Read both paths, report what is new, sleep `spot_interval`; forever."""
        while True:
            for notice in await self._read(client):
                if notice not in self.notices:
                    await self._report(notice)
            await asyncio.sleep(self.settings.spot_interval)

    async def _read(self, client: MetadataClient) -> list[Notice]:
        """The notices published now; none when a read fails (logged once per run of failures)."""
        try:
            found = [await client.instance_action(), await client.rebalance()]
        except (httpx.HTTPError, ValueError) as error:
            if not self._failing:
                log.warning(
                    "instance metadata read failed; polling goes on", error=_describe(error)
                )
            self._failing = True
            return []
        if self._failing:
            log.info("instance metadata readable again")
        self._failing = False
        return [notice for notice in found if notice is not None]

    async def _report(self, notice: Notice) -> None:
        """Record `notice`, log it and hand it to `on_notice`."""
        self.notices.append(notice)
        margin = self.settings.spot_margin
        log.warning(
            "Spot notice",
            kind=notice.kind,
            at=notice.at.isoformat() if notice.at else None,
            seconds_left=round(notice.seconds_left(margin), 1),
        )
        result = self.on_notice(notice)
        if inspect.isawaitable(result):
            await result


def _describe(error: Exception) -> str:
    """A short reason: the error's message, or its class name when it has none (timeouts)."""
    return str(error) or type(error).__name__
