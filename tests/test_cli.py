"""The `sdworker` command line as a user runs it: real processes against the emulated AWS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.core import TyperGroup
from typer.main import get_command
from typer.testing import CliRunner

from sdworker.aws import AwsClients
from sdworker.cli import app
from sdworker.errors import ConfigError
from sdworker.local import LocalResources
from sdworker.plugins import backend_specs
from sdworker.settings import load_settings

COMMANDS = ("run", "dev", "submit", "demo", "plugins", "check")
# Settings a test's environment must not inherit from the shell or from another test.
_OWN_PREFIXES = ("SDWORKER_", "AWS_", "SQS_", "SNS_", "S3_", "COLUMNS")
_ALIASES = ("RUNTIME_TYPE", "RUNTIME_NAME", "API_BASE_URL", "DYNAMIC_SD_MODEL", "LOGLEVEL")
_EXPORT = re.compile(r"^\s*export (\w+)=(\S+)$")

Process = asyncio.subprocess.Process


@dataclass(frozen=True)
class Ran:
    """What a finished `sdworker` process left behind."""

    code: int
    stdout: str
    stderr: str


def clean_env(*sources: dict[str, str], **extra: str) -> dict[str, str]:
    """This process's environment without any sdworker/AWS settings, then `sources` and `extra`."""
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_OWN_PREFIXES) and key not in _ALIASES
    }
    for source in sources:
        base.update(source)
    base.update(extra)
    return {"COLUMNS": "200", **base}


async def sdworker(*args: str, env: dict[str, str], within_s: float = 60) -> Ran:
    """Run `python -m sdworker ARGS` to the end and return its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdworker",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


async def receive(clients: AwsClients, queue_url: str, count: int) -> list[dict[str, Any]]:
    """Receive `count` messages from a queue (within 10 s) and return their parsed bodies."""
    bodies: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(bodies) < count:
        assert time.monotonic() < deadline, f"only {bodies} arrived"
        response = await clients.sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        bodies += [json.loads(message["Body"]) for message in response.get("Messages", [])]
    return bodies


async def queue_is_empty(clients: AwsClients, queue_url: str) -> bool:
    """True when a receive finds nothing on the queue."""
    response = await clients.sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0)
    return not response.get("Messages")


def table_row(stdout: str, first_cell: str) -> list[str]:
    """The cells of the rich table row that starts with `first_cell`."""
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row for {first_cell!r} in:\n{stdout}")


def params(*pairs: str) -> list[str]:
    """`--param name=value` flags, one per pair."""
    return [arg for pair in pairs for arg in ("--param", pair)]


def assert_png(path: Path, size: tuple[int, int]) -> None:
    """`path` is a PNG image of `size`."""
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", size)


@pytest.fixture
def env(resources: LocalResources) -> dict[str, str]:
    """The environment that points `sdworker` at the test's resources, placeholder backend."""
    return clean_env(resources.environment(), SDWORKER_BACKEND="placeholder")


# --- help ---------------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    """`sdworker --help` exits 0 and names every command."""
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}, prog_name="sdworker")
    assert result.exit_code == 0
    listed = re.findall(r"^│ (\w+) ", result.output, flags=re.MULTILINE)
    assert set(COMMANDS) <= set(listed)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_describes_its_options(command: str) -> None:
    """`sdworker COMMAND --help` exits 0 and shows every option with its description."""
    result = CliRunner().invoke(
        app, [command, "--help"], env={"COLUMNS": "200"}, prog_name="sdworker"
    )
    assert result.exit_code == 0
    assert f"Usage: sdworker {command}" in result.output
    group = get_command(app)
    assert isinstance(group, TyperGroup)
    for param in group.commands[command].params:
        assert param.opts[0] in result.output, param.opts[0]
        assert param.help, f"{param.opts[0]} has no help text"
        assert " ".join(param.help.split()[:3]) in result.output, param.help


# --- plugins ------------------------------------------------------------------------------------


