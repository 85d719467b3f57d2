"""Probes: `/healthz` (the loop is alive), `/readyz` (taking work), `/metrics`, read from another
thread as the kubelet would; and `sdworker check --probe` for exec probes."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from structlog.testing import capture_logs
from typer.testing import CliRunner

from sdworker.aws import AwsClients
from sdworker.cli import app
from sdworker.errors import ConfigError
from sdworker.health import HealthServer, Vitals, Watchdog
from sdworker.local import LocalResources
from sdworker.testing import FakeBackend
from sdworker.worker import Worker
from tests.aws_helpers import eventually, send
from tests.telemetry_helpers import Started, free_port, get, start_with, status_of, stop_all

StartWorker = Callable[..., Awaitable[tuple[Worker, int]]]
READY = Vitals(taking_work=True, backend_ready=True)


@pytest.fixture
async def start(resources: LocalResources) -> AsyncIterator[StartWorker]:
    """Start workers with the health server on a free loopback port; each is stopped at the end."""
    running: list[Started] = []

    async def starter(backend: FakeBackend, **overrides: Any) -> tuple[Worker, int]:
        port = free_port()
        values = {"health_port": port, "health_host": "127.0.0.1", **overrides}
        started = await start_with(resources, backend, None, **values)
        running.append(started)
        return started[0], port

    yield starter
    await stop_all(running)


@pytest.fixture
async def watched() -> AsyncIterator[Watchdog]:
    """A watchdog ticking on this loop (a stall after 0.3 s), serving READY vitals."""
    watchdog = Watchdog(stall_s=0.3)
    watchdog.watch(lambda: READY)
    ticking = asyncio.create_task(watchdog.run())
    yield watchdog
    ticking.cancel()


@pytest.fixture
def server(watched: Watchdog) -> Iterator[HealthServer]:
    """A health server for `watched` on a free loopback port, with an empty metrics registry."""
    running = HealthServer(watched, CollectorRegistry(), host="127.0.0.1", port=0)
    running.start()
    yield running
    running.stop()


def job(job_id: str) -> dict[str, Any]:
    """A native txt2img job."""
    return {"version": 1, "id": job_id, "task": "txt2img", "params": {"prompt": "x"}}


async def status_is(port: int, path: str, status: int) -> bool:
    """Whether the probe answers `status` now."""
    return (await status_of(port, path))[0] == status


# liveness --------------------------------------------------------------------------------------


async def test_healthz_is_200_while_the_loop_ticks(server: HealthServer) -> None:
    """A loop that runs answers alive, with the time since its last tick."""
    status, body = await status_of(server.port, "healthz")
    assert status == 200 and body["alive"] is True and body["last_tick_s"] < 0.3


async def test_healthz_turns_503_while_the_loop_is_wedged(server: HealthServer) -> None:
    """A callback that blocks the loop past the stall limit is seen from another thread."""
    seen: list[int] = []

    def read_while_wedged() -> None:
        time.sleep(0.6)
        seen.append(get(f"{_url(server)}/healthz")[0])

    reader = threading.Thread(target=read_while_wedged)
    reader.start()
    asyncio.get_running_loop().call_soon(time.sleep, 1.2)  # wedges the loop, on purpose
    await asyncio.sleep(0)
    await asyncio.to_thread(reader.join)
    assert seen == [503]
    await eventually(lambda: status_is(server.port, "healthz", 200))


async def test_healthz_stays_200_during_a_long_generation(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A job running three times longer than the stall limit does not fail liveness."""
    backend = FakeBackend(latency=2.5, steps=10)
    _, port = await start(backend, health_stall=0.5)
    await send(clients, resources, job("long"))
    await eventually(lambda: _async(bool(backend.runs)))
    answers = []
    for _ in range(6):
        answers.append((await status_of(port, "healthz"))[0])
        await asyncio.sleep(0.25)
    assert answers == [200] * 6 and len(backend.runs) == 1


# readiness -------------------------------------------------------------------------------------


async def test_readyz_is_200_when_the_worker_takes_work(start: StartWorker) -> None:
    """A started worker with a ready backend is ready."""
    _, port = await start(FakeBackend())
    await eventually(lambda: status_is(port, "readyz", 200))
    _, body = await status_of(port, "readyz")
    assert body["taking_work"] is True and body["backend_ready"] is True


