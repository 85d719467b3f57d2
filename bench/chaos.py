"""The chaos run of issue 6: worker processes under seeded faults of every kind, and proof
that no job is lost.

Run it with `make chaos`, or::

    python bench/chaos.py --seed 7 --workers 3 --jobs 300

One moto server on 127.0.0.1 holds the queue (with a DLQ by redrive), the bucket and the result
topic (its results queue subscribed with raw delivery). The workers (`bench/chaos_worker.py`
subprocesses, each with its own fake instance metadata served from this process) reach moto
through a loopback proxy that answers a seeded share of calls with throttling or 500 errors (some
after moto has acted) or delays them, and now and then drops every call for `--outage` seconds.
A producer keeps about `--depth` messages visible until `--jobs` are submitted; meanwhile workers
are SIGKILLed, SIGTERMed (once or twice) or sent Spot notices (terminate, stop, hibernate,
rebalance then terminate), their backends fail, hang, go down or run long (see
`chaos_worker.py`), and every worker that exits is restarted after a short delay.

When every job has a final notification or a DLQ copy and every kind of fault has happened (or
`--timeout` passes), faults stop, the job queue is given time to empty, the workers are stopped,
and the results queue, the DLQ, S3 and the workers' event file are read. Progress goes to stderr;
the last line on stdout is one JSON object (docs/reliability.md explains each field). Worker
logs, `generations.jsonl` and `workers.json` (each worker's life) go to `--log-dir`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web
from botocore.exceptions import ClientError
from chaos_worker import BACKEND_FAULTS, DEFAULT_RATES, Plan
from types_aiobotocore_s3 import S3Client
from types_aiobotocore_sqs import SQSClient
from types_aiobotocore_sqs.literals import QueueAttributeFilterType
from types_aiobotocore_sqs.type_defs import (
    DeleteMessageBatchRequestEntryTypeDef,
    SendMessageBatchRequestEntryTypeDef,
)
from yarl import URL

from sdworker.aws import AwsClients, aws_clients
from sdworker.local import LocalAws, LocalResources, create_resources
from sdworker.testing import FakeInstanceMetadata

WORKER_SCRIPT = Path(__file__).resolve().parent / "chaos_worker.py"
PROCESS_FAULTS = (
    "sigkill",
    "sigterm",
    "sigterm_twice",
    "spot_terminate",
    "spot_stop",
    "spot_hibernate",
    "spot_rebalance",
)
PROCESS_WEIGHTS = (3, 2, 1, 2, 1, 1, 1)
OUTAGE, OUTAGE_WEIGHT = "aws_outage", 1
AWS_FAULTS = ("aws_throttle", "aws_500", "aws_500_after", "aws_delay")
AWS_WEIGHTS = (4, 3, 1, 2)
ALL_FAULTS = (
    *PROCESS_FAULTS,
    *(f"backend_{kind}" for kind in BACKEND_FAULTS),
    *AWS_FAULTS,
    OUTAGE,
)
POLICIES = ("requeue", "finish", "auto")
STOPPING = "stopping: no new messages; handing back what has not started"
SECOND_SIGNAL_AFTER_S = 0.5
REBALANCE_FOLLOW_S = 2.0
RESTART_DELAY_S = (0.3, 1.0)
SPOT_INTERVAL_S = 0.2
RETRY_BACKOFF_S = 1
OVERRUN_SLACK_S = 2.0  # the drain's own waits past the deadline: recording ≥ 1 s, polling
MAX_INCARNATIONS = 1000  # per worker slot: a bound, never reached
MAX_FAILED_STARTS = 3
MAX_FAULTS = 100_000
STATUS_EVERY_S = 5.0
TARGET_POLL_S = 0.25
_ALIASES = ("SQS_", "SNS_", "S3_", "RUNTIME_", "API_BASE_URL", "DYNAMIC_SD_MODEL", "LOGLEVEL")
_HOP_BY_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect", "te"}
)


HELP = {
    "seed": "seeds every random choice: faults, targets, policies, backend plans",
    "workers": "worker processes (slots; each restarted when it exits)",
    "jobs": "jobs to submit",
    "timeout": "seconds for the jobs to settle before the run gives up waiting",
    "depth": "messages the producer keeps visible (0: twice --workers)",
    "visibility": "the job queue's visibility timeout, s (also SDWORKER_VISIBILITY_TIMEOUT)",
    "fault_interval": "mean seconds between signal, Spot and outage faults",
    "aws_fault_rate": "share of AWS calls answered with an error or delayed",
    "backend_fault_scale": "multiplies the backend fault rates of chaos_worker.DEFAULT_RATES",
    "spot_lead": "seconds from a terminate/stop notice to its `time`",
    "spot_margin": "SDWORKER_SPOT_MARGIN, s",
    "shutdown_deadline": "SDWORKER_SHUTDOWN_DEADLINE, s",
    "job_timeout": "each job's timeout_s is its longest planned run plus this, s",
    "slow": "seconds a slow job's run takes (longer than --visibility)",
    "outage": "seconds each AWS outage drops every call (0: no outages)",
    "backend_grace": "SDWORKER_BACKEND_GRACE, s",
    "unready": "seconds an `unready` backend stays not ready",
    "max_attempts": "SDWORKER_MAX_ATTEMPTS",
    "max_receive_count": "the redrive policy's maxReceiveCount",
    "latency": "low,high seconds of an ordinary run",
    "log_dir": "where worker logs, generations.jsonl and workers.json go (default: a temp dir)",
}


@dataclass(frozen=True)
class Options:
    """The run's size, pace and fault rates (flags of the same names; see `HELP`)."""

    seed: int = 1
    workers: int = 3
    jobs: int = 300
    timeout: float = 600.0
    depth: int = 0  # 0: twice the workers
    visibility: int = 6
    fault_interval: float = 3.0
    aws_fault_rate: float = 0.04
    backend_fault_scale: float = 1.0
    spot_lead: float = 8.0
    spot_margin: float = 2.0
    shutdown_deadline: float = 5.0
    job_timeout: float = 4.0
    slow: float = 12.0
    outage: float = 8.0
    backend_grace: float = 1.0
    unready: float = 2.0
    max_attempts: int = 3
    max_receive_count: int = 10
    latency: str = "0.2,1.0"
    log_dir: str = ""

    @property
    def target_depth(self) -> int:
        """How many messages the producer keeps visible."""
        return self.depth or 2 * self.workers


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Options from the command line; every field of `Options` is a flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Options()
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=type(value), default=value, help=HELP[name])
    options = Options(**vars(parser.parse_args(argv)))
    if options.workers < 1 or options.jobs < 1:
        parser.error("--workers and --jobs must be at least 1")
    return options