async def test_plugins_lists_each_backend_with_its_tasks() -> None:
    """`sdworker plugins` shows the four backends, each with the tasks it declares."""
    ran = await sdworker("plugins", env=clean_env())
    assert ran.code == 0, ran.stderr
    declared = backend_specs()
    assert {"placeholder", "a1111", "comfyui", "diffusers"} <= set(declared)
    for name, spec in declared.items():
        assert "txt2img" in spec.tasks
        assert table_row(ran.stdout, name)[1] == ", ".join(sorted(spec.tasks))
    assert table_row(ran.stdout, "placeholder")[1] == "img2img, txt2img, upscale"


# --- check --------------------------------------------------------------------------------------


async def test_check_passes_against_reachable_resources(env: dict[str, str]) -> None:
    """With every resource reachable and the placeholder backend, check exits 0, all ok."""
    ran = await sdworker("check", env=env)
    assert ran.code == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    names = [line.split(":")[0].split(maxsplit=1)[1] for line in lines]
    assert names == [
        "settings",
        "queue",
        "dead-letter queue",
        "bucket",
        "topic",
        "backend placeholder",
    ]
    assert all(line.startswith("ok ") for line in lines), ran.stdout


async def test_check_names_a_queue_that_does_not_exist(
    env: dict[str, str], resources: LocalResources
) -> None:
    """A queue URL with no queue behind it fails the queue check, exit 1, naming the queue."""
    missing = f"{resources.endpoint}/123456789012/no-such-queue"
    ran = await sdworker("check", env={**env, "SDWORKER_QUEUE_URL": missing})
    assert ran.code == 1
    [queue_line] = [line for line in ran.stdout.splitlines() if re.match(r"\S+ +queue:", line)]
    assert queue_line.startswith("FAIL queue:") and "no-such-queue" in queue_line


async def test_check_fails_on_a_backend_that_cannot_start(env: dict[str, str]) -> None:
    """An a1111 backend with no Web UI behind it fails its check, and check exits 1."""
    backend = {"SDWORKER_BACKEND": "a1111", "SDWORKER_BACKEND_URL": "http://127.0.0.1:9"}
    ran = await sdworker("check", "--timeout", "1", env={**env, **backend})
    assert ran.code == 1
    last = ran.stdout.splitlines()[-1]
    assert last.startswith("FAIL backend a1111:"), ran.stdout
    assert all(line.startswith("ok ") for line in ran.stdout.splitlines()[:-1]), ran.stdout


async def test_check_without_a_queue_url_fails_on_settings() -> None:
    """Without a queue URL check stops at settings, names the variable and exits 1."""
    ran = await sdworker(
        "check", env=clean_env(SDWORKER_BUCKET="b", SDWORKER_BACKEND="placeholder")
    )
    assert ran.code == 1
    assert ran.stdout.splitlines() == [
        "FAIL settings: SDWORKER_QUEUE_URL is not set: set it to the URL of the job queue "
        "(alias SQS_QUEUE_URL)"
    ]


async def test_check_takes_flags_over_environment_over_config_file(
    resources: LocalResources, tmp_path: Path
) -> None:
    """Each setting comes from the file unless the environment sets it, unless a flag does."""
    config = tmp_path / "sdworker.toml"
    config.write_text(
        f'queue_url = "{resources.queue_url}"\n'
        'bucket = "file-bucket"\n'
        'topic_arn = "arn:aws:sns:us-east-1:123456789012:file-topic"\n'
    )
    environment = clean_env(
        resources.environment(),
        SDWORKER_BACKEND="placeholder",
        SDWORKER_TOPIC_ARN="arn:aws:sns:us-east-1:123456789012:env-topic",
    )
    del environment["SDWORKER_QUEUE_URL"]
    flag = f"topic_arn={resources.topic_arn}"
    ran = await sdworker("check", "--config", str(config), "--set", flag, env=environment)
    assert ran.code == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    assert f"ok   queue: {resources.queue_url}" in lines  # from the file
    assert f"ok   bucket: {resources.bucket}" in lines  # the environment beats the file
    assert f"ok   topic: {resources.topic_arn}" in lines  # the flag beats both


