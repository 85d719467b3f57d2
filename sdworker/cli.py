"""The `sdworker` command line."""

from __future__ import annotations

import asyncio
import difflib
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from sdworker.errors import ConfigError
from sdworker.logs import configure_logging
from sdworker.settings import Settings, load_settings

app = typer.Typer(
    help="sdworker: take image-generation jobs from SQS, run them on a backend, "
    "write outputs to S3 and announce results on SNS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
T = TypeVar("T")

QueueUrl = Annotated[str | None, typer.Option(help="Job queue URL [SDWORKER_QUEUE_URL].")]
Bucket = Annotated[str | None, typer.Option(help="Output bucket [SDWORKER_BUCKET].")]
TopicArn = Annotated[str | None, typer.Option(help="Result topic ARN [SDWORKER_TOPIC_ARN].")]
BackendName = Annotated[str | None, typer.Option(help="Backend plugin [SDWORKER_BACKEND].")]
BackendUrl = Annotated[str | None, typer.Option(help="Backend URL [SDWORKER_BACKEND_URL].")]
Concurrency = Annotated[
    int | None, typer.Option(help="Jobs at once (default: the backend's capacity).")
]
Prefetch = Annotated[int | None, typer.Option(help="Messages received ahead of time (default 1).")]
LogFormat = Annotated[str | None, typer.Option(help="json or console [SDWORKER_LOG_FORMAT].")]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any other setting as name=value, e.g. --set max_attempts=5."),
]
Config = Annotated[
    Path | None, typer.Option(help="TOML settings file [SDWORKER_CONFIG].", exists=True)
]


def _settings(config: Path | None, sets: list[str] | None, **flags: Any) -> Settings:
    """Settings from flags, `--set`, the environment and the TOML file, in that order."""
    if config:
        os.environ["SDWORKER_CONFIG"] = str(config)
    given = {name: value for name, value in flags.items() if value is not None}
    return load_settings(**{**parse_sets(sets), **given})


