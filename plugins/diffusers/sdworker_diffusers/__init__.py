"""The `diffusers` backend plugin: Stable Diffusion pipelines run by sdworker, on the GPU if any.

Nothing heavy is imported here: torch and diffusers load only when the backend is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from sdworker.backend import BackendSpec
from sdworker.hookspecs import hookimpl

if TYPE_CHECKING:
    from sdworker.backend import Backend
    from sdworker.settings import Settings

TASKS = frozenset({"img2img", "inpaint", "txt2img", "upscale"})  # upscale: when configured


def make_backend(settings: Settings) -> Backend:
    """Build the backend (this is where torch is imported)."""
    from sdworker_diffusers.backend import DiffusersBackend

    return DiffusersBackend(settings)


@hookimpl
def register_backends() -> list[BackendSpec]:
    """Offer the diffusers backend."""
    return [
        BackendSpec(
            name="diffusers",
            factory=make_backend,
            tasks=TASKS,
            description="Stable Diffusion 1.x/2.x and SDXL run by sdworker (GPU if present); "
            "upscale with SDWORKER_DIFFUSERS_UPSCALER",
        )
    ]


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    """Add `sdworker diffusers make-tiny PATH`."""
    from sdworker_diffusers.cli import diffusers_cli

    cli.add_typer(diffusers_cli, name="diffusers")
