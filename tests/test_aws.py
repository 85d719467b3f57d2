"""The AWS clients as AWS sees them: what their requests say about the caller."""

from __future__ import annotations

import contextlib

import pytest
from aiohttp import web
from botocore.exceptions import ClientError

from sdworker import __version__
from sdworker.aws import PROBE_CONFIG, aws_clients
from sdworker.local import LocalAws
from tests.aws_helpers import loopback_server


async def test_requests_name_sdworker_and_its_version_in_the_user_agent(
    moto: LocalAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CloudTrail's `userAgent` tells sdworker's calls apart: `sdworker/<version> aiobotocore/…`."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("User-Agent", ""))
        return web.Response(status=400, text="no")

    async with loopback_server(answer) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", url)
        async with aws_clients(PROBE_CONFIG) as clients:
            with contextlib.suppress(ClientError):
                await clients.sqs.get_queue_url(QueueName="jobs")
    [agent] = seen
    assert agent.startswith(f"sdworker/{__version__} aiobotocore/")
    assert " botocore/" in agent and " Python/3." in agent
