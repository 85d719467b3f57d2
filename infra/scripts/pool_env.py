"""Write a pool's settings from its CloudFormation stacks, as the overlay's `pool.env`.

    python infra/scripts/pool_env.py --pipeline-stack sdworker --pool-stack sdworker-a1111 \\
        > infra/k8s/overlays/a1111/pool.env

The pods read these variables (`envFrom` the generated ConfigMap); KEDA's objects get the queue
URL, the region and the scaler role from the same file (components/pool-wiring). Credentials and
region come from the standard AWS variables, as for the AWS CLI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import boto3

if TYPE_CHECKING:
    from mypy_boto3_cloudformation import CloudFormationClient

Outputs = Mapping[str, str]

# (variable, stack, output key): what pool.env holds and where each value comes from.
POOL_ENV: Sequence[tuple[str, str, str]] = (
    ("AWS_REGION", "pool", "Region"),
    ("SDWORKER_BACKEND", "pool", "Backend"),
    ("SDWORKER_QUEUE_URL", "pool", "QueueUrl"),
    ("SDWORKER_DLQ_URL", "pool", "DeadLetterQueueUrl"),
    ("SDWORKER_BUCKET", "pipeline", "ResultsBucketName"),
    ("SDWORKER_PREFIX", "pipeline", "ResultsPrefix"),
    ("SDWORKER_TOPIC_ARN", "pipeline", "ResultTopicArn"),
    ("KEDA_ROLE_ARN", "pool", "ScalerRoleArn"),
)


def stack_outputs(cloudformation: CloudFormationClient, stack: str) -> dict[str, str]:
    """The outputs of a deployed stack, by key."""
    [described] = cloudformation.describe_stacks(StackName=stack)["Stacks"]
    return {item["OutputKey"]: item["OutputValue"] for item in described.get("Outputs", [])}


def pool_environment(pipeline: Outputs, pool: Outputs) -> dict[str, str]:
    """The pool's variables from the two stacks' outputs; a missing output raises `KeyError`."""
    stacks = {"pipeline": pipeline, "pool": pool}
    return {name: stacks[stack][key] for name, stack, key in POOL_ENV}


def render(environment: Mapping[str, str]) -> str:
    """`NAME=value` lines, as kustomize's configMapGenerator `envs` reads them."""
    return "".join(f"{name}={value}\n" for name, value in environment.items())


def main(argv: Sequence[str] | None = None) -> int:
    """Print the pool.env of a pool."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline-stack", required=True, help="stack of pipeline.yaml")
    parser.add_argument("--pool-stack", required=True, help="stack of pool.yaml for this pool")
    args = parser.parse_args(argv)
    cloudformation = boto3.client("cloudformation")
    environment = pool_environment(
        stack_outputs(cloudformation, args.pipeline_stack),
        stack_outputs(cloudformation, args.pool_stack),
    )
    sys.stdout.write(render(environment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
