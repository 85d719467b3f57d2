"""Local AWS: an embedded moto server on 127.0.0.1 with the resources a worker needs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from sdworker.aws import AwsClients
from sdworker.errors import ConfigError

LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No instance metadata on a workstation: do not even probe 169.254.169.254.
    "SDWORKER_SPOT": "off",
    # No kubelet either: no probe server on 0.0.0.0:8080 (`--set health_port=8080` for one).
    "SDWORKER_HEALTH_PORT": "0",
}


@dataclass(frozen=True)
class LocalResources:
    """Names of what `create_resources` made: give them to `sdworker run` or any AWS client."""

    endpoint: str
    queue_url: str
    dlq_url: str
    bucket: str
    topic_arn: str
    results_queue_url: str

    def environment(self) -> dict[str, str]:
        """Environment variables that point a worker or `sdworker submit` at these resources."""
        return {
            **LOCAL_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint,
            "SDWORKER_QUEUE_URL": self.queue_url,
            "SDWORKER_DLQ_URL": self.dlq_url,
            "SDWORKER_BUCKET": self.bucket,
            "SDWORKER_TOPIC_ARN": self.topic_arn,
            "SDWORKER_RESULTS_QUEUE_URL": self.results_queue_url,
        }


class LocalAws:
    """A moto server on a free loopback port; `stop()` ends it and everything in it."""

    def __init__(self, port: int = 0) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise ConfigError("local AWS needs moto: pip install 'sdworker[local]'") from None
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        host, bound_port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{bound_port}"
        self._replaced: dict[str, str | None] = {}

    def use(self) -> None:
        """Point this process's AWS clients at the emulator, until `stop()`."""
        wanted = {**LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        if not self._replaced:  # a second call must not record the emulator's own values
            self._replaced = {name: os.environ.get(name) for name in wanted}
        os.environ.update(wanted)

    def stop(self) -> None:
        """Stop the server (its state is gone) and give back the variables `use()` replaced."""
        try:
            self._server.stop()
        finally:
            for name, value in self._replaced.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self._replaced = {}


async def create_resources(
    clients: AwsClients,
    endpoint: str,
    *,
    name: str = "sdworker",
    visibility_timeout: int = 60,
    max_receive_count: int = 5,
) -> LocalResources:
    """Create a job queue with a DLQ (redrive), a bucket, a result topic and a results queue."""
    dlq_url = (await clients.sqs.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
    dlq_arn = await _queue_arn(clients, dlq_url)
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
    queue_url = (
        await clients.sqs.create_queue(
            QueueName=f"{name}-jobs",
            Attributes={
                "VisibilityTimeout": str(visibility_timeout),
                "RedrivePolicy": json.dumps(redrive),
            },
        )
    )["QueueUrl"]
    await clients.s3.create_bucket(Bucket=f"{name}-outputs")
    topic_arn = (await clients.sns.create_topic(Name=f"{name}-results"))["TopicArn"]
    results_url = (await clients.sqs.create_queue(QueueName=f"{name}-results"))["QueueUrl"]
    await clients.sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=await _queue_arn(clients, results_url),
        Attributes={"RawMessageDelivery": "true"},
    )
    return LocalResources(endpoint, queue_url, dlq_url, f"{name}-outputs", topic_arn, results_url)


async def _queue_arn(clients: AwsClients, queue_url: str) -> str:
    attributes = await clients.sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["QueueArn"]
    )
    return attributes["Attributes"]["QueueArn"]