# --- submit -------------------------------------------------------------------------------------


async def test_submit_sends_a_native_v1_job(
    env: dict[str, str], clients: AwsClients, resources: LocalResources
) -> None:
    """`submit --prompt` puts one native version-1 txt2img job on the queue and prints its id."""
    ran = await sdworker("submit", "--prompt", "a red fox", env=env)
    assert ran.code == 0, ran.stderr
    [job] = await receive(clients, resources.queue_url, 1)
    assert ran.stdout.strip() == f"submitted 1 job(s): {job['id']}"
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", job["id"])
    assert job == {
        "version": 1,
        "id": job["id"],
        "task": "txt2img",
        "params": {"prompt": "a red fox"},
        "inputs": {},
    }


async def test_submit_params_are_parsed_as_json(
    env: dict[str, str], clients: AwsClients, resources: LocalResources
) -> None:
    """`--param steps=5 --param seed=3` arrive as integers, a plain word as a string."""
    args = ("--prompt", "x", *params("steps=5", "seed=3", "sampler=euler"))
    ran = await sdworker("submit", *args, env=env)
    assert ran.code == 0, ran.stderr
    [job] = await receive(clients, resources.queue_url, 1)
    assert job["params"] == {"prompt": "x", "steps": 5, "seed": 3, "sampler": "euler"}


async def test_submit_input_lands_in_inputs(
    env: dict[str, str], clients: AwsClients, resources: LocalResources
) -> None:
    """`--input image=s3://b/k` becomes the job's `inputs.image`."""
    args = ("--task", "img2img", "--prompt", "x", "--input", "image=s3://b/k")
    ran = await sdworker("submit", *args, env=env)
    assert ran.code == 0, ran.stderr
    [job] = await receive(clients, resources.queue_url, 1)
    assert (job["task"], job["inputs"]) == ("img2img", {"image": "s3://b/k"})


async def test_submit_file_with_a_list_sends_each_job(
    env: dict[str, str], clients: AwsClients, resources: LocalResources, tmp_path: Path
) -> None:
    """`--file` holding a list of two jobs sends both, unchanged."""
    jobs = [
        {"version": 1, "id": f"from-file-{n}", "task": "txt2img", "params": {"prompt": str(n)}}
        for n in range(2)
    ]
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    ran = await sdworker("submit", "--file", str(path), env=env)
    assert ran.code == 0, ran.stderr
    assert "submitted 2 job(s): from-file-0, from-file-1" in ran.stdout
    received = await receive(clients, resources.queue_url, 2)
    assert sorted(received, key=lambda job: job["id"]) == jobs


async def test_submit_count_numbers_the_copies(
    env: dict[str, str], clients: AwsClients, resources: LocalResources
) -> None:
    """`--count 3` sends three copies whose ids end in -0, -1 and -2."""
    ran = await sdworker("submit", "--prompt", "x", "--id", "batch", "--count", "3", env=env)
    assert ran.code == 0, ran.stderr
    received = await receive(clients, resources.queue_url, 3)
    assert sorted(job["id"] for job in received) == ["batch-0", "batch-1", "batch-2"]
    assert await queue_is_empty(clients, resources.queue_url)


async def test_submit_rejects_a_param_without_equals_in_one_line() -> None:
    """A `--param` without '=' exits 2 with one line saying how to write it."""
    environment = clean_env(SDWORKER_QUEUE_URL="http://127.0.0.1:9/123456789012/jobs")
    ran = await sdworker("submit", "--prompt", "x", "--param", "steps", env=environment)
    assert ran.code == 2
    assert ran.stderr.strip().splitlines() == ["error: --param 'steps': write it as name=value"]


