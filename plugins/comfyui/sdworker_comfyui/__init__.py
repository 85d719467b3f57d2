"""The `comfyui` backend plugin: ComfyUI over its HTTP and websocket API.

Runs `workflow` jobs (an API-format graph, a template document or a named template) and
`txt2img` / `img2img` / `inpaint` through the workflow templates shipped in `workflows/`. See
`docs/backends/comfyui.md`; `sdworker_comfyui.testing` has a fake ComfyUI server for tests.
"""

from __future__ import annotations

from sdworker.backend import BackendSpec
from sdworker.hookspecs import hookimpl
from sdworker_comfyui.backend import TASKS, ComfyUIBackend
from sdworker_comfyui.settings import ComfyUISettings

__all__ = ["TASKS", "ComfyUIBackend", "ComfyUISettings", "register_backends"]


@hookimpl
def register_backends() -> list[BackendSpec]:
    """Offer the comfyui backend."""
    return [
        BackendSpec(
            name="comfyui",
            factory=ComfyUIBackend,
            tasks=TASKS,
            description="ComfyUI, over its HTTP and websocket API",
        )
    ]
