"""Shared parts of the benchmarks: the machine, medians and spreads, a loopback proxy in front of
moto that delays every AWS call and timestamps the ones the figures need, a producer that keeps
the job queue shallow, and consumer subprocesses (sdworker or the bare loops of
`bare_consumer.py`) with their logs in files and their memory read from /proc.

Every address is 127.0.0.1; every wait has a bound.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from botocore.exceptions import ClientError
from types_aiobotocore_sqs.type_defs import SendMessageBatchRequestEntryTypeDef
from yarl import URL

from sdworker.aws import AwsClients, aws_clients
from sdworker.local import LOCAL_CREDENTIALS

BENCH = Path(__file__).resolve().parent
FAKE_WORKER = BENCH / "fake_worker.py"
BARE_CONSUMER = BENCH / "bare_consumer.py"
MOTO_PROCESS = BENCH / "moto_process.py"
STARTED = "worker started"  # the log event every consumer writes once it polls
_HOP_BY_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect", "te"}
)
_INHERITED_OUT = ("SDWORKER_", "AWS_", "OTEL_", "SQS_", "SNS_", "S3_", "RUNTIME_", "BENCH_")


# the machine and the statistics ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What ran the benchmark: processor, cores, Python, and the load when it started."""
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(terse=True),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def median(values: Sequence[float], digits: int = 3) -> float:
    """The median, rounded."""
    return round(statistics.median(values), digits)


def spread(values: Sequence[float], digits: int = 3) -> float:
    """max - min, rounded: how far the runs disagree."""
    return round(max(values) - min(values), digits)


def rss_mb(pid: int) -> float | None:
    """The resident memory of a process (VmRSS), in MiB; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def cpu_s(pid: int) -> float:
    """CPU time (user + system) a process has used, in seconds; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def maps_library(pid: int, name: str) -> bool | None:
    """Whether a shared library whose path holds `name` is mapped into the process."""
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


# the AWS side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One run's AWS resources: a job queue (with its DLQ), a bucket and a result topic."""

    queue_url: str
    dlq_url: str
    bucket: str
    topic_arn: str

    def environment(self, endpoint: str) -> dict[str, str]:
        """The variables that point a consumer at these resources through `endpoint`."""
        return {
            **LOCAL_CREDENTIALS,
            "AWS_ENDPOINT_URL": endpoint,
            "NO_PROXY": "127.0.0.1,localhost",
            "SDWORKER_QUEUE_URL": self.queue_url,
            "SDWORKER_DLQ_URL": self.dlq_url,
            "SDWORKER_BUCKET": self.bucket,
            "SDWORKER_TOPIC_ARN": self.topic_arn,
        }


async def make_target(clients: AwsClients, tag: str) -> Target:
    """Fresh resources named after `tag`. The topic has no subscriber: a results queue filling up
    would slow moto's publish (its SQS calls cost time in proportion to depth)."""
    dlq_url = (await clients.sqs.create_queue(QueueName=f"{tag}-dlq"))["QueueUrl"]
    queue_url = (
        await clients.sqs.create_queue(
            QueueName=f"{tag}-jobs", Attributes={"VisibilityTimeout": "60"}
        )
    )["QueueUrl"]
    await clients.s3.create_bucket(Bucket=f"{tag}-outputs")
    topic_arn = (await clients.sns.create_topic(Name=f"{tag}-results"))["TopicArn"]
    target = Target(queue_url, dlq_url, f"{tag}-outputs", topic_arn)
    await _warm_up(clients, target)
    return target


async def _warm_up(clients: AwsClients, target: Target) -> None:
    """One call of each kind the consumers make, so that moto's own first-call set-up (about
    0.1 s for S3) is not charged to whichever consumer comes first."""
    with contextlib.suppress(ClientError):
        await clients.s3.get_object(Bucket=target.bucket, Key="warm-up")
    await clients.s3.put_object(Bucket=target.bucket, Key="warm-up", Body=b"{}")
    await clients.s3.delete_object(Bucket=target.bucket, Key="warm-up")
    await clients.sns.publish(TopicArn=target.topic_arn, Message="{}")
    await clients.sqs.send_message(QueueUrl=target.queue_url, MessageBody="{}")
    received = await clients.sqs.receive_message(QueueUrl=target.queue_url)
    for message in received.get("Messages", []):
        await clients.sqs.delete_message(
            QueueUrl=target.queue_url, ReceiptHandle=message["ReceiptHandle"]
        )


