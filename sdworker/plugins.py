"""The plugin manager: built-in and third-party plugins load the same way, from entry points."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import pluggy

from sdworker import hookspecs
from sdworker._structlog import structlog
from sdworker.backend import BackendResult, BackendSpec, JobRequest
from sdworker.errors import ConfigError

ENTRY_POINT_GROUP = "sdworker"
TRACE_ENV = "SDWORKER_TRACE_PLUGINS"

log = structlog.get_logger("sdworker.plugins")


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin, for `sdworker plugins`."""

    name: str
    version: str
    hooks: tuple[str, ...]


def lazy_exports(package: str, sources: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for a plugin package: each name in `sources` is imported from its
    module on first use, so that registering the plugin loads none of its code. Example:

        __getattr__ = lazy_exports(__name__, {"MyBackend": "my_plugin.backend"})
    """

    def attribute(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(sources[name]), name)

    return attribute


def make_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A manager with our hook specs, every `sdworker` entry point, and optional call tracing."""
    manager = pluggy.PluginManager("sdworker")
    manager.add_hookspecs(hookspecs)
    if load_entry_points:
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    if os.environ.get(TRACE_ENV):
        manager.trace.root.setwriter(lambda message: sys.stderr.write(str(message)))
        manager.enable_tracing()
    return manager


@cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, built on first use."""
    return make_plugin_manager()


def backend_specs(manager: pluggy.PluginManager | None = None) -> dict[str, BackendSpec]:
    """Every backend offered by a plugin, by name; a name offered twice is a `ConfigError`."""
    specs: dict[str, BackendSpec] = {}
    for offered in (manager or plugin_manager()).hook.register_backends():
        for spec in offered:
            if spec.name in specs:
                raise ConfigError(f"two plugins offer a backend named {spec.name!r}; uninstall one")
            specs[spec.name] = spec
    return specs


def find_backend(name: str, manager: pluggy.PluginManager | None = None) -> BackendSpec:
    """The backend called `name`, or a `ConfigError` that lists the installed ones."""
    specs = backend_specs(manager)
    if name not in specs:
        known = ", ".join(sorted(specs)) or "none"
        raise ConfigError(
            f"SDWORKER_BACKEND: no backend named {name!r} is installed (installed: {known}); "
            "pick one of those or install the plugin that provides it"
        )
    return specs[name]


def loaded_plugins(manager: pluggy.PluginManager | None = None) -> list[PluginInfo]:
    """Name, distribution version and implemented hooks of each registered plugin."""
    manager = manager or plugin_manager()
    versions = {id(plugin): dist.version for plugin, dist in manager.list_plugin_distinfo()}
    infos = [
        PluginInfo(
            name=name,
            version=versions.get(id(plugin), "unknown"),
            hooks=tuple(sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])),
        )
        for name, plugin in manager.list_name_plugin()
    ]
    return sorted(infos, key=lambda info: info.name)


class PluginHooks:
    """The job-path hooks, typed: each plugin's result is handed to the next plugin."""

    def __init__(self, manager: pluggy.PluginManager | None = None) -> None:
        self.manager = manager or plugin_manager()

    def prepare_job(self, request: JobRequest) -> JobRequest:
        """Let every `prepare_job` implementation change the request in turn."""
        for impl in reversed(self.manager.hook.prepare_job.get_hookimpls()):
            changed = impl.function(request=request)
            request = changed if isinstance(changed, JobRequest) else request
        return request

    def process_outputs(self, request: JobRequest, result: BackendResult) -> BackendResult:
        """Let every `process_outputs` implementation change the outputs in turn."""
        for impl in reversed(self.manager.hook.process_outputs.get_hookimpls()):
            changed = impl.function(request=request, result=result)
            result = changed if isinstance(changed, BackendResult) else result
        return result

    async def job_finished(self, notification: dict[str, Any]) -> None:
        """Tell every `job_finished` implementation; its failures are logged, never raised."""
        try:
            for outcome in self.manager.hook.job_finished(notification=notification):
                if inspect.isawaitable(outcome):
                    await outcome
        except Exception:
            log.exception("a job_finished hook failed")
