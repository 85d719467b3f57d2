"""The CloudFormation stacks deployed into emulated AWS (moto), then the pipeline end to end.

pipeline.yaml and two pool.yaml stacks (pools `fake` and `other`) are created through moto's
CloudFormation. A worker configured from the stacks' outputs (infra/scripts/pool_env.py, as the
manifests are) serves the `fake` pool with the fake backend, and jobs go in through the API
function (infra/api/sdworker_api.py) called in-process, as API Gateway would call it.

What moto's CloudFormation leaves out: it skips resource types it does not implement, with a
warning, and creates the rest. Of these templates it skips the SNS subscriptions, queue and
bucket policies, CloudWatch alarms, the Pod Identity association and the API Gateway stage,
usage plan and key. The data path needs only the subscriptions: the fixture creates them through
the SNS API from the template's own properties (filter policy, raw delivery), resolved against
the deployed stacks. Of a bucket's properties moto applies only encryption and tags (not the
public access block nor the lifecycle rules). What moto skips is checked statically in
tests/test_infra.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import re
import sys
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest.mock import ANY

import boto3
import httpx
import pytest
from cfnlint.decode import decode

from sdworker.aws import AwsClients
from sdworker.errors import InvalidJob
from sdworker.jobs import parse_message
from sdworker.local import LocalAws
from sdworker.local_mode import start_worker
from sdworker.settings import load_settings
from sdworker.testing import FakeBackend
from sdworker.worker import Worker
from tests.aws_helpers import drain_messages, queue_counts

pytestmark = pytest.mark.filterwarnings(
    "ignore:Tried to parse AWS.*not supported by moto:UserWarning"
)

INFRA = Path(__file__).resolve().parents[1] / "infra"
TEMPLATES = INFRA / "cloudformation"
STACK = "sdp"
POOLS = ("fake", "other")
Event = dict[str, Any]


def _load(path: Path) -> ModuleType:
    """A module from a file outside the package (the function and script are not installed)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


api = _load(INFRA / "api" / "sdworker_api.py")
pool_env = _load(INFRA / "scripts" / "pool_env.py")


@dataclass(frozen=True)
class Deployed:
    """The deployed stacks: their outputs, and each pool's environment from pool_env.py."""

    pipeline: dict[str, str]
    pools: dict[str, dict[str, str]]

    def function_env(self) -> dict[str, str]:
        """The API function's environment, as pipeline.yaml sets it."""
        return {
            "INPUT_TOPIC_ARN": self.pipeline["InputTopicArn"],
            "RESULTS_BUCKET": self.pipeline["ResultsBucketName"],
            "RESULTS_PREFIX": self.pipeline["ResultsPrefix"],
            "POOLS": ",".join(POOLS),
            "PRESIGNED_URL_SECONDS": "600",
        }


@pytest.fixture(scope="module")
def deployed(moto: LocalAws) -> Iterator[Deployed]:
    """pipeline.yaml and one pool.yaml stack per pool, created in moto like an operator would."""
    cloudformation = boto3.client("cloudformation")
    _upload_function_code()
    pipeline = _create_stack(
        cloudformation,
        STACK,
        "pipeline.yaml",
        {"Pools": ",".join(POOLS), "LambdaCodeBucket": "code", "LambdaCodeKey": "api.zip"},
    )
    pools = {}
    for pool in POOLS:
        parameters = {
            "PipelineStack": STACK,
            "Pool": pool,
            "ClusterName": "gpu-cluster",
            "KedaOperatorRoleArn": "arn:aws:iam::111122223333:role/keda-operator",
        }
        outputs = _create_stack(cloudformation, f"{STACK}-{pool}", "pool.yaml", parameters)
        _subscribe_as_the_template_says(f"{STACK}-{pool}", parameters)
        pools[pool] = pool_env.pool_environment(pipeline, outputs)
    yield Deployed(pipeline, pools)
    httpx.post(f"{moto.endpoint}/moto-api/reset")