async def test_readyz_is_503_while_the_backend_is_not_ready(start: StartWorker) -> None:
    """A backend that goes down makes the worker unready, and ready again when it is back."""
    backend = FakeBackend()
    _, port = await start(backend)
    await eventually(lambda: status_is(port, "readyz", 200))
    backend.available = False
    await eventually(lambda: status_is(port, "readyz", 503))
    assert (await status_of(port, "readyz"))[1]["backend_ready"] is False
    backend.available = True
    await eventually(lambda: status_is(port, "readyz", 200))


async def test_readyz_turns_503_while_draining_and_healthz_stays_200(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """From the first moment of shutdown the worker is unready, though still alive, draining."""
    backend = FakeBackend(latency=30, steps=30)
    worker, port = await start(backend, shutdown_deadline=60, shutdown_policy="finish")
    await send(clients, resources, job("draining"))
    await eventually(lambda: _async(bool(backend.runs)))
    worker.stop()
    await eventually(lambda: status_is(port, "readyz", 503))
    assert await status_is(port, "healthz", 200)
    assert (await status_of(port, "readyz"))[1]["running"] == 1


class _SlowStart(FakeBackend):
    """A backend whose start waits until `go` is set, like a model that loads for minutes."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def start(self) -> None:
        await self.go.wait()
        await super().start()


async def test_probes_answer_while_the_backend_starts(
    resources: LocalResources,
) -> None:
    """Before the backend is up the worker is alive but not ready; then it is ready."""
    backend, port = _SlowStart(), free_port()
    overrides = {"health_port": port, "health_host": "127.0.0.1"}
    starting = asyncio.create_task(start_with(resources, backend, None, **overrides))
    await eventually(lambda: _answers(port))
    assert await status_is(port, "healthz", 200) and await status_is(port, "readyz", 503)
    backend.go.set()
    worker, serving = await starting
    await eventually(lambda: status_is(port, "readyz", 200))
    await stop_all([(worker, serving)])


# the server ------------------------------------------------------------------------------------


async def test_metrics_are_served_in_the_prometheus_text_format(server: HealthServer) -> None:
    """`/metrics` answers 200 with Prometheus's text content type."""
    content_type = await asyncio.to_thread(_content_type, f"{_url(server)}/metrics")
    assert content_type == CONTENT_TYPE_LATEST and content_type.startswith("text/plain")


async def test_metrics_are_404_when_metrics_are_off(watched: Watchdog) -> None:
    """Without a registry `/metrics` says so rather than serving an empty page."""
    server = HealthServer(watched, None, host="127.0.0.1", port=0)
    server.start()
    try:
        assert (await asyncio.to_thread(get, f"{_url(server)}/metrics"))[0] == 404
    finally:
        server.stop()


def _exchange(server: HealthServer, request: bytes, *, host: str = "127.0.0.1") -> bytes:
    """Send raw `request` bytes and read everything until the server closes the connection."""
    with socket.create_connection((host, server.port), timeout=5) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


async def test_head_answers_the_status_and_headers_without_a_body(server: HealthServer) -> None:
    """HEAD (what some load balancers' checks send) gets GET's status and length, no body."""
    raw = await asyncio.to_thread(_exchange, server, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head and body == b""


async def test_every_answer_closes_its_connection_and_stop_closes_the_port(
    server: HealthServer,
) -> None:
    """A probe's connection ends with its answer (`_exchange` reads to the close), so nothing is
    left open to answer after `stop()`, which refuses new connections."""
    raw = await asyncio.to_thread(_exchange, server, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and b"Connection: close" in raw
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


async def test_an_unknown_path_is_404_naming_the_probes(server: HealthServer) -> None:
    """A typo in a probe's path says which paths there are."""
    status, body = await asyncio.to_thread(get, f"{_url(server)}/health")
    assert status == 404 and "/healthz" in body and "/readyz" in body


async def test_a_failing_answer_is_a_500_naming_the_error_and_is_logged(
    watched: Watchdog,
) -> None:
    """An exception while answering (here a metrics collector's) is a 500 that names it, and is
    logged with its traceback rather than printed or dropped with the connection."""

    class Broken:
        def collect(self) -> Any:
            raise RuntimeError("collector broke")

    registry = CollectorRegistry()
    registry.register(Broken())
    server = HealthServer(watched, registry, host="127.0.0.1", port=0)
    server.start()
    try:
        with capture_logs() as logs:
            status, body = await asyncio.to_thread(get, f"{_url(server)}/metrics")
    finally:
        server.stop()
    assert status == 500 and body == "RuntimeError: collector broke"
    assert [entry["event"] for entry in logs] == ["health server: request failed"]


async def test_a_client_that_resets_its_connection_leaves_no_traceback(
    server: HealthServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """A checker that hangs up mid-request (a TCP reset) is not an error: nothing is printed to
    stderr, where the worker's JSON logs go, and nothing is logged."""
    with capture_logs() as logs:
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        connection.sendall(b"GET /healthz HTTP/1.1\r\n")  # the headers never end
        await eventually(lambda: _async(bool(_request_threads())))  # the server reads them
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()  # linger 0: a reset
        await eventually(lambda: _async(not _request_threads()))
    assert logs == [] and "Traceback" not in capfd.readouterr().err


@pytest.mark.skipif(not socket.has_ipv6, reason="this Python has no IPv6")
async def test_an_ipv6_host_listens_over_ipv6(watched: Watchdog) -> None:
    """`SDWORKER_HEALTH_HOST=::1` (or `::`, every interface) listens over IPv6."""
    server = HealthServer(watched, None, host="::1", port=0)
    try:
        server.start()
    except OSError as error:
        pytest.skip(f"no IPv6 loopback here: {error}")
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        raw = await asyncio.to_thread(_exchange, server, request, host="::1")
    finally:
        server.stop()
    assert raw.startswith(b"HTTP/1.1 200")


async def test_a_host_name_listens_on_its_first_address(watched: Watchdog) -> None:
    """`SDWORKER_HEALTH_HOST=localhost` listens where the name's first address is."""
    server = HealthServer(watched, None, host="localhost", port=0)
    server.start()
    try:
        status, _body = await asyncio.to_thread(get, f"http://localhost:{server.port}/healthz")
    finally:
        server.stop()
    assert status == 200


def _request_threads() -> list[threading.Thread]:
    """The health server's per-connection threads still running."""
    return [t for t in threading.enumerate() if "process_request_thread" in t.name]


async def test_a_taken_health_port_stops_start_up_naming_the_setting(
    resources: LocalResources,
) -> None:
    """If the port is in use the worker does not start, and says which setting to change."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"SDWORKER_HEALTH_PORT: cannot listen on .*:{port}"):
            await start_with(
                resources, FakeBackend(), None, health_port=port, health_host="127.0.0.1"
            )


# sdworker check --probe ------------------------------------------------------------------------


def _check(port: int, probe: str) -> tuple[int, str]:
    """Run `sdworker check --probe` against `port` on loopback; return exit code and output."""
    env = {"SDWORKER_HEALTH_PORT": str(port), "SDWORKER_HEALTH_HOST": "127.0.0.1"}
    ran = CliRunner().invoke(app, ["check", "--probe", probe], env=env)
    return ran.exit_code, ran.output


async def test_check_probe_exits_0_when_the_probe_answers_200(server: HealthServer) -> None:
    """`sdworker check --probe healthz` against a live worker exits 0 and says ok."""
    code, output = await asyncio.to_thread(_check, server.port, "healthz")
    assert code == 0 and output.startswith("ok healthz:")


async def test_check_probe_exits_1_when_the_worker_is_not_ready(
    server: HealthServer, watched: Watchdog
) -> None:
    """`--probe readyz` against a draining worker exits 1 and says why."""
    watched.watch(lambda: Vitals(taking_work=False, backend_ready=True))
    code, output = await asyncio.to_thread(_check, server.port, "readyz")
    assert code == 1 and output.startswith("FAIL readyz: 503")


async def test_check_probe_exits_1_when_nothing_answers() -> None:
    """No server on the port: exit 1, naming the URL it tried."""
    port = free_port()
    code, output = await asyncio.to_thread(_check, port, "healthz")
    assert code == 1 and f"no answer from http://127.0.0.1:{port}/healthz" in output


def test_check_probe_exits_2_when_the_health_server_is_off() -> None:
    """With SDWORKER_HEALTH_PORT=0 there is nothing to ask: a settings error, exit 2."""
    code, output = _check(0, "healthz")
    assert code == 2 and "SDWORKER_HEALTH_PORT is 0" in output


def test_check_probe_refuses_an_unknown_probe() -> None:
    """Only healthz and readyz exist."""
    code, output = _check(8080, "livez")
    assert code == 2 and "--probe livez: use healthz or readyz" in output


def _url(server: HealthServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def _content_type(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return str(response.headers["Content-Type"])


async def _answers(port: int) -> bool:
    try:
        await status_of(port, "healthz")
    except OSError:
        return False
    return True


async def _async(value: bool) -> bool:
    return value
