"""Local mode inside another program: the embedded emulator leaves the process as it found it."""

from __future__ import annotations

import os

import pytest

from sdworker.local import LocalAws
from sdworker.local_mode import local_aws


async def test_local_aws_gives_back_the_aws_variables_it_replaced(moto: LocalAws) -> None:
    """`sdworker demo` or a benchmark run in-process must not leave clients made later pointing
    at its stopped emulator."""
    before = os.environ["AWS_ENDPOINT_URL"]
    async with local_aws() as resources:
        assert os.environ["AWS_ENDPOINT_URL"] == resources.endpoint != before
    assert os.environ["AWS_ENDPOINT_URL"] == before


async def test_local_aws_removes_the_variables_that_were_not_set(
    moto: LocalAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable the process did not have before is gone again afterwards."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    async with local_aws():
        assert "AWS_ENDPOINT_URL" in os.environ
    assert "AWS_ENDPOINT_URL" not in os.environ