def say(message: str) -> None:
    """A progress line for people, on stderr."""
    print(f"chaos: {message}", file=sys.stderr, flush=True)


# the AWS fault proxy ---------------------------------------------------------------------------


class FaultyProxy:
    """A loopback reverse proxy in front of moto that fails or delays a seeded share of calls.

    `aws_throttle` and `aws_500` answer without reaching moto; `aws_500_after` lets moto act and
    then answers 500 (the client retries an action that was done: a lost delete, a repeated
    publish); `aws_delay` waits 0.1-1.5 s before forwarding. Error bodies are those of each
    protocol (SQS JSON with `x-amzn-query-error`, SNS query XML, S3 XML), so that botocore's
    standard retry mode treats them as AWS's own. During an outage (`begin_outage`) every
    connection is dropped unanswered, as by a network partition.
    """

    def __init__(self, upstream: str, rng: random.Random, rate: float) -> None:
        self.upstream = upstream
        self.rng = rng
        self.rate = rate
        self.calls = 0
        self.faults: Counter[str] = Counter()
        self.by_operation: Counter[str] = Counter()
        self.endpoint = ""
        self.dropped = 0
        self.outages: list[float] = []  # when each began (time.monotonic())
        self._outage_until = 0.0
        self._kinds = _seeded_kinds(rng, AWS_FAULTS, AWS_WEIGHTS)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Listen on a free loopback port; `endpoint` is then its URL."""
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.endpoint = f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop listening and close the upstream connections."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    @property
    def covered(self) -> bool:
        """Whether every kind of AWS fault has been injected."""
        return all(self.faults[kind] for kind in AWS_FAULTS)

    def begin_outage(self, seconds: float) -> None:
        """Drop every call for `seconds`."""
        self.faults[OUTAGE] += 1
        self.outages.append(time.monotonic())
        self._outage_until = self.outages[-1] + seconds

    def _draw(self) -> str | None:
        return next(self._kinds) if self.rng.random() < self.rate else None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        service, operation = _operation(request)
        self.calls += 1
        if time.monotonic() < self._outage_until and request.transport is not None:
            self.dropped += 1
            request.transport.close()  # the client sees the connection closed, no answer
            return web.Response(status=502)
        fault = self._draw()
        if fault is None:
            return await self._forward(request, body)
        self.faults[fault] += 1
        self.by_operation[f"{service}.{operation}"] += 1
        if fault == "aws_delay":
            await asyncio.sleep(self.rng.uniform(0.1, 1.5))
            return await self._forward(request, body)
        if fault == "aws_500_after":
            await self._forward(request, body)
        return _aws_error(service, throttled=fault == "aws_throttle")

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._session is not None
        url = URL(self.upstream + request.raw_path, encoded=True)
        try:
            async with self._session.request(
                request.method, url, headers=_end_to_end(request.headers), data=body
            ) as answer:
                payload = await answer.read()
                headers = _end_to_end(answer.headers)
                return web.Response(status=answer.status, body=payload, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as error:
            return web.Response(status=502, text=f"chaos proxy: {error!r}")


def _seeded_kinds(
    rng: random.Random, kinds: Sequence[str], weights: Sequence[float]
) -> Iterator[str]:
    """One of each kind in a seeded order, then kinds drawn by weight: a short run has all."""
    first = list(kinds)
    rng.shuffle(first)
    yield from first
    while True:
        yield rng.choices(kinds, weights=weights)[0]


def _end_to_end(headers: Any) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key.lower() not in _HOP_BY_HOP}


def _operation(request: web.Request) -> tuple[str, str]:
    """(service, operation) of an AWS call: SQS by its JSON target, SNS by its form, else S3."""
    target = request.headers.get("X-Amz-Target", "")
    if target.startswith("AmazonSQS."):
        return "sqs", target.removeprefix("AmazonSQS.")
    if request.content_type == "application/x-www-form-urlencoded":
        return "sns", "query"
    return "s3", request.method


_SQS_ERRORS = {
    True: (400, "ThrottlingException", "RequestThrottled;Sender"),
    False: (500, "InternalFailure", "InternalFailure;Receiver"),
}
_XML_ERRORS = {
    ("sns", True): (400, "Throttling", "Rate exceeded"),
    ("sns", False): (500, "InternalFailure", "The request processing has failed."),
    ("s3", True): (503, "SlowDown", "Please reduce your request rate."),
    ("s3", False): (500, "InternalError", "We encountered an internal error. Please try again."),
}


def _aws_error(service: str, *, throttled: bool) -> web.Response:
    """The error AWS itself would send: throttled (400 or 503) or an internal error (500)."""
    if service == "sqs":
        status, code, query = _SQS_ERRORS[throttled]
        body = json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": "chaos"})
        return web.Response(
            status=status,
            text=body,
            content_type="application/x-amz-json-1.0",
            headers={"x-amzn-query-error": query},
        )
    status, code, message = _XML_ERRORS[service, throttled]
    text = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    if service == "sns":  # the query protocol wraps it
        text = f"<ErrorResponse>{text}<RequestId>chaos</RequestId></ErrorResponse>"
    return web.Response(status=status, text=text, content_type="text/xml")


# workers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stop:
    """A fault that asks a worker to stop: its kind, when it was sent (wall clock), the time the
    worker was given to stop (its deadline)."""

    kind: str
    at: float
    allowed_s: float


@dataclass
class Incarnation:
    """One worker process in a slot; a restart makes a new incarnation."""

    slot: int
    worker_id: str
    policy: str
    imds: FakeInstanceMetadata
    process: asyncio.subprocess.Process
    log: TextIO
    state: str = "starting"  # serving, targeted (a fault was sent), exited
    spawned_at: float = field(default_factory=time.time)
    served_at: float | None = None
    stop: Stop | None = None
    stopping_at: float | None = None
    stopped_at: float | None = None
    exited_at: float | None = None
    code: int | None = None
    errors: Counter[str] = field(default_factory=Counter)
    other_lines: int = 0  # stderr lines that are not JSON log records (tracebacks)

    @property
    def served(self) -> bool:
        """Whether the worker got as far as serving."""
        return self.served_at is not None

    @property
    def alive(self) -> bool:
        """Whether the process has not exited."""
        return self.process.returncode is None

    def signal(self, signum: signal.Signals) -> None:
        """Send `signum` unless the process is gone already."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)

    def on_line(self, line: bytes) -> None:
        """Keep a log line and note the events the run measures."""
        self.log.write(line.decode(errors="replace"))
        try:
            record = json.loads(line)
        except ValueError:
            self.other_lines += 1
            return
        event, at = record.get("event"), _wall(record.get("timestamp"))
        if event == "worker started" and self.state == "starting":
            self.state, self.served_at = "serving", at
        elif event == STOPPING and self.stopping_at is None:
            self.stopping_at = at
        elif event == "worker stopped":
            self.stopped_at = at
        if record.get("level") in ("error", "critical"):
            self.errors[str(event)] += 1

    def summary(self) -> dict[str, Any]:
        """The worker's life, for `workers.json` in the log directory."""
        return {
            "worker": self.worker_id,
            "policy": self.policy,
            "served": self.served,
            "start_s": _since(self.served_at, self.spawned_at),
            "exit_code": self.code,
            "spawned_at": self.spawned_at,
            "exited_at": self.exited_at,
            "stop": self.handback(),
            "errors": dict(self.errors),
            "non_json_lines": self.other_lines,
        }

    def handback(self) -> dict[str, Any] | None:
        """How long the worker took to stop after the fault that asked it to; None if none did."""
        if self.stop is None:
            return None
        since = self.stop.at
        return {
            "kind": self.stop.kind,
            "worker": self.worker_id,
            "policy": self.policy,
            "exit_code": self.code,
            "allowed_s": self.stop.allowed_s,
            # the worker was stopping already (its backend hung, say): nothing to measure
            "preempted": self.stopping_at is not None and self.stopping_at < since,
            "reaction_s": _since(self.stopping_at, since),
            "handback_s": _since(self.stopped_at, since),
            "exit_s": _since(self.exited_at, since),
        }


