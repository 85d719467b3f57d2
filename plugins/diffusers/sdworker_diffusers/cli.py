"""`sdworker diffusers ...`: commands of the diffusers plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

diffusers_cli = typer.Typer(help="Commands of the diffusers backend.", no_args_is_help=True)


@diffusers_cli.command("make-tiny")
def make_tiny(
    path: Annotated[Path, typer.Argument(help="Folder to write the pipeline to.")],
    single_file: Annotated[
        Path | None,
        typer.Option(
            help="Also write it as one original-layout .safetensors checkpoint here; load it "
            "with SDWORKER_DIFFUSERS_MODEL=this file and SDWORKER_DIFFUSERS_MODEL_CONFIG_DIR=PATH."
        ),
    ] = None,
) -> None:
    """Write a tiny Stable Diffusion pipeline (random seeded weights, ~6.5 MiB, no network)
    with save_pretrained; point SDWORKER_DIFFUSERS_MODEL at it like a real model."""
    from sdworker_diffusers.single_file import write_single_file
    from sdworker_diffusers.tiny import describe, make_tiny_model

    typer.echo(describe(make_tiny_model(path)))
    if single_file is not None:
        written = write_single_file(path, single_file)
        size = written.stat().st_size / 2**20
        typer.echo(f"single-file checkpoint at {written} ({size:.1f} MiB)")