@asynccontextmanager
async def moto() -> AsyncIterator[tuple[str, AwsClients]]:
    """moto on 127.0.0.1 in a process of its own (`moto_process.py`, shared by the benchmarks
    of one `run.py`: every run makes resources of its own): its endpoint, and clients of this
    process that reach it directly (for set-up and the producer)."""
    endpoint = _moto_endpoint()
    saved = {key: os.environ.get(key) for key in (*LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL")}
    os.environ.update({**LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
    try:
        async with aws_clients() as clients:
            yield endpoint, clients
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_MOTO: list[tuple[subprocess.Popen[bytes], str]] = []


def _moto_endpoint() -> str:
    """Start the moto process on first use (killed when this process exits)."""
    if _MOTO and _MOTO[0][0].poll() is None:
        return _MOTO[0][1]
    process = subprocess.Popen(
        [sys.executable, str(MOTO_PROCESS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **LOCAL_CREDENTIALS},
    )
    atexit.register(_end, process)
    assert process.stdout is not None
    if not select.select([process.stdout], [], [], 60)[0]:
        raise TimeoutError("moto did not start within 60 s")
    endpoint = str(json.loads(process.stdout.readline())["endpoint"])
    _MOTO[:] = [(process, endpoint)]
    return endpoint


def _end(process: subprocess.Popen[bytes]) -> None:
    """Kill the moto process: it keeps nothing worth a graceful stop (which takes a second)."""
    if process.poll() is None:
        process.kill()
    process.wait()


@dataclass
class Marks:
    """What the proxy saw of one job queue: the clock readings come from `time.perf_counter()`."""

    queue_url: str = ""
    expected: int = 0
    first_poll: float | None = None  # arrival of the first ReceiveMessage of all
    first_receive: float | None = None  # arrival of the first ReceiveMessage that got messages
    last_delete: float | None = None  # answer to the `expected`-th DeleteMessage
    received: int = 0  # messages handed out
    deleted: int = 0
    delete_times: list[float] = field(default_factory=list)
    max_in_flight: int = 0  # received and not yet deleted, at most
    calls: Counter[str] = field(default_factory=Counter)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    polled: asyncio.Event = field(default_factory=asyncio.Event)


class AwsProxy:
    """A loopback reverse proxy in front of moto that holds every call `delay_s` before passing
    it on (a realistic round trip to AWS), and marks the calls on the watched job queue."""

    def __init__(self, upstream: str, delay_s: float = 0.0) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.marks = Marks()
        self.endpoint = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> AwsProxy:
        """Listen on a free loopback port; `endpoint` is then its URL."""
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=60),
            connector=aiohttp.TCPConnector(limit=0),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.endpoint = f"http://{host}:{port}"
        return self

    async def close(self) -> None:
        """Stop listening and close the upstream connections."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def watch(self, queue_url: str, expected: int) -> Marks:
        """Mark the calls on `queue_url` from now on; `done` is set at the `expected`-th delete."""
        self.marks = Marks(queue_url=queue_url, expected=expected)
        return self.marks

    async def _handle(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        body = await request.read()
        operation = _operation(request)
        queue = _queue_of(body) if operation.startswith("sqs.") else None
        marks = self.marks
        if operation == "sqs.ReceiveMessage" and queue == marks.queue_url and not marks.first_poll:
            marks.first_poll = arrived  # marked on arrival: a long poll may wait 20 s
            marks.polled.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        answer = await self._forward(request, body)
        marks = self.marks  # a long poll that began before `watch` is answered into the new run
        marks.calls[operation] += 1
        if queue is not None and queue == marks.queue_url and answer.status == 200:
            _note(marks, operation, arrived, answer)
        return answer

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._session is not None
        url = URL(self.upstream + request.raw_path, encoded=True)
        try:
            async with self._session.request(
                request.method, url, headers=_end_to_end(request.headers), data=body
            ) as answer:
                payload = await answer.read()
                return web.Response(
                    status=answer.status, body=payload, headers=_end_to_end(answer.headers)
                )
        except (aiohttp.ClientError, TimeoutError) as error:
            return web.Response(status=502, text=f"bench proxy: {error!r}")


def _note(marks: Marks, operation: str, arrived: float, answer: web.Response) -> None:
    """Count what a successful call on the watched queue did."""
    if operation == "sqs.ReceiveMessage":
        payload = answer.body if isinstance(answer.body, bytes) else b""
        got = payload.count(b'"ReceiptHandle"')
        if got and marks.first_receive is None:
            marks.first_receive = arrived
        marks.received += got
        marks.max_in_flight = max(marks.max_in_flight, marks.received - marks.deleted)
    elif operation == "sqs.DeleteMessage":
        now = time.perf_counter()
        marks.deleted += 1
        marks.delete_times.append(now)
        if marks.deleted == marks.expected:
            marks.last_delete = now
            marks.done.set()


def _operation(request: web.Request) -> str:
    """`sqs.<Action>` from the JSON protocol's target, `sns.query`, or `s3.<METHOD>`."""
    target = request.headers.get("X-Amz-Target", "")
    if target.startswith("AmazonSQS."):
        return "sqs." + target.removeprefix("AmazonSQS.")
    if request.content_type == "application/x-www-form-urlencoded":
        return "sns.query"
    return "s3." + request.method


def _queue_of(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document.get("QueueUrl") if isinstance(document, dict) else None


def _end_to_end(headers: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key.lower() not in _HOP_BY_HOP}


# the producer ------------------------------------------------------------------------------------


def job_body(tag: str, number: int) -> str:
    """A small native txt2img job with a unique id (no earlier result.json to find)."""
    return json.dumps(
        {
            "version": 1,
            "id": f"{tag}-{number:05d}",
            "task": "txt2img",
            "params": {"prompt": "bench", "steps": 1, "width": 8, "height": 8, "seed": number},
        }
    )


@dataclass
class Produced:
    """What the producer did: when its first message was in the queue, and the depths it saw."""

    first_sent: float | None = None
    sent: int = 0
    depths: list[int] = field(default_factory=list)

    def depth_seen(self) -> dict[str, int]:
        """The median and largest number of visible messages the producer found."""
        if not self.depths:
            return {"median": 0, "max": 0}
        return {"median": int(statistics.median(self.depths)), "max": max(self.depths)}


async def produce(
    clients: AwsClients,
    marks: Marks,
    bodies: Sequence[str],
    *,
    depth: int,
    deadline: float,
    interval_s: float = 0.005,
) -> Produced:
    """Send `bodies`, topping the queue up to `depth` visible messages once it has room for
    half of that.

    The visible count is `sent - received` as the proxy counted them (no redelivery happens in a
    benchmark): no GetQueueAttributes calls load moto while the consumers are measured.
    """
    produced = Produced()
    pending = list(bodies)
    least = min(10, max(1, depth // 2))  # top up in batches: fewer SendMessageBatch calls
    while pending and time.monotonic() < deadline:
        visible = produced.sent - marks.received
        produced.depths.append(visible)
        room = min(depth - visible, len(pending))
        if room < min(least, len(pending)):
            room = 0
        while room > 0:
            batch, pending = pending[: min(10, room)], pending[min(10, room) :]
            await _send(clients, marks.queue_url, batch)
            produced.first_sent = produced.first_sent or time.perf_counter()
            produced.sent += len(batch)
            room -= len(batch)
        await asyncio.sleep(interval_s)
    return produced


async def _send(clients: AwsClients, queue_url: str, batch: Sequence[str]) -> None:
    entries: list[SendMessageBatchRequestEntryTypeDef] = [
        {"Id": str(n), "MessageBody": body} for n, body in enumerate(batch)
    ]
    response = await clients.sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
    if response.get("Failed"):
        raise RuntimeError(f"the queue refused messages: {response['Failed']}")


# consumers ---------------------------------------------------------------------------------------


def consumer_environment(target: Target, endpoint: str, **extra: str) -> dict[str, str]:
    """This process's environment less AWS/sdworker/OTel settings, plus the target's, plus
    `extra`: no Spot polling, no probe server, JSON logs; 20 s long polls, as deployed."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_OUT)}
    return {
        **inherited,
        **target.environment(endpoint),
        "SDWORKER_HEALTH_PORT": "0",
        "SDWORKER_SPOT": "off",
        "SDWORKER_LOG_FORMAT": "json",
        **extra,
    }


class Consumer:
    """A consumer subprocess; its stderr goes to a log file, where `ready` looks for the
    `worker started` event."""

    def __init__(
        self,
        argv: Sequence[str],
        environment: Mapping[str, str],
        log: Path,
        *,
        graceful: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.environment = dict(environment)
        self.log = log
        self.graceful = graceful  # stop with SIGTERM (a profiled worker writes its statistics)
        self.process: asyncio.subprocess.Process | None = None
        self.spawned_at = 0.0

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.process is not None
        return self.process.pid

    async def start(self) -> Consumer:
        """Start the process (`spawned_at` is read just before)."""
        with self.log.open("wb") as log:
            self.spawned_at = time.perf_counter()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.environment, stdout=asyncio.subprocess.DEVNULL, stderr=log
            )
        return self

    async def ready(self, within_s: float = 60.0) -> None:
        """Wait for the `worker started` log line; raise if the process dies or is too slow."""
        assert self.process is not None
        deadline = time.monotonic() + within_s
        needle = f'"event": "{STARTED}"'.encode()
        while needle not in self.log.read_bytes():
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.argv} exited: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.argv} did not start in {within_s} s: {self.tail()}")
            await asyncio.sleep(0.02)

    def tail(self, lines: int = 5) -> str:
        """The last lines of the log, for error messages."""
        return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def errors(self) -> list[str]:
        """Log lines at level error or worse (sdworker's JSON logs)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("level") in ("error", "critical"):
                    found.append(str(record.get("event")))
        return found

    async def stop(self, within_s: float = 30.0) -> int | None:
        """Kill the process, or if `graceful` send SIGTERM and kill it only if it has not exited
        within `within_s`; the exit code. A measured run is over when it is stopped: nothing is
        gained by waiting for a drain."""
        if self.process is None or self.process.returncode is not None:
            return None if self.process is None else self.process.returncode
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM if self.graceful else signal.SIGKILL)
        try:
            return await asyncio.wait_for(self.process.wait(), within_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            return await self.process.wait()


def fake_worker(latency_s: float) -> list[str]:
    """The command of an sdworker process with a `FakeBackend` taking `latency_s` a job (its
    settings come from `SDWORKER_*` variables: see `consumer_environment`)."""
    return [sys.executable, str(FAKE_WORKER), f"--latency={latency_s}"]


def bare_consumer(mode: str, *, generation_s: float = 0.0, in_flight: int = 1) -> list[str]:
    """The command of a `bare_consumer.py` process (`baseline` or `ceiling`)."""
    return [
        sys.executable,
        str(BARE_CONSUMER),
        mode,
        f"--generation={generation_s}",
        f"--in-flight={in_flight}",
    ]


# one measured run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What a run feeds: `jobs` messages, `depth` kept visible, ids tagged `tag`."""

    tag: str
    jobs: int
    depth: int
    timeout_s: float


@dataclass
class RunResult:
    """One run: the proxy's marks, the producer's record, and the CPU time the consumers used
    from when they polled to the last delete."""

    marks: Marks
    produced: Produced
    consumer_cpu_s: float = 0.0
    samples: list[tuple[int, float]] = field(default_factory=list)  # (jobs deleted, RSS MiB)

    @property
    def cpu_ms_per_job(self) -> float:
        """The consumers' CPU time per job, in milliseconds."""
        return round(1000 * self.consumer_cpu_s / max(1, self.marks.expected), 2)

    @property
    def start(self) -> float:
        """The first receive that got messages, or the first message sent if a poll that began
        earlier (waiting on an empty queue) got it."""
        assert self.marks.first_receive is not None and self.produced.first_sent is not None
        return max(self.marks.first_receive, self.produced.first_sent)

    @property
    def wall_s(self) -> float:
        """From the first receive that got messages to the last delete."""
        assert self.marks.last_delete is not None
        return self.marks.last_delete - self.start

    def calls_per_job(self) -> dict[str, float]:
        """AWS calls by operation, per job (the producer's own calls bypass the proxy)."""
        jobs = max(1, self.marks.expected)
        return {name: round(count / jobs, 2) for name, count in sorted(self.marks.calls.items())}


async def start_all(consumers: Sequence[Consumer], within_s: float = 120.0) -> None:
    """Start the consumers together and wait until each has said it polls."""
    for consumer in consumers:
        await consumer.start()
    await asyncio.gather(*(consumer.ready(within_s) for consumer in consumers))


async def stop_all(consumers: Sequence[Consumer]) -> None:
    """Kill the consumers."""
    await asyncio.gather(*(consumer.stop() for consumer in consumers))


@dataclass
class Fleet:
    """One configuration under test: the consumers of one queue of its own."""

    name: str
    target: Target
    consumers: list[Consumer]

    def errors(self) -> list[str]:
        """Error lines from the consumers' logs."""
        return [error for consumer in self.consumers for error in consumer.errors()]


async def make_fleet(
    clients: AwsClients,
    proxy: AwsProxy,
    name: str,
    argv: Sequence[str],
    *,
    processes: int = 1,
    folder: Path,
    graceful: bool = False,
    **settings: str,
) -> Fleet:
    """A queue (bucket, topic) named `name` and `processes` consumers of it, not started yet;
    `settings` are extra variables (`SDWORKER_PREFETCH="2"`); `graceful`: see `Consumer`."""
    target = await make_target(clients, name)
    environment = consumer_environment(target, proxy.endpoint, **settings)
    logs = [folder / f"{name}-{n}.log" for n in range(processes)]
    return Fleet(
        name, target, [Consumer(argv, environment, log, graceful=graceful) for log in logs]
    )


@asynccontextmanager
async def serving(
    clients: AwsClients, proxy: AwsProxy, fleets: Sequence[Fleet], *, warm_up: int
) -> AsyncIterator[None]:
    """Start every fleet's consumers at once, give each fleet `warm_up` jobs (not measured:
    first calls pay for lazy set-up in botocore and the worker), and kill them all at the end.
    Between their runs, fleets wait in a 20 s long poll on their own queues."""
    consumers = [consumer for fleet in fleets for consumer in fleet.consumers]
    try:
        await start_all(consumers)
        for fleet in fleets:
            if warm_up:
                await run_on(clients, proxy, fleet, Load(f"{fleet.name}-warm", warm_up, 10, 120))
        yield
    finally:
        await stop_all(consumers)


async def run_on(
    clients: AwsClients, proxy: AwsProxy, fleet: Fleet, load: Load, *, sample_every_s: float = 0.0
) -> RunResult:
    """Watch the fleet's queue and `feed` it `load`."""
    marks = proxy.watch(fleet.target.queue_url, load.jobs)
    return await feed(clients, marks, fleet.consumers, load, sample_every_s=sample_every_s)


async def feed(
    clients: AwsClients,
    marks: Marks,
    consumers: Sequence[Consumer],
    load: Load,
    *,
    sample_every_s: float = 0.0,
) -> RunResult:
    """Feed `load` to consumers that poll the queue `marks` watches (`AwsProxy.watch`) and wait
    for its last delete. With `sample_every_s`, the consumers' total RSS is sampled with the
    number of jobs deleted so far (and once more at the end). Raises TimeoutError if the jobs are
    not all deleted in time."""
    result = RunResult(marks, Produced())
    sampler: asyncio.Task[None] | None = None
    cpu_before = sum(cpu_s(consumer.pid) for consumer in consumers)
    try:
        if sample_every_s:
            sampler = asyncio.create_task(_sample(consumers, result, sample_every_s))
        bodies = [job_body(load.tag, n) for n in range(load.jobs)]
        deadline = time.monotonic() + load.timeout_s
        result.produced = await produce(clients, marks, bodies, depth=load.depth, deadline=deadline)
        await asyncio.wait_for(marks.done.wait(), max(1.0, deadline - time.monotonic()))
    except TimeoutError:
        logs = "; ".join(consumer.tail() for consumer in consumers)
        raise TimeoutError(
            f"{load.tag}: {marks.deleted}/{load.jobs} jobs done in {load.timeout_s} s ({logs})"
        ) from None
    finally:
        if sampler is not None:
            sampler.cancel()
    result.consumer_cpu_s = sum(cpu_s(consumer.pid) for consumer in consumers) - cpu_before
    if sampler is not None:
        _sample_once(consumers, result)
    return result


async def _sample(consumers: Sequence[Consumer], result: RunResult, every_s: float) -> None:
    while True:
        _sample_once(consumers, result)
        await asyncio.sleep(every_s)


def _sample_once(consumers: Sequence[Consumer], result: RunResult) -> None:
    memory = [rss_mb(consumer.pid) for consumer in consumers]
    result.samples.append((result.marks.deleted, sum(m for m in memory if m is not None)))
