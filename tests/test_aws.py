"""The AWS clients as AWS sees them: what their requests say about the caller, and where they
go."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from aiohttp import web
from botocore.exceptions import ClientError

from sdworker import __version__
from sdworker.aws import PROBE_CONFIG, SESSION_SERVICES, aws_clients, worker_session
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


REGIONS = ("us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1", "us-iso-east-1", "aws-global")
VARIANTS = ((False, False), (True, False), (False, True))  # (FIPS, dual-stack)


async def _resolved(
    session: AioSession, service: str, region: str, variant: tuple[bool, bool]
) -> Any:
    """Where a client goes and how it signs, for `service` in `region`."""
    config = AioConfig(use_fips_endpoint=variant[0], use_dualstack_endpoint=variant[1])
    async with session.create_client(  # type: ignore[call-overload]  # a name, not a literal
        service, region_name=region, aws_access_key_id="k", aws_secret_access_key="s", config=config
    ) as client:
        signer = client._request_signer
        return (
            client.meta.endpoint_url,
            client.meta.partition,
            signer.signing_name,
            signer.region_name,
            signer.signature_version,
        )


@pytest.mark.parametrize("service", sorted(SESSION_SERVICES))
async def test_the_workers_session_resolves_its_services_as_botocore_does(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's session keeps only its services' endpoint data (6.8 MB less held), and
    clients of those services go to the same endpoints and sign the same way as with all of it:
    every partition, FIPS and dual-stack."""
    for name in ("AWS_ENDPOINT_URL", f"AWS_ENDPOINT_URL_{service.upper().replace('-', '_')}"):
        monkeypatch.delenv(name, raising=False)
    trimmed, whole = worker_session(), get_session()
    for region in REGIONS:
        for variant in VARIANTS:
            assert await _resolved(trimmed, service, region, variant) == await _resolved(
                whole, service, region, variant
            ), (region, variant)
    kept = {
        name
        for partition in trimmed.get_component("data_loader").load_data("endpoints")["partitions"]
        for name in partition["services"]
    }
    assert {"sqs", "s3", "sns"} <= kept <= SESSION_SERVICES