def _upload_function_code() -> None:
    """The function's zip where pipeline.yaml is told to find it (its content is not run)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(INFRA / "api" / "sdworker_api.py", "sdworker_api.py")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="code")
    s3.put_object(Bucket="code", Key="api.zip", Body=archive.getvalue())


def _create_stack(
    cloudformation: Any, name: str, template: str, parameters: Mapping[str, str]
) -> dict[str, str]:
    cloudformation.create_stack(
        StackName=name,
        TemplateBody=(TEMPLATES / template).read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    [stack] = cloudformation.describe_stacks(StackName=name)["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    return pool_env.stack_outputs(cloudformation, name)  # type: ignore[no-any-return]  # untyped script


def _subscribe_as_the_template_says(stack: str, parameters: Mapping[str, str]) -> None:
    """Create pool.yaml's AWS::SNS::Subscription, which moto's CloudFormation skips."""
    template, _ = decode(str(TEMPLATES / "pool.yaml"))
    properties = _resolve(
        template["Resources"]["InputSubscription"]["Properties"], stack, parameters
    )
    boto3.client("sns").subscribe(
        TopicArn=properties["TopicArn"],
        Protocol=properties["Protocol"],
        Endpoint=properties["Endpoint"],
        Attributes={
            "RawMessageDelivery": str(properties["RawMessageDelivery"]).lower(),
            "FilterPolicyScope": properties["FilterPolicyScope"],
            "FilterPolicy": json.dumps(properties["FilterPolicy"]),
        },
    )


def _resolve(value: Any, stack: str, parameters: Mapping[str, str]) -> Any:
    """A template value with its intrinsic functions resolved against the deployed stacks."""
    if isinstance(value, list):
        return [_resolve(item, stack, parameters) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and (next(iter(value)) == "Ref" or next(iter(value)).startswith("Fn::")):
        return _intrinsic(value, stack, parameters)
    return {key: _resolve(item, stack, parameters) for key, item in value.items()}


def _intrinsic(value: dict[str, Any], stack: str, parameters: Mapping[str, str]) -> Any:
    """Ref and Fn::Sub (to parameters), Fn::ImportValue, and Fn::GetAtt of a queue's Arn."""
    [(function, argument)] = value.items()
    cloudformation = boto3.client("cloudformation")
    if function == "Ref":
        return parameters[argument]
    if function == "Fn::Sub":
        return re.sub(r"\$\{([^}]+)\}", lambda m: parameters[m[1]], argument)
    if function == "Fn::ImportValue":
        name = _resolve(argument, stack, parameters)
        exports = cloudformation.list_exports()["Exports"]
        return next(export["Value"] for export in exports if export["Name"] == name)
    assert function == "Fn::GetAtt" and argument[1] == "Arn", value
    resource = cloudformation.describe_stack_resource(
        StackName=stack, LogicalResourceId=argument[0]
    )
    queue_url = resource["StackResourceDetail"]["PhysicalResourceId"]
    attributes = boto3.client("sqs").get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["QueueArn"]
    )
    return attributes["Attributes"]["QueueArn"]


@pytest.fixture
def call_api(deployed: Deployed, monkeypatch: pytest.MonkeyPatch) -> Callable[[Event], Any]:
    """Invoke the API function as API Gateway's proxy integration does; returns (status, body)."""
    for name, value in deployed.function_env().items():
        monkeypatch.setenv(name, value)

    async def call(event: Event) -> tuple[int, dict[str, Any]]:
        response = await asyncio.to_thread(api.handler, event, None)
        return response["statusCode"], json.loads(response["body"])

    return call


def submit_event(body: Any) -> Event:
    """A POST /jobs request as API Gateway hands it to the function."""
    return {
        "httpMethod": "POST",
        "resource": "/jobs",
        "body": body if isinstance(body, str) else json.dumps(body),
        "isBase64Encoded": False,
        "requestContext": {
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "stage": "v1",
        },
    }


def status_event(job_id: str) -> Event:
    """A GET /jobs/{id} request as API Gateway hands it to the function."""
    return {"httpMethod": "GET", "resource": "/jobs/{id}", "pathParameters": {"id": job_id}}


