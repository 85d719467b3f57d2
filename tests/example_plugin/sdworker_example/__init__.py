"""An example third-party plugin: offers a backend named `example` through the `sdworker` hook."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdworker import BackendSpec, hookimpl
from sdworker.testing.fake import FakeBackend

if TYPE_CHECKING:
    from sdworker.settings import Settings

TASKS = frozenset({"txt2img"})


def make_backend(settings: Settings) -> FakeBackend:
    """A fresh in-memory backend that draws one small PNG per job."""
    return FakeBackend(name="example", tasks=TASKS, size=(16, 16))


@hookimpl
def register_backends() -> list[BackendSpec]:
    """Offer the `example` backend."""
    return [BackendSpec("example", make_backend, TASKS, "an example third-party backend")]
