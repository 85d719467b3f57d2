"""`sdworker submit`: build jobs from flags or a file, send them, optionally follow them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdworker.aws import AwsClients, aws_clients
from sdworker.cli_output import JobProgress, console, print_results
from sdworker.client import Follower, download, new_job, output_uris, send_jobs
from sdworker.errors import ConfigError
from sdworker.settings import Settings
from sdworker.telemetry import exporter_names, tracer_provider


@dataclass(frozen=True)
class SubmitOptions:
    """How to send and whether to follow."""

    topic_arn: str | None
    wait: bool
    out: Path
    timeout_s: float
    results_queue_url: str | None


def jobs_from_flags(
    prompt: str | None,
    task: str,
    *,
    job_id: str | None,
    params: list[str],
    inputs: list[str],
    count: int,
) -> list[dict[str, Any]]:
    """Jobs built from `--prompt`, `--param name=value` and `--input name=uri`."""
    values = {"prompt": prompt or "", **dict(_pair("--param", item, parse=True) for item in params)}
    files = dict(_pair("--input", item) for item in inputs)
    base = new_job(task, job_id, params=values, inputs=files)
    if count == 1:
        return [base]
    return [{**base, "id": f"{base['id']}-{n}"} for n in range(count)]


def _pair(flag: str, item: str, *, parse: bool = False) -> tuple[str, Any]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise ConfigError(f"{flag} {item!r}: write it as name=value")
    if not parse:
        return name, value
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


async def _send_traced(
    settings: Settings, clients: AwsClients, jobs: list[dict[str, Any]], topic_arn: str | None
) -> tuple[list[str], str | None]:
    """Send the jobs in one new trace; return their ids, and the trace id if it is exported
    (OTEL_*): the worker continues the trace either way."""
    provider = tracer_provider(settings, always=True)
    assert provider is not None
    tracer = provider.get_tracer("sdworker.submit")
    try:
        with tracer.start_as_current_span("sdworker submit") as span:
            queue_url = settings.queue_url
            ids = await send_jobs(
                clients, jobs, queue_url=queue_url, topic_arn=topic_arn, tracer=tracer
            )
        exported = bool(exporter_names("traces"))
        return ids, format(span.get_span_context().trace_id, "032x") if exported else None
    finally:
        provider.shutdown()


def jobs_from_file(path: Path) -> list[dict[str, Any]]:
    """A job, or a list of jobs, from a JSON file."""
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"--file {path}: not JSON ({error})") from None
    jobs = loaded if isinstance(loaded, list) else [loaded]
    if not all(isinstance(job, dict) for job in jobs):
        raise ConfigError(f"--file {path}: expected a job object or a list of job objects")
    return jobs


async def submit_jobs(
    settings: Settings, jobs: list[dict[str, Any]], options: SubmitOptions
) -> bool:
    """Send the jobs; with `wait`, follow them and download outputs. True if none failed."""
    if not options.topic_arn:
        settings.require("queue_url")
    async with aws_clients() as clients:
        ids, trace_id = await _send_traced(settings, clients, jobs, options.topic_arn)
        traced = f" (trace {trace_id})" if trace_id else ""
        console.print(f"submitted {len(ids)} job(s): {', '.join(ids)}{traced}")
        if not options.wait:
            return True
        settings.require("bucket")
        assert settings.bucket is not None
        with JobProgress(ids) as bars:
            follower = Follower(
                clients, settings.bucket, settings.prefix, options.results_queue_url, bars.update
            )
            bodies = await follower.wait(ids, options.timeout_s)
        files = {
            job_id: [str(path) for path in await download(clients, output_uris(body), options.out)]
            for job_id, body in bodies.items()
        }
    print_results(bodies.values(), files)
    return all(body.get("status") in ("succeeded", "completed") for body in bodies.values())