def _wall(timestamp: Any) -> float | None:
    """A structlog ISO timestamp as seconds since the epoch."""
    if not isinstance(timestamp, str):
        return None
    return datetime.fromisoformat(timestamp).timestamp()


def _since(moment: float | None, start: float) -> float | None:
    return None if moment is None else round(moment - start, 3)


class Fleet:
    """Runs `--workers` slots, restarting each worker that exits, as an orchestrator would."""

    def __init__(self, options: Options, environment: dict[str, str], log_dir: Path) -> None:
        self.options = options
        self.environment = environment
        self.log_dir = log_dir
        self.rng = random.Random(f"{options.seed}-fleet")
        self.current: dict[int, Incarnation] = {}
        self.incarnations: list[Incarnation] = []
        self.exits: Counter[str] = Counter()
        self.killed_at_drain = 0
        self.draining = asyncio.Event()
        self._supervisors: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start every slot."""
        self._supervisors = [
            asyncio.create_task(self._supervise(slot)) for slot in range(self.options.workers)
        ]

    def serving(self) -> list[Incarnation]:
        """Workers that serve and have no fault on the way."""
        return [w for w in self.current.values() if w.state == "serving" and w.alive]

    def up(self) -> int:
        """How many workers are serving now, a fault on the way or not."""
        return sum(1 for w in self.current.values() if w.served and w.alive)

    async def _supervise(self, slot: int) -> None:
        """Run the slot's worker; when it exits, start another after a short delay."""
        never_served = 0
        for number in range(MAX_INCARNATIONS):
            if self.draining.is_set():
                return
            if never_served >= MAX_FAILED_STARTS:
                say(f"slot {slot}: {never_served} workers in a row exited before serving; stopped")
                return
            worker = await self._spawn(slot, number)
            await self._watch(worker)
            never_served = 0 if worker.served else never_served + 1
            await _wait(self.draining, self.rng.uniform(*RESTART_DELAY_S))
        say(f"slot {slot}: {MAX_INCARNATIONS} restarts; giving up on it")

    async def _spawn(self, slot: int, number: int) -> Incarnation:
        imds = await FakeInstanceMetadata().start()
        worker_id, policy = f"w{slot}.{number}", self.rng.choice(POLICIES)
        environment = {
            **self.environment,
            "SDWORKER_WORKER_ID": worker_id,
            "SDWORKER_SHUTDOWN_POLICY": policy,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.endpoint,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER_SCRIPT),
            env=environment,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        log = (self.log_dir / f"{worker_id}.log").open("w")
        worker = Incarnation(slot, worker_id, policy, imds, process, log)
        self.current[slot] = worker
        self.incarnations.append(worker)
        return worker

    async def _watch(self, worker: Incarnation) -> None:
        """Read the worker's log until it exits; then record how it ended."""
        assert worker.process.stderr is not None
        while line := await worker.process.stderr.readline():  # ends at the process's exit
            worker.on_line(line)
        worker.code = await worker.process.wait()
        worker.exited_at, worker.state = time.time(), "exited"
        worker.log.close()
        await worker.imds.close()
        self.exits[f"{worker.code}" if worker.served else f"{worker.code} before serving"] += 1

    async def drain(self, within_s: float) -> None:
        """Stop restarting; SIGTERM every worker; SIGKILL those still there after `within_s`."""
        self.draining.set()
        for worker in self.current.values():
            worker.signal(signal.SIGTERM)
        if not self._supervisors:
            return
        _, pending = await asyncio.wait(self._supervisors, timeout=within_s)
        if pending:
            for worker in self.current.values():
                if worker.alive:
                    self.killed_at_drain += 1
                    worker.signal(signal.SIGKILL)
            await asyncio.wait(pending, timeout=within_s)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `event` is set; whether it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


