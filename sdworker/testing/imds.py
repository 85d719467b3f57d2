"""`FakeInstanceMetadata`: EC2 instance metadata (IMDSv2) on 127.0.0.1, for Spot tests.

It is no kinder than the real service: a token comes from `PUT /latest/api/token` with
`X-aws-ec2-metadata-token-ttl-seconds` of 1..21600 (else 400) and expires after that many seconds;
a GET without a valid `X-aws-ec2-metadata-token` is a 401; `spot/instance-action` and
`events/recommendations/rebalance` are 404 until a test schedules them, then JSON sent as
`text/plain`. Example::

    async with FakeInstanceMetadata() as imds:
        settings = Settings(metadata_endpoint=imds.endpoint, spot="on", spot_interval=0.05)
        imds.schedule_interruption("terminate", in_seconds=120)
        imds.hang_token_requests(True)  # a pod whose node keeps the hop limit at 1
        assert imds.requests["/latest/api/token"] and imds.statuses[401] == 0
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from types import TracebackType

from aiohttp import web
from aiohttp.typedefs import Handler

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # 2026-11-25T08:22:00Z


class FakeInstanceMetadata:
    """The fake service. `requests` counts requests by path, `statuses` answers by status code."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.action: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None
        self._tokens: dict[str, float] = {}
        self._hanging = False
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        """The base URL, for `AWS_EC2_METADATA_SERVICE_ENDPOINT` or `Settings.metadata_endpoint`."""
        assert self._runner is not None, "start the fake first"
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def schedule_interruption(
        self, action: str = "terminate", in_seconds: float = 120.0, at: datetime | None = None
    ) -> datetime:
        """Publish `{"action", "time"}`: `at`, else `in_seconds` ahead; returns that time."""
        moment = _published(at or datetime.now(UTC) + timedelta(seconds=in_seconds))
        self.action = {"action": action, "time": moment.strftime(_FORMAT)}
        return moment

    def recommend_rebalance(self, at: datetime | None = None) -> datetime:
        """Publish `{"noticeTime"}`: `at`, else now; returns that time."""
        moment = _published(at or datetime.now(UTC))
        self.rebalance = {"noticeTime": moment.strftime(_FORMAT)}
        return moment

    def hang_token_requests(self, hang: bool = True) -> None:
        """Never answer token PUTs that arrive from now on (a hop limit of 1), until `False`."""
        self._hanging = hang

    def expire_tokens(self) -> None:
        """Make every token issued so far invalid at once, as if their TTLs had run out."""
        self._tokens.clear()

    async def start(self) -> FakeInstanceMetadata:
        """Listen on a free loopback port."""
        self._closing.clear()
        app = web.Application(middlewares=[self._count])
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/latest/meta-data/spot/instance-action", self._document("action"))
        path = "/latest/meta-data/events/recommendations/rebalance"
        app.router.add_get(path, self._document("rebalance"))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return self

    async def close(self) -> None:
        """Let go of hung token PUTs and stop listening; safe to call twice."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeInstanceMetadata:
        return await self.start()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count the request by path and its answer by status."""
        self.requests[request.path] += 1
        try:
            response = await handler(request)
        except web.HTTPException as error:
            self.statuses[error.status] += 1
            raise
        self.statuses[response.status] += 1
        return response

    async def _token(self, request: web.Request) -> web.Response:
        """Issue a token for a TTL of 1..21600 seconds; while hanging, keep the request open."""
        if self._hanging:
            await self._closing.wait()
            raise web.HTTPServiceUnavailable  # shutting down: the client gave up long ago
        ttl = request.headers.get(TTL_HEADER, "")
        if not ttl.isdecimal() or not 1 <= int(ttl) <= 21_600:
            return web.Response(status=400, text="Bad Request")
        token = secrets.token_urlsafe(32)
        self._tokens[token] = time.monotonic() + int(ttl)
        return web.Response(text=token, headers={TTL_HEADER: ttl})

    def _document(self, name: str) -> Handler:
        """A GET handler for the document held in attribute `name`: 401, 404 or the JSON."""

        async def handler(request: web.Request) -> web.Response:
            expires = self._tokens.get(request.headers.get("X-aws-ec2-metadata-token", ""), 0.0)
            if expires <= time.monotonic():
                return web.Response(status=401, text="Unauthorized")
            document = getattr(self, name)
            if document is None:
                return web.Response(status=404, text="Not Found")
            return web.Response(text=json.dumps(document), content_type="text/plain")

        return handler


def _published(moment: datetime) -> datetime:
    """`moment` in UTC and whole seconds, as instance metadata writes times."""
    return moment.astimezone(UTC).replace(microsecond=0)
