"""The hooks a plugin can implement. Each is optional; the per-job hot path is `Backend`."""

from __future__ import annotations

from typing import Any

import pluggy

from sdworker.backend import BackendResult, BackendSpec, JobRequest

hookspec = pluggy.HookspecMarker("sdworker")
hookimpl = pluggy.HookimplMarker("sdworker")


@hookspec
def register_backends() -> list[BackendSpec]:
    """At start-up: return the backends this plugin provides."""
    raise NotImplementedError  # a specification: pluggy never calls it


@hookspec
def prepare_job(request: JobRequest) -> JobRequest | None:
    """Before a job runs: return a changed request, or None to leave it as it is."""
    raise NotImplementedError  # a specification: pluggy never calls it


@hookspec
def process_outputs(request: JobRequest, result: BackendResult) -> BackendResult | None:
    """After a job ran, before upload: return changed outputs, or None to leave them."""
    raise NotImplementedError  # a specification: pluggy never calls it


@hookspec
def job_finished(notification: dict[str, Any]) -> Any:
    """After a job's outcome is recorded and announced; may return an awaitable."""
    raise NotImplementedError  # a specification: pluggy never calls it


@hookspec
def register_commands(cli: Any) -> None:
    """When the command line is built: add commands or sub-apps to the `typer.Typer` `cli`."""
    raise NotImplementedError  # a specification: pluggy never calls it
