"""The plugin manager: entry-point discovery, the built-in backends, tracing and every hook."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pluggy
import pytest

from sdworker import hookspecs
from sdworker.backend import BackendResult, BackendSpec, JobRequest, Output
from sdworker.errors import ConfigError
from sdworker.hookspecs import hookimpl
from sdworker.plugins import TRACE_ENV, backend_specs, find_backend, make_plugin_manager
from sdworker.settings import Settings
from sdworker.testing import FakeBackend

BUILT_IN = {"placeholder", "a1111", "comfyui", "diffusers"}
EXAMPLE_PLUGIN = Path(__file__).parent / "example_plugin"


class _Stamp:
    """A plugin implementing the per-job hooks: it marks requests and results it sees."""

    def __init__(self) -> None:
        self.finished: list[dict[str, Any]] = []

    @hookimpl
    def register_backends(self) -> list[BackendSpec]:
        """Offer a fake backend called `stamp`."""
        return [FakeBackend(name="stamp").spec()]

    @hookimpl
    def prepare_job(self, request: JobRequest) -> JobRequest:
        """Add a parameter."""
        return replace(request, params={**request.params, "stamped": True})

    @hookimpl
    def process_outputs(self, request: JobRequest, result: BackendResult) -> BackendResult:
        """Add an info entry."""
        return replace(result, info={**result.info, "stamped": request.id})

    @hookimpl
    def job_finished(self, notification: dict[str, Any]) -> Awaitable[None]:
        """Record the notification, asynchronously."""

        async def record() -> None:
            self.finished.append(notification)

        return record()


@pytest.fixture
def stamped() -> tuple[pluggy.PluginManager, _Stamp]:
    """A manager without entry points, holding only the stamp plugin."""
    manager = make_plugin_manager(load_entry_points=False)
    plugin = _Stamp()
    manager.register(plugin, name="stamp")
    return manager, plugin


def test_the_built_in_backends_are_discovered() -> None:
    """placeholder, a1111, comfyui and diffusers come in through the entry points."""
    assert set(backend_specs(make_plugin_manager())) >= BUILT_IN


def test_no_backend_is_known_without_entry_points() -> None:
    """The built-in backends are plugins like any other: none without entry points."""
    assert backend_specs(make_plugin_manager(load_entry_points=False)) == {}


@pytest.mark.parametrize(
    ("name", "tasks", "built"),
    [
        ("placeholder", {"txt2img", "img2img", "upscale"}, None),
        ("a1111", {"txt2img", "img2img", "inpaint", "upscale"}, None),
        ("comfyui", {"workflow", "txt2img", "img2img", "inpaint"}, None),
        # upscale only once SDWORKER_DIFFUSERS_UPSCALER names an upscaler
        (
            "diffusers",
            {"txt2img", "img2img", "inpaint", "upscale"},
            {"txt2img", "img2img", "inpaint"},
        ),
    ],
)
def test_each_built_in_backend_declares_its_tasks(
    name: str, tasks: set[str], built: set[str] | None
) -> None:
    """Each built-in spec, and the backend it builds by default, declare the expected tasks."""
    spec = find_backend(name, make_plugin_manager())
    assert spec.tasks == tasks
    assert spec.factory(Settings()).tasks == (built or tasks)


def test_an_unknown_backend_lists_the_installed_ones() -> None:
    """find_backend on an unknown name raises a ConfigError naming the installed backends."""
    with pytest.raises(ConfigError, match=r"SDWORKER_BACKEND.*'nope'.*a1111.*placeholder"):
        find_backend("nope", make_plugin_manager())


def test_the_backend_plugins_import_nothing_heavy() -> None:
    """Loading every plugin imports neither torch nor diffusers, nor any backend's own code: a
    worker loads only the backend it runs."""
    script = (
        "import sys; from sdworker.plugins import backend_specs; backend_specs(); "
        "heavy = {'torch', 'diffusers', 'transformers'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy "
        "or m.endswith('.backend') and m != 'sdworker.backend'))"
    )
    assert _python_prints(script) == "[]"


def test_the_daemon_leaves_out_what_it_does_not_use() -> None:
    """structlog is loaded without rich (it would import it, and pygments, for tracebacks our log
    chain never asks it to render), rich stays importable for the CLI, and the health server
    needs no aiohttp server: memory the footprint benchmark counts (docs/performance.md)."""
    script = (
        "import sys, sdworker.cli, sdworker.app, structlog.dev; "  # the daemon's order
        "from sdworker.health import HealthServer, Watchdog; "
        "HealthServer(Watchdog(), None, host='127.0.0.1', port=0).start(); "
        "print(structlog.dev.rich is None, 'aiohttp.web' in sys.modules); "
        "import rich.progress"
    )
    assert _python_prints(script) == "True False"


def test_hook_calls_are_traced_to_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With SDWORKER_TRACE_PLUGINS set, each hook call is written to stderr."""
    monkeypatch.setenv(TRACE_ENV, "1")
    manager = make_plugin_manager(load_entry_points=False)
    manager.register(_Stamp(), name="stamp")
    manager.hook.register_backends()
    assert "register_backends" in capsys.readouterr().err


