"""Health probes: `/healthz` (the worker's event loop is alive), `/readyz` (the backend is ready
and the worker takes work), and `/metrics` for Prometheus.

The server runs on threads of its own (the standard library's `ThreadingHTTPServer`), so that it
still answers — 503 — when the worker's loop is wedged. A watchdog ticks on the worker's loop and
samples its vitals; the server only reads what the last tick left. Example:

    watchdog = Watchdog(stall_s=10)
    server = HealthServer(watchdog, registry, host="0.0.0.0", port=8080)
    server.start()  # raises OSError if the port is taken
    watchdog.watch(worker.vitals)
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from sdworker._structlog import structlog

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = structlog.get_logger("sdworker.health")

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
    """`/healthz`, `/readyz` and `/metrics`, served by the standard library's threading HTTP server
    from a thread of its own: nothing it does waits on the worker's event loop."""

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
        self._server: _ProbeServer | None = None
        self._thread: threading.Thread | None = None
        self._scraping = threading.Lock()  # OpenTelemetry's collector is not safe to run twice

    def start(self) -> None:
        """Start listening (port 0: any free one, then in `port`); raise OSError if it cannot."""
        server = _ProbeServer((self.host, self.port), self)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name="sdworker-health",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and end the thread."""
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for a GET of `path`; 500 naming the error if one is
        raised (it is logged with its traceback)."""
        try:
            return self._answer(path)
        except Exception as error:
            log.exception("health server: request failed", path=path)
            return 500, "text/plain; charset=utf-8", f"{type(error).__name__}: {error}".encode()

    def _answer(self, path: str) -> tuple[int, str, bytes]:
        if path in ("/healthz", "/readyz"):
            ok = self.watchdog.alive() if path == "/healthz" else self.watchdog.ready()
            body = json.dumps(self.watchdog.report()).encode()
            return (200 if ok else 503), "application/json", body
        if path == "/metrics" and self.registry is not None:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            with self._scraping:
                return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        why = "metrics are off" if path == "/metrics" else "no such probe: use /healthz or /readyz"
        return 404, "text/plain; charset=utf-8", why.encode()


class _ProbeServer(ThreadingHTTPServer):
    """One thread per connection, none kept waiting at exit; the address family is the host's
    (an IPv6 address or name listens over IPv6)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], health: HealthServer) -> None:
        self.health = health
        self.address_family = _address_family(*address)
        super().__init__(address, _ProbeHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up early is no news; anything else is logged, not printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            log.exception("health server: connection failed", client=str(client_address))

    def server_bind(self) -> None:
        """Bind without `HTTPServer`'s reverse DNS lookup of the host, which can stall start-up."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.health.host, int(self.server_address[1])


def _address_family(host: str, port: int) -> socket.AddressFamily:
    """IPv6 for an IPv6 address, IPv4 for an IPv4 one or "" (every interface); for a name, its
    first address's. An address is read without the resolver, which costs half a megabyte."""
    try:
        version = ipaddress.ip_address(host).version if host else 4
    except ValueError:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return found[0][0]
    return socket.AF_INET6 if version == 6 else socket.AF_INET


class _ProbeHandler(BaseHTTPRequestHandler):
    """GET and HEAD of the probes and metrics; no access log."""

    server: _ProbeServer
    timeout = 10  # a client that stops sending holds its thread no longer than this
    protocol_version = "HTTP/1.1"  # one request per connection: every answer closes it

    def do_GET(self) -> None:
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        self._respond(with_body=False)

    def _respond(self, *, with_body: bool) -> None:
        status, content_type, body = self.server.health.answer(self.path.partition("?")[0])
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes arrive every few seconds: they are not logged."""


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
