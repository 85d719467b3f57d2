"""Shared fixtures for tests/ and plugins/*/tests: moto on 127.0.0.1, fresh resources per test."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from sdworker.aws import AwsClients, aws_clients
from sdworker.local import LocalAws, LocalResources, create_resources

_names = itertools.count()


@pytest.fixture(scope="session")
def moto() -> Iterator[LocalAws]:
    """A real AWS emulator on loopback; this process's AWS clients point at it."""
    local = LocalAws()
    local.use()
    yield local
    local.stop()


@pytest.fixture
async def clients(moto: LocalAws) -> AsyncIterator[AwsClients]:
    """aiobotocore clients against the emulator, exactly as production builds them."""
    async with aws_clients() as opened:
        yield opened


@pytest.fixture
async def resources(moto: LocalAws, clients: AwsClients) -> AsyncIterator[LocalResources]:
    """A fresh queue (with DLQ), bucket, result topic and subscribed results queue."""
    made = await create_resources(
        clients, moto.endpoint, name=f"t{next(_names)}", visibility_timeout=30
    )
    yield made
    async with httpx.AsyncClient() as http:
        await http.post(f"{moto.endpoint}/moto-api/reset")