async def test_submit_topic_publishes_to_the_topic_instead(
    env: dict[str, str], clients: AwsClients, resources: LocalResources
) -> None:
    """`--topic ARN` publishes the job to that topic (reaching its subscribers), not the queue."""
    topic_arn = (await clients.sns.create_topic(Name="cli-input"))["TopicArn"]
    inbox_url = (await clients.sqs.create_queue(QueueName="cli-input-inbox"))["QueueUrl"]
    inbox = await clients.sqs.get_queue_attributes(QueueUrl=inbox_url, AttributeNames=["QueueArn"])
    await clients.sns.subscribe(
        TopicArn=topic_arn, Protocol="sqs", Endpoint=inbox["Attributes"]["QueueArn"]
    )
    ran = await sdworker(
        "submit", "--prompt", "x", "--id", "via-topic", "--topic", topic_arn, env=env
    )
    assert ran.code == 0, ran.stderr
    [envelope] = await receive(clients, inbox_url, 1)
    assert envelope["Type"] == "Notification" and envelope["TopicArn"] == topic_arn
    assert json.loads(envelope["Message"])["id"] == "via-topic"
    assert await queue_is_empty(clients, resources.queue_url)


# --- submit --wait against a running worker ------------------------------------------------------


@pytest.fixture
async def worker(env: dict[str, str], tmp_path: Path) -> AsyncIterator[Process]:
    """An `sdworker run` process on the test's resources; SIGTERM at the end must exit it 0."""
    with (tmp_path / "worker.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdworker",
            "run",
            env={
                **env,
                "SDWORKER_RECEIVE_WAIT": "1",
                "SDWORKER_PROGRESS_INTERVAL": "0.1",
                "SDWORKER_PLACEHOLDER_STEP_SECONDS": "0.02",
            },
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    assert code == 0, (tmp_path / "worker.log").read_text()


WAIT_ARGS = ("--prompt", "fox", *params("width=64", "height=64", "steps=10"))


async def test_submit_wait_follows_the_job_and_downloads_its_image(
    worker: Process, env: dict[str, str], tmp_path: Path
) -> None:
    """With the results queue, `submit --wait` prints succeeded and saves <out>/<id>/0.png."""
    out = tmp_path / "out"
    ran = await sdworker(
        "submit", *WAIT_ARGS, "--id", "fox-q", "--wait", "--out", str(out), env=env
    )
    assert ran.code == 0, ran.stdout + ran.stderr
    assert table_row(ran.stdout, "fox-q")[1] == "succeeded"
    assert_png(out / "fox-q" / "0.png", (64, 64))


async def test_submit_wait_without_a_results_queue_polls_the_result(
    worker: Process, env: dict[str, str], tmp_path: Path
) -> None:
    """Without a results queue, `submit --wait` finds result.json in S3 and still downloads."""
    del env["SDWORKER_RESULTS_QUEUE_URL"]
    out = tmp_path / "out"
    ran = await sdworker(
        "submit", *WAIT_ARGS, "--id", "fox-s3", "--wait", "--out", str(out), env=env
    )
    assert ran.code == 0, ran.stdout + ran.stderr
    assert table_row(ran.stdout, "fox-s3")[1] == "succeeded"
    assert_png(out / "fox-s3" / "0.png", (64, 64))


# --- dev and demo -------------------------------------------------------------------------------


async def read_exports(process: Process, within_s: float = 30) -> dict[str, str]:
    """Read `dev`'s stdout up to the `then:` line; return the variables it says to export."""
    assert process.stdout is not None
    exports: dict[str, str] = {}
    deadline = time.monotonic() + within_s
    while True:
        raw = await asyncio.wait_for(process.stdout.readline(), deadline - time.monotonic())
        assert raw, f"dev ended before printing its exports; got {exports}"
        line = raw.decode().rstrip("\n")
        if line.startswith("then:"):
            return exports
        if "export" in line:
            match = _EXPORT.match(line)
            assert match, f"not a complete `export NAME=value` line: {line!r}"
            exports[match[1]] = match[2]


async def test_dev_prints_working_exports_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """`dev` prints exports with which `submit --wait` succeeds, and Ctrl-C ends it with 0."""
    log = (tmp_path / "dev.log").open("wb")
    dev_env = {**clean_env(), "COLUMNS": "80"}  # what a pipe or a narrow terminal gets
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sdworker", "dev", "--port", "0",
        env=dev_env, stdout=asyncio.subprocess.PIPE, stderr=log,
    )  # fmt: skip
    try:
        exports = await read_exports(process)
        assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert {
            "SDWORKER_QUEUE_URL",
            "SDWORKER_BUCKET",
            "SDWORKER_TOPIC_ARN",
            "SDWORKER_RESULTS_QUEUE_URL",
        } <= set(exports)
        out = tmp_path / "out"
        args = ("--prompt", "x", *params("width=64", "height=64", "steps=2"))
        ran = await sdworker(
            "submit", *args, "--id", "dev-job", "--wait", "--out", str(out), env=clean_env(exports)
        )
        assert ran.code == 0, ran.stdout + ran.stderr
        assert_png(out / "dev-job" / "0.png", (64, 64))
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 5) == 0, (tmp_path / "dev.log").read_text()
    finally:
        log.close()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_demo_runs_its_jobs_end_to_end(tmp_path: Path) -> None:
    """`demo` saves every output, fails only its invalid job on purpose, and exits 0."""
    out = tmp_path / "demo"
    args = ("--backend", "placeholder", "--out", str(out))  # the diffusers run is its own test
    ran = await sdworker("demo", *args, env={**clean_env(), "COLUMNS": "200"})
    assert ran.code == 0, ran.stdout + ran.stderr
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*.png")) == [
        "demo-batch/0.png",
        "demo-batch/1.png",
        "demo-img2img/0.png",
        "demo-txt2img/0.png",
    ]
    assert "3 of 4 jobs succeeded (demo-invalid is meant to fail)" in ran.stdout
    assert "params.steps" in ran.stdout