# process faults --------------------------------------------------------------------------------


class FaultInjector:
    """Every so often (seeded), one fault on one serving worker, while another keeps serving.

    The first faults are one of each kind in a seeded order, so a short run has them all.
    """

    def __init__(self, fleet: Fleet, proxy: FaultyProxy, options: Options) -> None:
        self.fleet = fleet
        self.proxy = proxy
        self.options = options
        self.rng = random.Random(f"{options.seed}-faults")
        self.counts: Counter[str] = Counter()
        self.kinds = (*PROCESS_FAULTS, OUTAGE) if options.outage > 0 else PROCESS_FAULTS
        self.weights = (*PROCESS_WEIGHTS, OUTAGE_WEIGHT)[: len(self.kinds)]
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def covered(self) -> bool:
        """Whether every kind of fault the injector makes has been injected."""
        return all(self.counts[kind] for kind in self.kinds)

    async def run(self, until: asyncio.Event) -> None:
        """Inject faults, 0.5-1.5 `fault_interval` apart, until `until` is set; then wait for
        those under way. An AWS outage needs no target."""
        kinds = _seeded_kinds(self.rng, self.kinds, self.weights)
        for _ in range(MAX_FAULTS):
            pause = self.options.fault_interval * self.rng.uniform(0.5, 1.5)
            kind = next(kinds)
            if await _wait(until, pause):
                break
            if kind == OUTAGE:
                self.counts[kind] += 1
                self.proxy.begin_outage(self.options.outage)
                continue
            target = await self._target(until)
            if target is None:
                break
            task = asyncio.create_task(self._inject(kind, target))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(*self._tasks)

    async def _target(self, until: asyncio.Event) -> Incarnation | None:
        """A serving worker, once another one serves too (polled); None once `until` is set."""
        while not until.is_set():
            serving = sorted(self.fleet.serving(), key=lambda worker: worker.slot)
            if len(serving) >= min(2, self.options.workers):
                return self.rng.choice(serving)
            await _wait(until, TARGET_POLL_S)
        return None

    async def _inject(self, kind: str, worker: Incarnation) -> None:
        self.counts[kind] += 1
        worker.state = "targeted"
        if kind == "sigkill":
            worker.signal(signal.SIGKILL)
        elif kind.startswith("sigterm"):
            worker.stop = Stop(kind, time.time(), self.options.shutdown_deadline)
            worker.signal(signal.SIGTERM)
            if kind == "sigterm_twice":
                await asyncio.sleep(SECOND_SIGNAL_AFTER_S)
                worker.signal(signal.SIGTERM)
        else:
            await self._spot(kind, worker)

    async def _spot(self, kind: str, worker: Incarnation) -> None:
        """Publish a notice on the worker's instance metadata; a rebalance is followed by a
        terminate notice, as AWS often does."""
        action = kind.removeprefix("spot_")
        if action == "rebalance":
            worker.imds.recommend_rebalance()
            await asyncio.sleep(REBALANCE_FOLLOW_S)
            action = "terminate"
        if not worker.alive:
            return
        lead = 0.0 if action == "hibernate" else self.options.spot_lead
        allowed = max(0.0, lead - self.options.spot_margin)
        worker.stop = Stop(kind, time.time(), min(allowed, self.options.shutdown_deadline))
        worker.imds.schedule_interruption(action, in_seconds=lead)


