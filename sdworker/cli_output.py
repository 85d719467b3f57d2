"""What the CLI prints: tables and summaries, kept apart from what the commands do."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from sdworker.local import LocalResources
from sdworker.plugins import PluginInfo

if TYPE_CHECKING:
    from sdworker.backend import BackendSpec
    from sdworker.demo import DemoResult

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
    """What each demo job shows, the summary table, then the notifications as received."""
    results = list(results)
    for result in results:
        console.print(f"[bold]{result.job_id}[/bold]: {result.shows}")
    print_results([r.body for r in results], {r.job_id: [str(f) for f in r.files] for r in results})
    console.rule("notifications received (SNS → results queue)")
    for result in results:
        console.print_json(data=result.body)


def print_check(checks: Iterable[tuple[str, bool, str]]) -> None:
    """One line per pre-flight check."""
    for name, ok, detail in checks:
        mark = "[green]ok[/green]  " if ok else "[red]FAIL[/red]"
        console.print(f"{mark} {name}: {detail}")


class JobProgress:
    """One progress bar per job, moved by `progress` and final notifications."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {}
        for job_id in ids:
            self._bar(job_id)

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def _bar(self, job_id: str) -> TaskID:
        if job_id not in self.tasks:
            self.tasks[job_id] = self.progress.add_task(job_id, total=1.0, status="queued")
        return self.tasks[job_id]

    def update(self, body: dict[str, Any]) -> None:
        """Move the bar of the job a notification is about (adding a bar for a new job)."""
        status = str(body.get("status"))
        fraction = body.get("progress", {}).get("fraction")
        if status in ("succeeded", "completed", "failed"):
            fraction = 1.0
        self.progress.update(
            self._bar(str(body.get("id"))), completed=fraction or 0.0, status=status
        )