# --- run: settings ------------------------------------------------------------------------------


async def test_run_rejects_a_bad_setting_in_one_line() -> None:
    """`SDWORKER_PREFETCH=abc` stops `run` with exit 2 and one line naming the variable."""
    environment = clean_env(
        SDWORKER_QUEUE_URL="http://127.0.0.1:9/123456789012/jobs",
        SDWORKER_BUCKET="b",
        SDWORKER_BACKEND="placeholder",
        SDWORKER_PREFETCH="abc",
    )
    ran = await sdworker("run", env=environment)
    assert ran.code == 2
    [line] = ran.stderr.strip().splitlines()
    assert line.startswith("error: SDWORKER_PREFETCH:") and "'abc'" in line


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A TOML settings file named by SDWORKER_CONFIG, in an environment with no other settings."""
    for name in list(os.environ):
        if name.startswith(("SDWORKER_", "SQS_", "S3_")):
            monkeypatch.delenv(name)
    path = tmp_path / "sdworker.toml"
    path.write_text('queue_url = "https://file/queue"\nbucket = "file-bucket"\n')
    monkeypatch.setenv("SDWORKER_CONFIG", str(path))
    return path


def test_config_file_supplies_settings(config_file: Path) -> None:
    """With nothing else set, the values come from the TOML file."""
    settings = load_settings()
    assert (settings.queue_url, settings.bucket) == ("https://file/queue", "file-bucket")


def test_environment_beats_config_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment variable overrides the file for its setting only."""
    monkeypatch.setenv("SDWORKER_BUCKET", "env-bucket")
    settings = load_settings()
    assert (settings.queue_url, settings.bucket) == ("https://file/queue", "env-bucket")


def test_flag_beats_environment(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag overrides both the environment and the file."""
    monkeypatch.setenv("SDWORKER_BUCKET", "env-bucket")
    settings = load_settings(bucket="flag-bucket", queue_url=None)
    assert (settings.queue_url, settings.bucket) == ("https://file/queue", "flag-bucket")


def test_missing_config_file_is_one_line_error(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDWORKER_CONFIG naming no file is a ConfigError that names the variable."""
    monkeypatch.setenv("SDWORKER_CONFIG", str(config_file.with_name("missing.toml")))
    with pytest.raises(ConfigError, match=r"^SDWORKER_CONFIG: no such file"):
        load_settings()
