"""The `comfyui` backend plugin: ComfyUI over its HTTP and websocket API.

Runs `workflow` jobs (an API-format graph, a template document or a named template) and
`txt2img` / `img2img` / `inpaint` through the workflow templates shipped in `workflows/`. See
`docs/backends/comfyui.md`; `sdworker_comfyui.testing` has a fake ComfyUI server for tests.

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
    from sdworker_comfyui.backend import ComfyUIBackend
    from sdworker_comfyui.settings import ComfyUISettings

__all__ = ["TASKS", "ComfyUIBackend", "ComfyUISettings", "make_backend", "register_backends"]

TASKS = frozenset({"img2img", "inpaint", "txt2img", "workflow"})


def make_backend(settings: Settings) -> Backend:
    """Build the backend (this is where its code is imported)."""
    from sdworker_comfyui.backend import ComfyUIBackend

    return ComfyUIBackend(settings)


@hookimpl
def register_backends() -> list[BackendSpec]:
    """Offer the comfyui backend."""
    return [
        BackendSpec(
            name="comfyui",
            factory=make_backend,
            tasks=TASKS,
            description="ComfyUI, over its HTTP and websocket API",
        )
    ]


__getattr__ = lazy_exports(
    __name__,
    {"ComfyUIBackend": "sdworker_comfyui.backend", "ComfyUISettings": "sdworker_comfyui.settings"},
)
