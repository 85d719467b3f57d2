"""The `a1111` backend plugin: AUTOMATIC1111 Stable Diffusion Web UI, over its HTTP API.

sdworker runs beside a Web UI started with `--api` (A1111, Forge, SD.Next) and drives it:
`txt2img`, `img2img`, `inpaint` and `upscale`, a model per job, progress and interrupts of its
own task only. `sdworker_a1111.testing` ships a fake Web UI for tests.

Registering the backend imports none of its code: a worker running another backend never
loads it (docs/performance.md, footprint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdworker.backend import BackendSpec
from sdworker.hookspecs import hookimpl
from sdworker.plugins import lazy_exports

if TYPE_CHECKING:
    from sdworker.backend import Backend
    from sdworker.settings import Settings
    from sdworker_a1111.backend import A1111Backend
    from sdworker_a1111.settings import A1111Settings

__all__ = ["TASKS", "A1111Backend", "A1111Settings", "make_backend", "register_backends"]

TASKS = frozenset({"img2img", "inpaint", "txt2img", "upscale"})


def make_backend(settings: Settings) -> Backend:
    """Build the backend (this is where its code is imported)."""
    from sdworker_a1111.backend import A1111Backend

    return A1111Backend(settings)


@hookimpl
def register_backends() -> list[BackendSpec]:
    """Offer the a1111 backend."""
    return [
        BackendSpec(
            name="a1111",
            factory=make_backend,
            tasks=TASKS,
            description="AUTOMATIC1111 Stable Diffusion Web UI, over its HTTP API",
        )
    ]


__getattr__ = lazy_exports(
    __name__, {"A1111Backend": "sdworker_a1111.backend", "A1111Settings": "sdworker_a1111.settings"}
)