@pytest.fixture(scope="module")
async def worker(deployed: Deployed) -> AsyncIterator[tuple[Worker, FakeBackend]]:
    """A worker for the `fake` pool, configured only from that pool's pool.env values.

    One for the module: a stopped worker's cancelled long poll can still take a message in
    the emulator (as in SQS), which would hide it from the next worker for a visibility timeout.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name, value in deployed.pools["fake"].items():
            patch.setenv(name, value)
        settings = load_settings(receive_wait=1, retry_backoff=0, spot="off", log_format="json")
    backend = FakeBackend(name="fake", outputs=2, size=(16, 8))
    running, task = await start_worker(settings, backend)
    yield running, backend
    running.stop()
    await task


async def _wait_for(call_api: Any, job_id: str, within_s: float = 15) -> dict[str, Any]:
    """Poll GET /jobs/{id} until it is no longer pending."""
    for _ in range(int(within_s / 0.2)):
        code, body = await call_api(status_event(job_id))
        assert code == 200
        if body["status"] != "pending":
            return body  # type: ignore[no-any-return]  # JSON
        await asyncio.sleep(0.2)
    raise AssertionError(f"{job_id} still pending after {within_s} s")


async def _take_one(clients: AwsClients, queue_url: str) -> dict[str, Any]:
    """The one message on a queue, deleted from it."""
    [message] = await drain_messages(clients, queue_url)
    await clients.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return message


# --- The deployed resources --------------------------------------------------------------------


def test_pool_env_holds_every_setting_a_pool_needs(deployed: Deployed) -> None:
    """pool_env.py turns the stacks' outputs into the worker's and KEDA's settings."""
    environment = deployed.pools["fake"]
    assert set(environment) == {name for name, _, _ in pool_env.POOL_ENV}
    assert environment["SDWORKER_BACKEND"] == "fake"
    assert environment["SDWORKER_QUEUE_URL"].endswith(f"/{STACK}-fake-jobs")
    assert environment["SDWORKER_DLQ_URL"].endswith(f"/{STACK}-fake-dlq")
    assert environment["SDWORKER_BUCKET"] == deployed.pipeline["ResultsBucketName"]
    assert environment["SDWORKER_TOPIC_ARN"] == deployed.pipeline["ResultTopicArn"]
    assert environment["KEDA_ROLE_ARN"].startswith("arn:aws:iam::")
    assert pool_env.render(environment).splitlines()[0] == "AWS_REGION=us-east-1"


async def test_a_pool_queue_is_encrypted_and_redrives_to_its_dlq(
    deployed: Deployed, clients: AwsClients
) -> None:
    """The deployed job queue has SSE, a 300 s visibility and a 10-receive redrive to its DLQ."""
    environment = deployed.pools["fake"]
    attributes = (
        await clients.sqs.get_queue_attributes(
            QueueUrl=environment["SDWORKER_QUEUE_URL"], AttributeNames=["All"]
        )
    )["Attributes"]
    dlq_arn = (
        await clients.sqs.get_queue_attributes(
            QueueUrl=environment["SDWORKER_DLQ_URL"], AttributeNames=["QueueArn"]
        )
    )["Attributes"]["QueueArn"]
    assert json.loads(attributes["RedrivePolicy"]) == {
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": 10,
    }
    assert attributes["VisibilityTimeout"] == "300"
    assert attributes["SqsManagedSseEnabled"] == "true"


async def test_the_results_bucket_encrypts_with_the_pipeline_key(
    deployed: Deployed, clients: AwsClients
) -> None:
    """Objects in the deployed results bucket are encrypted by default with the stack's key."""
    bucket = deployed.pipeline["ResultsBucketName"]
    encryption = await clients.s3.get_bucket_encryption(Bucket=bucket)
    [rule] = encryption["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": deployed.pipeline["PipelineKeyArn"],
    }


# --- The pipeline end to end -------------------------------------------------------------------