# jobs in, results out --------------------------------------------------------------------------


@dataclass
class Ledger:
    """What was submitted and everything read back: final notifications and DLQ copies."""

    submitted: list[str] = field(default_factory=list)
    finals: list[dict[str, Any]] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    dead: list[dict[str, Any]] = field(default_factory=list)

    def on_result(self, message: dict[str, Any]) -> None:
        """A notification from the results queue."""
        body = json.loads(message["Body"])
        self.statuses[str(body.get("status"))] += 1
        if body.get("status") in ("succeeded", "failed"):
            self.finals.append(body)

    def on_dead_letter(self, message: dict[str, Any]) -> None:
        """A message from the DLQ: the job id and the worker's reason, if it gave one."""
        try:
            job_id = json.loads(message["Body"]).get("id")
        except ValueError:
            job_id = None
        reason = message.get("MessageAttributes", {}).get("sdworker_error", {})
        self.dead.append({"id": job_id, "error": reason.get("StringValue")})

    def settled(self) -> set[str]:
        """Submitted jobs with a final notification or a DLQ copy."""
        done = {str(body.get("id")) for body in self.finals}
        done |= {str(dead["id"]) for dead in self.dead}
        return done & set(self.submitted)


class QueueReader:
    """Reads and deletes everything that arrives on a queue, handing each message on."""

    def __init__(self, sqs: SQSClient, url: str, handle: Callable[[dict[str, Any]], None]) -> None:
        self.sqs, self.url, self.handle = sqs, url, handle
        self.idle_since: float | None = None  # start of the latest receive that got nothing

    async def run(self, until: asyncio.Event) -> None:
        """Receive (1 s long polls) until `until` is set."""
        while not until.is_set():
            began = time.monotonic()
            response = await self.sqs.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                MessageAttributeNames=["All"],
            )
            messages = response.get("Messages", [])
            self.idle_since = None if messages else began
            for message in messages:
                self.handle(dict(message))
            if messages:
                entries: list[DeleteMessageBatchRequestEntryTypeDef] = [
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(messages)
                ]
                await self.sqs.delete_message_batch(QueueUrl=self.url, Entries=entries)

    def idle_after(self, moment: float) -> bool:
        """Whether a receive begun after `moment` found the queue empty."""
        return self.idle_since is not None and self.idle_since > moment


def job_body(plan: Plan, number: int, timeout_s: float) -> dict[str, Any]:
    """A small txt2img job; `timeout_s` past the longest run of the job (a slow job's too) arms
    the watchdog against hung backends."""
    job_id = f"c{plan.seed}-{number:05d}"
    return {
        "version": 1,
        "id": job_id,
        "task": "txt2img",
        "params": {"prompt": "chaos", "steps": 4, "width": 8, "height": 8, "seed": number},
        "timeout_s": round(plan.longest_s(job_id) + timeout_s, 1),
    }


async def produce(
    sqs: SQSClient, url: str, options: Options, ledger: Ledger, deadline: float
) -> None:
    """Submit `--jobs` jobs, keeping about `target_depth` messages visible (moto slows with
    depth), until all are sent or the deadline passes."""
    plan = chaos_plan(options)
    pending = [job_body(plan, n, options.job_timeout) for n in range(options.jobs)]
    while pending and time.monotonic() < deadline:
        room = min(10, options.target_depth - await _depth(sqs, url), len(pending))
        if room > 0:
            batch, pending = pending[:room], pending[room:]
            refused = await _send(sqs, url, batch)
            ledger.submitted += [body["id"] for body in batch if body["id"] not in refused]
            pending = [body for body in batch if body["id"] in refused] + pending
        await asyncio.sleep(0.2)


VISIBLE: Sequence[QueueAttributeFilterType] = ("ApproximateNumberOfMessages",)
ALL_MESSAGES: Sequence[QueueAttributeFilterType] = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


async def _depth(
    sqs: SQSClient, url: str, names: Sequence[QueueAttributeFilterType] = VISIBLE
) -> int:
    """The sum of the queue's message counts `names`."""
    attributes = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(names))
    return sum(int(value) for value in attributes["Attributes"].values())


async def _send(sqs: SQSClient, url: str, batch: list[dict[str, Any]]) -> set[str]:
    """Send a batch; the job ids the queue refused."""
    entries: list[SendMessageBatchRequestEntryTypeDef] = [
        {"Id": str(n), "MessageBody": json.dumps(body)} for n, body in enumerate(batch)
    ]
    response = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
    return {batch[int(failure["Id"])]["id"] for failure in response.get("Failed", [])}


# the run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the scenario starts, for the report."""

    options: Options
    clients: AwsClients
    resources: LocalResources
    proxy: FaultyProxy
    fleet: Fleet
    injector: FaultInjector
    events: Path
    ledger: Ledger = field(default_factory=Ledger)
    started: float = field(default_factory=time.monotonic)
    finished_in_time: bool = False
    queue_left: int = 0