def parse_sets(sets: list[str] | None) -> dict[str, str]:
    """`--set name=value` pairs, refusing malformed items and names that are no setting."""
    pairs: dict[str, str] = {}
    for item in sets or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: write it as name=value, e.g. --set max_attempts=5")
        if name not in Settings.model_fields:
            close = difflib.get_close_matches(name, Settings.model_fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see docs/configuration.md"
            raise ConfigError(f"--set {name}: no such setting{hint}")
        pairs[name] = value
    return pairs


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; a `ConfigError` ends the program with its one-line message."""
    try:
        return asyncio.run(coroutine)
    except ConfigError as error:
        coroutine.close()
        typer.secho(f"error: {error}", err=True, fg="red")
        raise typer.Exit(2) from None


@app.command()
def run(
    queue_url: QueueUrl = None,
    bucket: Bucket = None,
    topic_arn: TopicArn = None,
    backend: BackendName = None,
    backend_url: BackendUrl = None,
    concurrency: Concurrency = None,
    prefetch: Prefetch = None,
    log_format: LogFormat = None,
    config: Config = None,
    sets: Sets = None,
) -> None:
    """Run the worker daemon until SIGTERM or Ctrl-C (a second signal hands back everything)."""
    from sdworker.app import run_worker

    settings = _guarded(
        lambda: _settings(
            config,
            sets,
            queue_url=queue_url,
            bucket=bucket,
            topic_arn=topic_arn,
            backend=backend,
            backend_url=backend_url,
            concurrency=concurrency,
            prefetch=prefetch,
            log_format=log_format,
        )
    )
    configure_logging(settings.log_format, settings.log_level)
    code = _run(run_worker(settings))
    if code:
        raise typer.Exit(code)


@app.command()
def dev(
    backend: Annotated[str, typer.Option(help="Backend plugin to run.")] = "placeholder",
    port: Annotated[int, typer.Option(help="Port of the local AWS emulator (0: any).")] = 4566,
    backend_url: BackendUrl = None,
    sets: Sets = None,
) -> None:
    """Local mode: start an AWS emulator on 127.0.0.1 with queue, DLQ, bucket and topics, then
    the worker against it. Prints the variables that `sdworker submit` and AWS clients need."""
    from sdworker.local_mode import run_dev

    extra = _guarded(lambda: parse_sets(sets))
    configure_logging("console", "info")
    _run(run_dev(port, {"backend": backend, "backend_url": backend_url, **extra}))


@app.command()
def demo(
    backend: Annotated[str, typer.Option(help="Backend plugin to run.")] = "diffusers",
    model: Annotated[
        str | None,
        typer.Option(help="diffusers model directory or .safetensors (default: the tiny model)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the outputs.")] = Path("demo-output"),
) -> None:
    """The main job end to end on this machine, no AWS account or GPU needed: local AWS, a
    worker, txt2img, a batch, an invalid job and an img2img from the first output, with live
    progress, outputs saved to a folder, a summary table and the notifications received."""
    from sdworker import cli_output  # rich: only for the commands that print with it
    from sdworker.demo import run_demo

    if model:
        os.environ["SDWORKER_DIFFUSERS_MODEL"] = model
    configure_logging("console", "critical")  # the table tells what happened
    with cli_output.JobProgress() as bars:
        results = _run(run_demo(backend, out, bars.update))
    cli_output.print_demo(results)
    succeeded = sum(r.body.get("status") == "succeeded" for r in results)
    cli_output.console.print(
        f"{succeeded} of {len(results)} jobs succeeded (demo-invalid is meant to fail); "
        f"outputs in {out}/"
    )
    if succeeded != len(results) - 1:
        raise typer.Exit(1)


@app.command()
def submit(
    prompt: Annotated[str | None, typer.Option(help="Prompt of a txt2img/img2img job.")] = None,
    task: Annotated[
        str, typer.Option(help="txt2img, img2img, inpaint, upscale, workflow.")
    ] = "txt2img",
    job_id: Annotated[str | None, typer.Option("--id", help="Job id (default: a new one).")] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="A param as name=value (JSON values).")
    ] = None,
    input_: Annotated[
        list[str] | None, typer.Option("--input", help="An input as name=uri.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option(help="JSON file with a job or a list of jobs.", exists=True)
    ] = None,
    count: Annotated[
        int, typer.Option(help="Submit this many copies (ids get -0, -1, ...).", min=1)
    ] = 1,
    topic: Annotated[
        str | None, typer.Option(help="Publish to this input topic instead of the queue.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow progress, print results, download outputs.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Where --wait saves outputs.")] = Path(
        "sdworker-output"
    ),
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits for results.")] = 600,
    results_queue: Annotated[
        str | None,
        typer.Option(
            envvar="SDWORKER_RESULTS_QUEUE_URL",
            help="Queue subscribed to the result topic, for live progress with --wait.",
        ),
    ] = None,
) -> None:
    """Send jobs to the queue (or an input topic); with --wait, show progress and fetch outputs."""
    from sdworker.submit import SubmitOptions, submit_jobs

    settings = _guarded(load_settings)
    jobs = _guarded(
        lambda: _jobs(
            file=file,
            prompt=prompt,
            task=task,
            job_id=job_id,
            params=param,
            inputs=input_,
            count=count,
        )
    )
    options = SubmitOptions(topic, wait, out, timeout, results_queue)
    if not _run(submit_jobs(settings, jobs, options)):
        raise typer.Exit(1)


def _jobs(
    *,
    file: Path | None,
    prompt: str | None,
    task: str,
    job_id: str | None,
    params: list[str] | None,
    inputs: list[str] | None,
    count: int,
) -> list[dict[str, Any]]:
    from sdworker.submit import jobs_from_file, jobs_from_flags

    if file:
        return jobs_from_file(file)
    return jobs_from_flags(
        prompt, task, job_id=job_id, params=params or [], inputs=inputs or [], count=count
    )


@app.command()
def plugins() -> None:
    """List installed backends (with their tasks) and plugins (with versions and hooks)."""
    from sdworker import cli_output
    from sdworker.plugins import backend_specs, loaded_plugins

    specs = _guarded(backend_specs)
    cli_output.print_plugins(specs.values(), loaded_plugins())


@app.command()
def check(
    backend: Annotated[bool, typer.Option(help="Also start the backend and wait for it.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the backend.")] = 30,
    probe: Annotated[
        str | None,
        typer.Option(
            help="Only ask the running worker's health server: healthz (alive) or readyz "
            "(taking work); exit 0 or 1, for exec probes (at most 5 s).",
        ),
    ] = None,
    config: Config = None,
    sets: Sets = None,
) -> None:
    """Pre-flight: settings valid, queue/DLQ/bucket/topic reachable, backend ready. Exit 0 or 1."""
    from sdworker import cli_output
    from sdworker.check import run_checks

    settings = _guarded(lambda: _settings(config, sets))
    if probe is not None:
        _probe(settings, probe, min(timeout, 5.0))
        return
    configure_logging(settings.log_format, "warning")
    results = _run(run_checks(settings, backend=backend, timeout_s=timeout))
    cli_output.print_check(results)
    if not all(ok for _, ok, _ in results):
        raise typer.Exit(1)


def _probe(settings: Settings, name: str, timeout_s: float) -> None:
    """Ask the health server on this machine; exit 1 unless it answers 200."""
    from sdworker.health import PROBES, probe, probe_url

    if name not in PROBES:
        _stop(f"--probe {name}: use healthz or readyz")
    if not settings.health_port:
        _stop("SDWORKER_HEALTH_PORT is 0: the health server is off; set the worker's port")
    ok, detail = probe(probe_url(settings.health_host, settings.health_port, name), timeout_s)
    typer.echo(f"{'ok' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        raise typer.Exit(1)


def _stop(message: str) -> NoReturn:
    """End the program with a one-line usage or settings error, exit code 2."""
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(2)


def _guarded(build: Callable[[], T]) -> T:
    """Call `build`; a `ConfigError` ends the program with its one-line message."""
    try:
        return build()
    except ConfigError as error:
        typer.secho(f"error: {error}", err=True, fg="red")
        raise typer.Exit(2) from None


def main() -> None:
    """Entry point of the `sdworker` script: plugins add their commands, then it runs."""
    from sdworker.plugins import plugin_manager

    try:
        plugin_manager().hook.register_commands(cli=app)
    except Exception as error:  # a broken plugin must not take the whole command line down
        typer.secho(f"warning: a plugin failed to load: {error!r}", err=True, fg="yellow")
    app()