async def test_a_job_submitted_through_the_api_is_generated_and_reads_succeeded(
    call_api: Any, worker: tuple[Worker, FakeBackend]
) -> None:
    """POST /jobs → SNS → the pool's queue → worker → S3; GET /jobs/{id} gives working URLs."""
    job = {"id": "fox-1", "task": "txt2img", "params": {"prompt": "a fox", "seed": 7}}
    code, accepted = await call_api(submit_event(job))
    assert (code, accepted) == (
        202,
        {
            "id": "fox-1",
            "status_url": "https://abc123.execute-api.us-east-1.amazonaws.com/v1/jobs/fox-1",
        },
    )
    result = await _wait_for(call_api, "fox-1")
    assert result["status"] == "succeeded" and result["backend"] == "fake"
    assert [o["width"] for o in result["outputs"]] == [16, 16]
    async with httpx.AsyncClient() as http:
        image = await http.get(result["outputs"][0]["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    [run] = [run for run in worker[1].runs if run.id == "fox-1"]
    assert run.params["prompt"] == "a fox"


async def test_a_job_that_fails_reads_failed_with_its_error(
    call_api: Any, worker: tuple[Worker, FakeBackend]
) -> None:
    """A job the worker fails permanently reads `failed`, with the worker's error."""
    job = {"id": "bad-input", "task": "img2img", "inputs": {"image": "https://127.0.0.1/x.png"}}
    assert await call_api(submit_event(job)) == (202, {"id": "bad-input", "status_url": ANY})
    result = await _wait_for(call_api, "bad-input")
    assert result["status"] == "failed"
    assert result["error"]["code"] == "input_refused" and not result.get("outputs")


async def test_an_unknown_job_reads_pending(call_api: Any) -> None:
    """No result.json yet (or ever) reads as pending."""
    assert await call_api(status_event("never-submitted")) == (
        200,
        {"id": "never-submitted", "status": "pending"},
    )


async def test_a_job_reaches_only_the_queue_of_its_backend(
    call_api: Any, deployed: Deployed, clients: AwsClients
) -> None:
    """The routing attribute sends a job for `other` to other's queue, raw, and nowhere else."""
    job = {"id": "for-other", "task": "txt2img", "backend": "other"}
    assert (await call_api(submit_event(job)))[0] == 202
    message = await _take_one(clients, deployed.pools["other"]["SDWORKER_QUEUE_URL"])
    assert json.loads(message["Body"]) == job
    assert message["MessageAttributes"]["backend"]["StringValue"] == "other"
    assert await queue_counts(clients, deployed.pools["fake"]["SDWORKER_QUEUE_URL"]) == (0, 0)


async def test_the_api_gives_a_job_without_an_id_a_fresh_one(
    call_api: Any, deployed: Deployed, clients: AwsClients
) -> None:
    """A job without an id is published with a new UUID, which the answer and status URL carry."""
    code, accepted = await call_api(submit_event({"task": "txt2img", "backend": "other"}))
    assert code == 202 and re.fullmatch(r"[0-9a-f-]{36}", accepted["id"])
    assert accepted["status_url"].endswith(f"/v1/jobs/{accepted['id']}")
    message = await _take_one(clients, deployed.pools["other"]["SDWORKER_QUEUE_URL"])
    assert json.loads(message["Body"])["id"] == accepted["id"]


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        {"id": "a/b", "task": "txt2img"},
        {"id": "x", "task": "paint"},
        {"id": "x", "task": "img2img"},
        {"id": "x", "task": "txt2img", "params": {"steps": 0}, "colour": "red"},
    ],
    ids=["malformed-json", "bad-id", "unknown-task", "missing-input", "two-wrong-fields"],
)
async def test_the_api_refuses_an_invalid_job_with_the_workers_own_message(
    call_api: Any, body: Any
) -> None:
    """A job sdworker would refuse is answered 400 with exactly the message the worker gives."""
    text = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(InvalidJob) as refused:
        parse_message(text)
    assert await call_api(submit_event(text)) == (400, {"error": str(refused.value)})


async def test_the_api_refuses_a_backend_without_a_pool(call_api: Any) -> None:
    """A job for a backend no queue subscribes to would be lost: 400, naming the pools."""
    code, body = await call_api(submit_event({"id": "x", "task": "txt2img", "backend": "nope"}))
    assert (code, body) == (400, {"error": "backend: must be one of fake, other (got 'nope')"})


async def test_the_api_refuses_a_job_that_picks_its_own_output_place(call_api: Any) -> None:
    """Results must land where GET /jobs/{id} reads them: output.prefix is refused."""
    job = {"id": "x", "task": "txt2img", "output": {"prefix": "elsewhere"}}
    code, body = await call_api(submit_event(job))
    assert code == 400 and body["error"].startswith("output.prefix: chosen by the pipeline")


async def test_the_api_refuses_guidance_documents(call_api: Any) -> None:
    """The API takes native jobs; guidance task documents go to the topic directly."""
    document = {"metadata": {"id": "g-1", "tasktype": "text-to-image"}, "content": {}}
    code, body = await call_api(submit_event(document))
    assert code == 400 and "native version-1 jobs" in body["error"]


async def test_the_api_refuses_a_job_over_the_sns_limit(call_api: Any) -> None:
    """A body that with its attributes passes SNS's 256 KiB is answered 413, not lost."""
    job = {"id": "big", "task": "txt2img", "params": {"prompt": "x" * 262_144}}
    code, body = await call_api(submit_event(job))
    assert code == 413 and "SNS takes at most 262144" in body["error"]


async def test_a_status_request_for_an_impossible_id_is_refused(call_api: Any) -> None:
    """An id that cannot be a job id (it would escape the results prefix) is a 400."""
    code, body = await call_api(status_event(".."))
    assert code == 400 and body["error"].startswith("id: must match")