def chaos_plan(options: Options) -> Plan:
    """The backends' plan, as the workers build it from their environment."""
    rates = {kind: rate * options.backend_fault_scale for kind, rate in DEFAULT_RATES.items()}
    low, high = (float(part) for part in options.latency.split(","))
    return Plan(options.seed, rates, (low, high), options.slow)


def worker_environment(
    options: Options, resources: LocalResources, proxy: str, events: Path
) -> dict[str, str]:
    """The environment of every worker: local resources through the proxy, short timings."""
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SDWORKER_", "AWS_", "CHAOS_", *_ALIASES))
    }
    plan = chaos_plan(options)
    return {
        **inherited,
        **resources.environment(),
        "AWS_ENDPOINT_URL": proxy,
        "NO_PROXY": "127.0.0.1,localhost",
        "SDWORKER_BACKEND": "fake",
        "SDWORKER_HEALTH_PORT": "0",  # no probe server: several workers share this host
        "SDWORKER_LOG_FORMAT": "json",
        "SDWORKER_SPOT": "on",
        "SDWORKER_SPOT_INTERVAL": str(SPOT_INTERVAL_S),
        "SDWORKER_SPOT_MARGIN": str(options.spot_margin),
        "SDWORKER_VISIBILITY_TIMEOUT": str(options.visibility),
        "SDWORKER_RECEIVE_WAIT": "1",
        "SDWORKER_MAX_ATTEMPTS": str(options.max_attempts),
        "SDWORKER_RETRY_BACKOFF": str(RETRY_BACKOFF_S),
        "SDWORKER_SHUTDOWN_DEADLINE": str(options.shutdown_deadline),
        "SDWORKER_BACKEND_GRACE": str(options.backend_grace),
        "SDWORKER_ON_BACKEND_HANG": "exit",
        "SDWORKER_NOTIFY_REQUEUED": "true",
        "CHAOS_SEED": str(options.seed),
        "CHAOS_RATES": json.dumps(plan.rates),
        "CHAOS_LATENCY": options.latency,
        "CHAOS_SLOW_S": str(plan.slow_s),
        "CHAOS_UNREADY_S": str(options.unready),
        "CHAOS_EVENTS": str(events),
    }


async def scenario(run: Run) -> None:
    """Feed jobs under faults until all are settled; let the queue empty; stop the workers."""
    options, sqs = run.options, run.clients.sqs
    deadline = run.started + options.timeout
    results = QueueReader(sqs, run.resources.results_queue_url, run.ledger.on_result)
    dead = QueueReader(sqs, run.resources.dlq_url, run.ledger.on_dead_letter)
    calm, reading_done = asyncio.Event(), asyncio.Event()
    readers = [asyncio.create_task(reader.run(reading_done)) for reader in (results, dead)]
    run.fleet.start()
    injector = asyncio.create_task(run.injector.run(calm))
    producer = asyncio.create_task(
        produce(sqs, run.resources.queue_url, options, run.ledger, deadline)
    )
    run.finished_in_time = await _until(lambda: _all_settled(run, producer), deadline, run)
    calm.set()
    await asyncio.gather(producer, injector)
    run.queue_left = await _let_queue_empty(run)
    say("stopping the workers")
    await run.fleet.drain(within_s=options.shutdown_deadline + options.backend_grace + 10)
    drained = time.monotonic()
    await _until(lambda: results.idle_after(drained) and dead.idle_after(drained), drained + 30)
    reading_done.set()
    await asyncio.gather(*readers)


def _all_settled(run: Run, producer: asyncio.Task[None]) -> bool:
    """Every job settled, and every kind of fault injected at least once."""
    settled = producer.done() and len(run.ledger.settled()) == len(run.ledger.submitted)
    return settled and run.injector.covered and run.proxy.covered


async def _until(condition: Callable[[], bool], deadline: float, run: Run | None = None) -> bool:
    """Wait until `condition()` holds (checked twice a second) or `deadline`; whether it held."""
    next_status = time.monotonic()
    while not condition():
        if time.monotonic() >= deadline:
            return False
        if run is not None and time.monotonic() >= next_status:
            _status(run)
            next_status += STATUS_EVERY_S
        await asyncio.sleep(0.5)
    return True


def _status(run: Run) -> None:
    ledger = run.ledger
    say(
        f"{time.monotonic() - run.started:5.0f} s: submitted {len(ledger.submitted)}, "
        f"settled {len(ledger.settled())}, workers up {run.fleet.up()}/{run.options.workers}, "
        f"faults {sum(run.injector.counts.values())}, "
        f"aws faults {sum(run.proxy.faults.values())}/{run.proxy.calls} calls"
    )


async def _let_queue_empty(run: Run) -> int:
    """Give late redeliveries (a lost delete, an expired visibility) time to be processed; the
    number of messages still in the job queue after that."""
    options = run.options
    longest_backoff = RETRY_BACKOFF_S * 2 ** (options.max_attempts - 1)
    wait_s = 2 * options.visibility + longest_backoff + 10
    say(f"all jobs settled or out of time; letting the job queue empty (at most {wait_s} s)")
    url, sqs = run.resources.queue_url, run.clients.sqs
    left = 0
    until = time.monotonic() + wait_s
    while time.monotonic() < until:
        left = await _depth(sqs, url, ALL_MESSAGES)
        if left == 0:
            break
        await asyncio.sleep(0.5)
    return left


# the report ------------------------------------------------------------------------------------


