"""The a1111 backend passes the contract every backend must pass, against the fake Web UI."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from a1111_support import started_backend

from sdworker.testing import BackendContract
from sdworker_a1111 import A1111Backend
from sdworker_a1111.testing import FakeWebUI


class TestA1111Contract(BackendContract):
    """The contract suite, over real HTTP to a fake Web UI on loopback."""

    @pytest.fixture
    async def backend(self) -> AsyncIterator[A1111Backend]:
        """A backend on a fake Web UI slow enough for an interrupt to land mid-run."""
        async with FakeWebUI(step_seconds=0.05) as webui, started_backend(webui) as backend:
            yield backend
