"""What the CLI prints: tables and summaries, kept apart from what the commands do."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from sdworker.local import LocalResources
from sdworker.plugins import PluginInfo

if TYPE_CHECKING:
    from sdworker.backend import BackendSpec
    from sdworker.local_mode import DemoResult

console = Console()


def print_resources(resources: LocalResources) -> None:
    """How to reach a local AWS: the variables `sdworker submit` and AWS clients need."""
    console.print(f"[bold]Local AWS on {resources.endpoint}[/bold] (moto). In another shell:")
    for name, value in resources.environment().items():
        # Never wrapped or styled: each line must paste into a shell as it is.
        console.print(f"  export {name}={value}", soft_wrap=True, markup=False, highlight=False)
    console.print('then: sdworker submit --prompt "a red fox in snow" --wait')


def print_plugins(backends: Iterable[BackendSpec], plugins: Iterable[PluginInfo]) -> None:
    """Installed backends, then every plugin with its version and hooks."""
    table = Table("backend", "tasks", "description", title="Backends")
    for spec in backends:
        table.add_row(spec.name, ", ".join(sorted(spec.tasks)), spec.description)
    console.print(table)
    table = Table("plugin", "version", "hooks", title="Plugins")
    for plugin in plugins:
        table.add_row(plugin.name, plugin.version, ", ".join(plugin.hooks))
    console.print(table)


def print_results(bodies: Iterable[dict[str, Any]], files: dict[str, list[str]]) -> None:
    """One row per job: status, outputs, seconds, files saved."""
    table = Table("id", "status", "outputs", "total s", "saved to")
    for body in bodies:
        job_id = str(body.get("id"))
        total = body.get("timings_ms", {}).get("total")
        table.add_row(
            job_id,
            str(body.get("status")),
            str(len(body.get("outputs", body.get("image_url", [])))),
            "" if total is None else f"{total / 1000:.2f}",
            "\n".join(files.get(job_id, [])) or str(body.get("error", {}).get("message", "")),
        )
    console.print(table)


def print_demo(results: Iterable[DemoResult]) -> None:
    """The demo's summary table."""
    results = list(results)
    print_results([r.body for r in results], {r.job_id: [str(f) for f in r.files] for r in results})


def print_check(checks: Iterable[tuple[str, bool, str]]) -> None:
    """One line per pre-flight check."""
    for name, ok, detail in checks:
        mark = "[green]ok[/green]  " if ok else "[red]FAIL[/red]"
        console.print(f"{mark} {name}: {detail}")