def outcomes(ledger: Ledger) -> dict[str, Any]:
    """Succeeded, failed (terminal), lost, and the anomalies around them."""
    submitted = set(ledger.submitted)
    succeeded = {b["id"] for b in ledger.finals if b["status"] == "succeeded"} & submitted
    announced = {b["id"] for b in ledger.finals if b["status"] == "failed"} & submitted
    in_dlq = {dead["id"] for dead in ledger.dead} & submitted
    failed = (announced | in_dlq) - succeeded
    lost = submitted - succeeded - failed
    per_job = Counter(body["id"] for body in ledger.finals)
    return {
        "submitted": len(submitted),
        "succeeded": len(succeeded),
        "failed": len(failed),
        "lost": len(lost),
        "duplicate_notifications": sum(count - 1 for count in per_job.values()),
        "duplicate_notification_ids": sorted(job for job, n in per_job.items() if n > 1)[:20],
        **_listed("failed_not_in_dlq", announced - succeeded - in_dlq),
        **_listed("dead_lettered_unannounced", in_dlq - announced - succeeded),
        **_listed("conflicting_outcomes", succeeded & (announced | in_dlq)),
        "dlq_messages": len(ledger.dead),
        "dlq_reasons": dict(Counter(_reason(dead["error"]) for dead in ledger.dead)),
        "lost_ids": sorted(lost)[:20],
    }


def _listed(name: str, jobs: set[str]) -> dict[str, Any]:
    """`name` with the number of `jobs`, and `name_ids` with the first 20 of them."""
    return {name: len(jobs), f"{name}_ids": sorted(jobs)[:20]}


def _reason(error: str | None) -> str:
    """`permanent`, `backend_unavailable`, ... from `code: message`; `redrive` if the worker
    gave none (SQS moved the message after maxReceiveCount receives)."""
    return error.split(":", 1)[0] if error else "redrive"


def generations(events: Path) -> dict[str, Any]:
    """Generation starts and completions per job, from the workers' event file."""
    lines = events.read_text().splitlines() if events.exists() else []
    by_job: dict[str, list[dict[str, Any]]] = {}
    for record in map(json.loads, lines):
        by_job.setdefault(record["job"], []).append(record)
    starts = {job: [r for r in rs if r["event"] == "start"] for job, rs in by_job.items()}
    completed = Counter(r["job"] for rs in by_job.values() for r in rs if r["event"] == "done")
    attempts = {job: [r["attempt"] for r in rs] for job, rs in starts.items() if rs}
    total = sum(len(seen) for seen in attempts.values())
    return {
        "duplicate_generations": sum(count - 1 for count in completed.values()),
        "duplicate_generation_ids": sorted(job for job, n in completed.items() if n > 1)[:20],
        "generation_starts": total,
        "reruns": total - len(attempts),
        "completed_generations": sum(completed.values()),
        # receives (SQS attempts) that never reached a backend, up to each job's last run
        "attempts_spent_unstarted": sum(max(seen) - len(set(seen)) for seen in attempts.values()),
        # a run that began while another run of the job was still generating: the message became
        # visible while a worker held it (its visibility was not extended in time)
        "overlapping_runs": sum(_overlaps(records) for records in by_job.values()),
        "backend_decisions": dict(Counter(r["decision"] for rs in starts.values() for r in rs)),
    }


def _overlaps(records: list[dict[str, Any]]) -> int:
    """How many runs of one job began while an earlier run was between its start and done."""
    done = {(r["worker"], r["attempt"]): r["t"] for r in records if r["event"] == "done"}
    runs = [
        (r["t"], done.get((r["worker"], r["attempt"]))) for r in records if r["event"] == "start"
    ]
    return sum(
        1
        for began, ended in runs
        for other, _ in runs
        if ended is not None and began < other < ended
    )


def handbacks(fleet: Fleet) -> dict[str, Any]:
    """From each SIGTERM or Spot notice to the worker's "worker stopped" log line (its drain is
    over: every held message deleted or handed back), overall and per kind."""
    stops = [r for worker in fleet.incarnations if (r := worker.handback()) is not None]
    records = [r for r in stops if not r["preempted"]]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_kind.setdefault(record["kind"], []).append(record)
    overruns = [r for r in records if _overran(r, fleet.options)]
    return {
        **_spread("handback", [r["handback_s"] for r in records]),
        "handbacks": len(records),
        "stops_preempted": len(stops) - len(records),
        "handbacks_unmeasured": sum(1 for r in records if r["handback_s"] is None),
        "handback_by_kind": {
            kind: _spread("handback", [r["handback_s"] for r in group])
            for kind, group in sorted(by_kind.items())
        },
        **_spread("reaction", [r["reaction_s"] for r in records]),
        **_spread("exit", [r["exit_s"] for r in records]),
        "deadline_overruns": overruns,
    }


def _spread(name: str, values: list[float | None]) -> dict[str, float | None]:
    measured = [value for value in values if value is not None]
    return {
        f"{name}_max_s": round(max(measured), 3) if measured else None,
        f"{name}_p50_s": round(statistics.median(measured), 3) if measured else None,
    }


def _overran(record: dict[str, Any], options: Options) -> bool:
    """Whether a worker took longer than its deadline plus the backend grace and some slack."""
    took = record["handback_s"] if record["handback_s"] is not None else record["exit_s"]
    allowed = record["allowed_s"] + options.backend_grace + OVERRUN_SLACK_S
    return took is None or took > allowed


