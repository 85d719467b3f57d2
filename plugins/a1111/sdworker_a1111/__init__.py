"""The `a1111` backend plugin: AUTOMATIC1111 Stable Diffusion Web UI, over its HTTP API.

sdworker runs beside a Web UI started with `--api` (A1111, Forge, SD.Next) and drives it:
`txt2img`, `img2img`, `inpaint` and `upscale`, a model per job, progress and interrupts of its
own task only. `sdworker_a1111.testing` ships a fake Web UI for tests.
"""

from __future__ import annotations

from sdworker.backend import BackendSpec
from sdworker.hookspecs import hookimpl
from sdworker_a1111.backend import TASKS, A1111Backend
from sdworker_a1111.settings import A1111Settings

__all__ = ["TASKS", "A1111Backend", "A1111Settings", "register_backends"]


@hookimpl
def register_backends() -> list[BackendSpec]:
    """Offer the a1111 backend."""
    return [
        BackendSpec(
            name="a1111",
            factory=A1111Backend,
            tasks=TASKS,
            description="AUTOMATIC1111 Stable Diffusion Web UI, over its HTTP API",
        )
    ]
