"""Health probes: `/healthz` (the worker's event loop is alive), `/readyz` (the backend is ready
and the worker takes work), and `/metrics` for Prometheus.

The server runs on a thread and event loop of its own, so that it still answers — 503 — when the
worker's loop is wedged. A watchdog ticks on the worker's loop and samples its vitals; the server
only reads what the last tick left. Example:

    watchdog = Watchdog(stall_s=10)
    server = HealthServer(watchdog, registry, host="0.0.0.0", port=8080)
    server.start()  # raises OSError if the port is taken
    watchdog.watch(worker.vitals)
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry

PROBES = ("healthz", "readyz")


@dataclass(frozen=True)
class Vitals:
    """What the probes and gauges report, sampled on the worker's loop at each watchdog tick."""

    taking_work: bool = False
    backend_ready: bool = False
    in_flight: int = 0
    prefetched: int = 0
    running: int = 0
    heartbeat_failures: int = 0


class Watchdog:
    """Ticks on the worker's loop; when no tick came for `stall_s` seconds, the loop is wedged."""

    def __init__(self, stall_s: float = 10.0) -> None:
        self.stall_s = stall_s
        self.interval_s = min(1.0, stall_s / 4)
        self.ticked_at = time.monotonic()
        self.vitals = Vitals()
        self._source: Callable[[], Vitals] | None = None

    def watch(self, source: Callable[[], Vitals]) -> None:
        """Sample `source` (the worker's vitals) at every tick from now on."""
        self._source = source
        self.tick()

    def tick(self) -> None:
        """Sample the vitals and note that the loop ran just now."""
        if self._source is not None:
            self.vitals = self._source()
        self.ticked_at = time.monotonic()

    async def run(self) -> None:
        """Tick every `interval_s` until cancelled."""
        while True:
            self.tick()
            await asyncio.sleep(self.interval_s)

    def alive(self) -> bool:
        """Whether the loop ticked within `stall_s`: a long generation does not stop it."""
        return time.monotonic() - self.ticked_at < self.stall_s

    def ready(self) -> bool:
        """Alive, the backend ready and the worker taking work (false while draining)."""
        return self.alive() and self.vitals.backend_ready and self.vitals.taking_work

    def report(self) -> dict[str, Any]:
        """The probes' JSON body."""
        since = round(time.monotonic() - self.ticked_at, 3)
        return {"alive": self.alive(), "ready": self.ready(), "last_tick_s": since} | asdict(
            self.vitals
        )


class HealthServer:
    """`/healthz`, `/readyz` and `/metrics` served from a thread of their own."""

    def __init__(
        self,
        watchdog: Watchdog,
        registry: CollectorRegistry | None,
        *,
        host: str,
        port: int,
    ) -> None:
        self.watchdog = watchdog
        self.registry = registry
        self.host = host
        self.port = port
        self._started = threading.Event()
        self._error: Exception | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name="sdworker-health", daemon=True)

    def start(self) -> None:
        """Start listening (port 0: any free one, then in `port`); raise OSError if it cannot."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop listening and end the thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            runner = loop.run_until_complete(self._open())
        except Exception as error:  # a taken port, mostly: `start()` raises it on the caller's side
            self._error = error
            loop.close()
            self._started.set()
            return
        self._loop = loop
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def _open(self) -> web.AppRunner:
        from aiohttp import web

        runner = web.AppRunner(self._app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self.port = int(runner.addresses[0][1])
        return runner

    def _app(self) -> web.Application:
        from aiohttp import web

        async def healthz(_request: web.Request) -> web.Response:
            ok = self.watchdog.alive()
            return web.json_response(self.watchdog.report(), status=200 if ok else 503)

        async def readyz(_request: web.Request) -> web.Response:
            ok = self.watchdog.ready()
            return web.json_response(self.watchdog.report(), status=200 if ok else 503)

        async def metrics(_request: web.Request) -> web.Response:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            if self.registry is None:
                raise web.HTTPNotFound(text="metrics are off")
            body = generate_latest(self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app


def probe_url(host: str, port: int, probe: str) -> str:
    """Where a probe on this machine reaches the server bound to `host`:`port`."""
    local = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    return f"http://{f'[{local}]' if ':' in local else local}:{port}/{probe}"


def probe(url: str, timeout_s: float = 3.0) -> tuple[bool, str]:
    """GET a probe: (True, body) on 200, else (False, why); proxies are never used."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return True, response.read().decode()
    except urllib.error.HTTPError as error:
        return False, f"{error.code} {error.read().decode()}"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return False, f"no answer from {url}: {reason}"