async def missing_outputs(s3: S3Client, finals: list[dict[str, Any]]) -> list[str]:
    """Succeeded jobs whose outputs or succeeded result.json are not in S3."""
    latest = {body["id"]: body for body in finals if body["status"] == "succeeded"}
    gate = asyncio.Semaphore(8)

    async def check(body: dict[str, Any]) -> str | None:
        async with gate:
            present = await _stored(s3, body)
        return None if present else str(body["id"])

    found = await asyncio.gather(*(check(body) for body in latest.values()))
    return sorted(job_id for job_id in found if job_id is not None)


async def _stored(s3: S3Client, body: dict[str, Any]) -> bool:
    uris = [output["uri"] for output in body.get("outputs", [])]
    for uri in uris:
        bucket, key = _split(uri)
        try:
            await s3.head_object(Bucket=bucket, Key=key)
        except ClientError:
            return False
    return bool(uris) and await _result_status(s3, body.get("result", "")) == "succeeded"


async def _result_status(s3: S3Client, uri: str) -> str | None:
    bucket, key = _split(uri)
    try:
        response = await s3.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as stream:
            status = json.loads(await stream.read()).get("status")
    except ClientError:
        return None
    return str(status)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


async def report(run: Run) -> dict[str, Any]:
    """The run's JSON: the headline fields first, then the detail behind them."""
    counted = outcomes(run.ledger)
    made = generations(run.events)
    faults = Counter({kind: 0 for kind in ALL_FAULTS if kind != OUTAGE or run.options.outage})
    faults.update({kind: n for kind, n in run.injector.counts.items() if kind != OUTAGE})
    faults.update(run.proxy.faults)
    decisions = made.pop("backend_decisions")
    faults.update({f"backend_{kind}": decisions.get(kind, 0) for kind in BACKEND_FAULTS})
    missing = await missing_outputs(run.clients.s3, run.ledger.finals)
    timing = handbacks(run.fleet)
    details = run.events.parent / "workers.json"
    lives = [worker.summary() for worker in run.fleet.incarnations]
    await asyncio.to_thread(details.write_text, json.dumps(lives, indent=1))
    return {
        "seed": run.options.seed,
        "workers": run.options.workers,
        "jobs": run.options.jobs,
        **{key: counted.pop(key) for key in ("submitted", "succeeded", "failed", "lost")},
        "duplicate_generations": made.pop("duplicate_generations"),
        "duplicate_notifications": counted.pop("duplicate_notifications"),
        "handback_max_s": timing.pop("handback_max_s"),
        "handback_p50_s": timing.pop("handback_p50_s"),
        "faults": dict(faults),
        "missing_outputs": len(missing),
        "missing_output_ids": missing[:20],
        **counted,
        **made,
        **timing,
        "notifications": dict(run.ledger.statuses),
        "exits": dict(run.fleet.exits),
        "workers_started": len(run.fleet.incarnations),
        "killed_at_drain": run.fleet.killed_at_drain,
        "worker_errors": dict(sum((w.errors for w in run.fleet.incarnations), Counter())),
        "non_json_stderr_lines": sum(w.other_lines for w in run.fleet.incarnations),
        "aws_calls": run.proxy.calls,
        "aws_calls_dropped": run.proxy.dropped,
        "aws_outages_at_s": [round(at - run.started, 1) for at in run.proxy.outages],
        "aws_faults_by_operation": dict(run.proxy.by_operation.most_common()),
        "finished_in_time": run.finished_in_time,
        "queue_left": run.queue_left,
        "elapsed_s": round(time.monotonic() - run.started, 1),
        "details": str(details),
        "options": asdict(run.options),
    }


async def chaos(options: Options) -> dict[str, Any]:
    """Start moto, the proxy and the fleet; run the scenario; return the report."""
    log_dir = Path(options.log_dir)
    server = LocalAws()
    server.use()
    try:
        async with aws_clients() as clients:
            return await _with_proxy(options, clients, server.endpoint, log_dir)
    finally:
        server.stop()


async def _with_proxy(
    options: Options, clients: AwsClients, endpoint: str, log_dir: Path
) -> dict[str, Any]:
    resources = await create_resources(
        clients,
        endpoint,
        name="chaos",
        visibility_timeout=options.visibility,
        max_receive_count=options.max_receive_count,
    )
    proxy = FaultyProxy(endpoint, random.Random(f"{options.seed}-aws"), options.aws_fault_rate)
    await proxy.start()
    events = log_dir / "generations.jsonl"
    events.unlink(missing_ok=True)
    fleet = Fleet(options, worker_environment(options, resources, proxy.endpoint, events), log_dir)
    injector = FaultInjector(fleet, proxy, options)
    run = Run(options, clients, resources, proxy, fleet, injector, events)
    try:
        await scenario(run)
        return await report(run)
    finally:
        await fleet.drain(within_s=5)
        await proxy.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chaos scenario; print the JSON report as the last line; 1 if a job was lost."""
    options = parse_options(argv)
    log_dir = Path(options.log_dir or tempfile.mkdtemp(prefix="sdworker-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    say(f"worker logs in {log_dir}")
    options = replace(options, log_dir=str(log_dir))
    result = asyncio.run(chaos(options))
    print(json.dumps(result), flush=True)
    return 1 if result["lost"] or result["missing_outputs"] else 0


if __name__ == "__main__":
    sys.exit(main())
