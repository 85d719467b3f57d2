"""aiobotocore clients for SQS, S3 and SNS, configured from the standard AWS variables."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import NoRegionError
from botocore.loaders import JSONFileLoader

from sdworker import __version__
from sdworker.errors import ConfigError

if TYPE_CHECKING:  # typing-only stubs: not imported at run time
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sns import SNSClient
    from types_aiobotocore_sqs import SQSClient

# The services a worker's session makes clients for: its own three, and those botocore's
# credential providers call (STS to assume a role or a web identity, SSO and its token service).
SESSION_SERVICES = frozenset({"sqs", "s3", "sns", "sts", "sso", "sso-oidc"})


class _SessionEndpointsLoader(JSONFileLoader):
    """botocore's JSON loader, keeping from its endpoint data (`endpoints.json`: every service in
    every partition) only the services of `SESSION_SERVICES`.

    botocore reads that data once a session and holds it for the life of the process: 6.8 MB of
    objects, most of a worker's AWS memory after the service models (docs/performance.md). The
    partitions, their defaults and regions are kept whole, so clients of these services resolve
    exactly as before (tests/test_aws.py compares them); a service left out would resolve as one
    botocore has no data for: by its partition's pattern, then its endpoint rule set.
    """

    def load_file(self, file_path: str) -> Any:
        data = super().load_file(file_path)
        if isinstance(data, dict) and os.path.basename(file_path) == "endpoints":
            for partition in data.get("partitions", []):
                services = partition.get("services", {})
                partition["services"] = {
                    name: services[name] for name in SESSION_SERVICES if name in services
                }
        return data


def worker_session() -> AioSession:
    """An aiobotocore session that holds the endpoint data of `SESSION_SERVICES` only."""
    session = get_session()
    session.get_component("data_loader").file_loader = _SessionEndpointsLoader()
    return session


def _user_agent() -> str:
    """`sdworker/1.2.3 aiobotocore/… botocore/… Python/…` (and `app/ID` when AWS_SDK_UA_APP_ID
    is set): what CloudTrail shows for sdworker's calls. Fixed once: botocore otherwise rebuilds
    its own User-Agent twice per request, about a tenth of a call's CPU (docs/performance.md)."""
    import aiobotocore
    import botocore

    python = ".".join(map(str, sys.version_info[:3]))
    agent = (
        f"sdworker/{__version__} aiobotocore/{aiobotocore.__version__} "
        f"botocore/{botocore.__version__} Python/{python}"
    )
    app_id = os.environ.get("AWS_SDK_UA_APP_ID", "").strip()  # kept, as botocore would
    return f"{agent} app/{app_id}" if app_id else agent


USER_AGENT = _user_agent()

# Standard retry mode backs off on throttling and 5xx; the read timeout outlasts a 20 s long poll.
CLIENT_CONFIG = AioConfig(
    retries={"mode": "standard", "max_attempts": 5},
    connect_timeout=5,
    read_timeout=30,
    max_pool_connections=32,
    user_agent=USER_AGENT,
)


# For probes (`sdworker check`): one quick try, so that an unreachable endpoint fails in seconds.
PROBE_CONFIG = AioConfig(
    retries={"mode": "standard", "max_attempts": 1},
    connect_timeout=3,
    read_timeout=10,
    user_agent=USER_AGENT,
)


@dataclass(frozen=True)
class AwsClients:
    """The three clients a worker uses, sharing one session."""

    sqs: SQSClient
    s3: S3Client
    sns: SNSClient


@asynccontextmanager
async def aws_clients(config: AioConfig = CLIENT_CONFIG) -> AsyncIterator[AwsClients]:
    """Open SQS, S3 and SNS clients; endpoint, region and credentials follow the AWS variables."""
    session = worker_session()
    async with AsyncExitStack() as stack:
        try:
            sqs = await stack.enter_async_context(session.create_client("sqs", config=config))
            s3 = await stack.enter_async_context(session.create_client("s3", config=config))
            sns = await stack.enter_async_context(session.create_client("sns", config=config))
        except NoRegionError:
            raise ConfigError(
                "AWS_REGION is not set: set it (or AWS_DEFAULT_REGION) to the region of the queue"
            ) from None
        yield AwsClients(sqs=sqs, s3=s3, sns=sns)