def test_hook_register_backends_offers_a_plugins_backends(
    stamped: tuple[pluggy.PluginManager, _Stamp],
) -> None:
    """A plugin's register_backends result shows up in backend_specs."""
    manager, _ = stamped
    assert list(backend_specs(manager)) == ["stamp"]


def test_hook_register_backends_refuses_a_name_offered_twice(
    stamped: tuple[pluggy.PluginManager, _Stamp],
) -> None:
    """Two plugins offering one backend name is a ConfigError naming it."""
    manager, _ = stamped
    manager.register(_Stamp(), name="stamp-again")
    with pytest.raises(ConfigError, match="'stamp'"):
        backend_specs(manager)


def test_hook_prepare_job_can_change_the_request(
    stamped: tuple[pluggy.PluginManager, _Stamp],
) -> None:
    """prepare_job returns the changed request."""
    manager, _ = stamped
    [changed] = manager.hook.prepare_job(request=JobRequest(id="j", task="txt2img"))
    assert changed.params == {"stamped": True}


def test_hook_process_outputs_can_change_the_result(
    stamped: tuple[pluggy.PluginManager, _Stamp],
) -> None:
    """process_outputs returns the changed result."""
    manager, _ = stamped
    result = BackendResult([Output(b"png")])
    [changed] = manager.hook.process_outputs(
        request=JobRequest(id="j", task="txt2img"), result=result
    )
    assert changed.info == {"stamped": "j"}
    assert changed.outputs == result.outputs


async def test_hook_job_finished_may_return_an_awaitable(
    stamped: tuple[pluggy.PluginManager, _Stamp],
) -> None:
    """job_finished results can be awaited, and then the plugin has seen the notification."""
    manager, plugin = stamped
    for outcome in manager.hook.job_finished(notification={"id": "j", "status": "succeeded"}):
        await outcome
    assert plugin.finished == [{"id": "j", "status": "succeeded"}]


def test_hook_register_commands_adds_a_plugins_commands_to_the_cli() -> None:
    """The diffusers plugin adds `sdworker diffusers make-tiny` through register_commands."""
    result = subprocess.run(
        [sys.executable, "-m", "sdworker", "diffusers", "make-tiny", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "tiny Stable Diffusion pipeline" in result.stdout


def test_every_hook_has_a_test() -> None:
    """Each hook spec in sdworker.hookspecs has a test_hook_<name>_... test here."""
    hooks = {name for name, value in vars(hookspecs).items() if hasattr(value, "sdworker_spec")}
    tested = {name for name in globals() if name.startswith("test_hook_")}
    untested = [
        hook for hook in hooks if not any(t.startswith(f"test_hook_{hook}_") for t in tested)
    ]
    assert hooks
    assert not untested


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/example_plugin built and installed into a temporary folder, not into the venv."""
    target = tmp_path_factory.mktemp("example-site")
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--target",
        str(target),
    ]
    if importlib.util.find_spec("hatchling"):
        command.append("--no-build-isolation")
    subprocess.run([*command, str(EXAMPLE_PLUGIN)], check=True, capture_output=True, timeout=120)
    return target


def _with_site(site: Path, script: str) -> str:
    """Run `script` in a fresh interpreter that sees `site`; return what it printed."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop(TRACE_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.timeout(60)  # builds a wheel: a few seconds
def test_an_installed_plugin_offers_its_backend(example_site: Path) -> None:
    """A separately installed distribution's backend is found through its entry point."""
    script = "from sdworker.plugins import backend_specs; print(sorted(backend_specs()))"
    assert "'example'" in _with_site(example_site, script)


@pytest.mark.timeout(60)  # builds a wheel: a few seconds
def test_an_installed_plugin_backend_runs_a_job(example_site: Path) -> None:
    """The example backend, found by name, starts and runs a txt2img job."""
    script = """
import asyncio
from sdworker.backend import JobRequest
from sdworker.plugins import find_backend
from sdworker.settings import Settings

async def main():
    backend = find_backend("example").factory(Settings())
    await backend.start()
    request = JobRequest(id="ex-1", task="txt2img", params={"seed": 3})
    result = await backend.run(request, lambda reading: None)
    print(backend.name, [(output.content_type, output.seed) for output in result.outputs])

asyncio.run(main())
"""
    assert _with_site(example_site, script) == "example [('image/png', 3)]"


def _python_prints(script: str) -> str:
    """What `script` prints, run in a fresh interpreter (so that nothing is imported yet)."""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("package", "name"),
    [("sdworker_a1111", "A1111Backend"), ("sdworker_comfyui", "ComfyUIBackend")],
)
def test_a_plugin_exports_its_backend_class_on_first_use(package: str, name: str) -> None:
    """`from sdworker_a1111 import A1111Backend` works without registration having imported the
    backend; a name the package does not have is an AttributeError that says so."""
    script = (
        f"import sys, {package}; before = '{package}.backend' in sys.modules; "
        f"from {package} import {name}; "
        f"print(before, {name}.__module__, hasattr({package}, 'Nope'))"
    )
    assert _python_prints(script) == f"False {package}.backend False"
