"""infra/ checked offline: the linters and schemas CI runs, and the rules the manifests must keep.

The CloudFormation templates go through cfn-lint and checkov; each Kustomize overlay is rendered
with `kubectl kustomize`, every built-in object is validated by `kubernetes-validate --strict`,
the KEDA and Karpenter objects by the upstream CRD schemas in `../shared/crds/`, and everything
through checkov and yamllint. The rules below pin what the pipeline relies on: shutdown budgets,
one job per pod, the names that tie the manifests to the CloudFormation stacks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cfnlint.decode import decode

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
TEMPLATES = INFRA / "cloudformation"
K8S = INFRA / "k8s"
CRDS = REPO.parent / "shared" / "crds"
POOLS = ("a1111", "comfyui", "diffusers")
BUILDS = (*POOLS, "cluster")
# Native sidecars (restartPolicy on init containers) are on by default from 1.29.
KUBERNETES_VERSION = "1.29.0"
SPOT_NOTICE_BUDGET_S = 110  # facts.md: 90-110 s of grace fit the two-minute Spot notice
BINARIES = Path(sys.executable).parent
Doc = dict[str, Any]


def _tool(name: str) -> Path | None:
    """A command from this virtualenv, checkov's own virtualenv (.venv/tools), or the PATH."""
    for candidate in (BINARIES / name, REPO / ".venv" / "tools" / "bin" / name):
        if candidate.exists():
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def _kustomize(path: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    """Every overlay and the cluster kustomization, rendered once."""
    return {
        name: _kustomize(K8S / ("cluster" if name == "cluster" else f"overlays/{name}"))
        for name in BUILDS
    }


def _one(docs: list[Doc], kind: str) -> Doc:
    [found] = [doc for doc in docs if doc["kind"] == kind]
    return found


def _pod(docs: list[Doc]) -> Doc:
    spec: Doc = _one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def _env(container: Doc) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def _pool_config(docs: list[Doc]) -> dict[str, str]:
    [config] = [
        doc
        for doc in docs
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("sdworker-pool-")
    ]
    data: dict[str, str] = config["data"]
    return data


def _template(name: str) -> Doc:
    template, problems = decode(str(TEMPLATES / name))
    assert not problems, problems
    return dict(template)


# --- CloudFormation -------------------------------------------------------------------------


def test_cfn_lint_accepts_every_template() -> None:
    """cfn-lint finds no error or warning in any template."""
    cfn_lint = _tool("cfn-lint")
    if cfn_lint is None:
        pytest.skip("cfn-lint is not installed (make install adds it)")
    result = subprocess.run(
        [str(cfn_lint), *map(str, sorted(TEMPLATES.glob("*.yaml")))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_pool_queue_keeps_failed_jobs_through_spot_hand_backs() -> None:
    """The job queue redrives to its DLQ only after 10 receives, with SSE on both queues."""
    template = _template("pool.yaml")
    queue = template["Resources"]["JobQueue"]["Properties"]
    dlq = template["Resources"]["DeadLetterQueue"]["Properties"]
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]},
        "maxReceiveCount": {"Ref": "MaxReceiveCount"},
    }
    assert template["Parameters"]["MaxReceiveCount"]["Default"] == 10
    assert queue["SqsManagedSseEnabled"] is True and dlq["SqsManagedSseEnabled"] is True


def test_each_pool_alarms_on_dlq_depth_and_on_the_oldest_jobs_age() -> None:
    """One alarm watches the DLQ's visible messages, one the job queue's oldest message."""
    resources = _template("pool.yaml")["Resources"]
    alarms = {
        (props["MetricName"], props["Dimensions"][0]["Value"]["Fn::GetAtt"][0])
        for props in (
            r["Properties"] for r in resources.values() if r["Type"] == "AWS::CloudWatch::Alarm"
        )
    }
    assert alarms == {
        ("ApproximateNumberOfMessagesVisible", "DeadLetterQueue"),
        ("ApproximateAgeOfOldestMessage", "JobQueue"),
    }


def test_each_pool_queue_subscribes_to_its_backend_only() -> None:
    """The subscription filters the input topic on `backend` equal to the pool's name."""
    subscription = _template("pool.yaml")["Resources"]["InputSubscription"]["Properties"]
    assert subscription["FilterPolicy"] == {"backend": [{"Ref": "Pool"}]}
    assert subscription["FilterPolicyScope"] == "MessageAttributes"
    assert subscription["Endpoint"] == {"Fn::GetAtt": ["JobQueue", "Arn"]}


def test_the_worker_role_grants_only_what_sdworker_calls() -> None:
    """The pods' role may consume its queue, fill its DLQ, write results, read inputs, publish."""
    role = _template("pool.yaml")["Resources"]["WorkerRole"]["Properties"]
    [policy] = role["Policies"]
    granted = {
        statement["Sid"]: (sorted(_as_list(statement["Action"])), statement["Resource"])
        for statement in policy["PolicyDocument"]["Statement"]
    }
    assert granted["ConsumeJobs"] == (
        [
            "sqs:ChangeMessageVisibility",
            "sqs:DeleteMessage",
            "sqs:GetQueueAttributes",
            "sqs:ReceiveMessage",
        ],
        {"Fn::GetAtt": ["JobQueue", "Arn"]},
    )
    assert granted["KeepFailedJobs"] == (
        ["sqs:GetQueueAttributes", "sqs:SendMessage"],
        {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]},
    )
    assert granted["WriteResults"][0] == ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"]
    assert granted["ReadInputs"][0] == ["s3:GetObject"]
    assert granted["AnnounceResults"][0] == ["sns:Publish"]
    assert all(resource != "*" for _, resource in granted.values())
    assert granted["WriteResults"][1]["Fn::Sub"][0].endswith(":::${Bucket}/${Prefix}/*")


def test_the_worker_role_trusts_only_the_pools_service_account() -> None:
    """Pod Identity may hand the role only to sdworker-<pool> in the pool's namespace."""
    template = _template("pool.yaml")
    [statement] = template["Resources"]["WorkerRole"]["Properties"]["AssumeRolePolicyDocument"][
        "Statement"
    ]
    assert statement["Principal"] == {"Service": "pods.eks.amazonaws.com"}
    conditions = statement["Condition"]["StringEquals"]
    assert conditions["aws:RequestTag/kubernetes-service-account"] == {
        "Fn::Sub": "sdworker-${Pool}"
    }
    association = template["Resources"]["WorkerPodIdentity"]["Properties"]
    assert association["ServiceAccount"] == {"Fn::Sub": "sdworker-${Pool}"}


def test_the_results_bucket_is_private_and_encrypted_with_the_pipeline_key() -> None:
    """All four public-access blocks are on and objects are encrypted with the KMS key."""
    bucket = _template("pipeline.yaml")["Resources"]["ResultsBucket"]["Properties"]
    assert set(bucket["PublicAccessBlockConfiguration"].values()) == {True}
    [rule] = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": {"Fn::GetAtt": ["PipelineKey", "Arn"]},
    }


def test_results_and_inputs_expire_after_the_retention_period() -> None:
    """Lifecycle rules expire both prefixes after ResultRetentionDays and stale uploads."""
    bucket = _template("pipeline.yaml")["Resources"]["ResultsBucket"]["Properties"]
    rules = {rule["Id"]: rule for rule in bucket["LifecycleConfiguration"]["Rules"]}
    assert rules["expire-results"]["Prefix"] == {"Fn::Sub": "${ResultsPrefix}/"}
    assert rules["expire-inputs"]["Prefix"] == {"Fn::Sub": "${InputsPrefix}/"}
    assert {rules[name]["ExpirationInDays"]["Ref"] for name in rules if "expire-" in name} == {
        "ResultRetentionDays"
    }
    assert rules["abort-incomplete-uploads"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 1
    }


def test_the_api_requires_a_key_on_both_routes_and_is_throttled() -> None:
    """POST /jobs and GET /jobs/{id} need an API key; the stage and usage plan throttle."""
    resources = _template("pipeline.yaml")["Resources"]
    methods = [
        r["Properties"] for r in resources.values() if r["Type"] == "AWS::ApiGateway::Method"
    ]
    assert sorted(m["HttpMethod"] for m in methods) == ["GET", "POST"]
    assert all(m["ApiKeyRequired"] is True for m in methods)
    [setting] = resources["ApiStage"]["Properties"]["MethodSettings"]
    assert setting["ThrottlingRateLimit"] == {"Ref": "ApiRateLimit"}
    assert resources["ApiUsagePlan"]["Properties"]["Throttle"]["RateLimit"] == {
        "Ref": "ApiRateLimit"
    }


def test_karpenter_interruption_events_all_reach_its_queue() -> None:
    """Spot warnings, rebalance, health and state-change events each have a rule to the queue."""
    resources = _template("karpenter-interruption.yaml")["Resources"]
    rules = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::Events::Rule"]
    assert sorted(rule["EventPattern"]["detail-type"][0] for rule in rules) == [
        "AWS Health Event",
        "EC2 Instance Rebalance Recommendation",
        "EC2 Instance State-change Notification",
        "EC2 Spot Instance Interruption Warning",
    ]
    assert all(
        rule["Targets"]
        == [
            {
                "Id": "KarpenterInterruptionQueue",
                "Arn": {"Fn::GetAtt": ["InterruptionQueue", "Arn"]},
            }
        ]
        for rule in rules
    )


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


_IMPORT_GUARD = """
import importlib.abc, sys
ZIP = {"sdworker_api", "sdworker", "pydantic", "pydantic_core", "pluggy", "typing_extensions",
       "annotated_types", "typing_inspection"}
RUNTIME = {"boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six"}

class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ZIP | RUNTIME or top.startswith("_"):
            return None
        raise ImportError(f"{name} is neither in the zip nor in the Lambda runtime")

sys.meta_path.insert(0, Guard())
sys.path.insert(0, sys.argv[1])
import sdworker_api
sdworker_api.ApiConfig.from_env({"POOLS": "a", "INPUT_TOPIC_ARN": "t", "RESULTS_BUCKET": "b"})
"""


def test_the_api_function_imports_only_what_its_zip_and_runtime_hold() -> None:
    """build.sh packs sdworker, pydantic and pluggy; anything else sdworker.jobs needs breaks it."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_GUARD, str(INFRA / "api")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes -----------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_kubernetes_validate_strict_accepts_every_builtin_object(
    rendered: dict[str, list[Doc]], build: str
) -> None:
    """Every object of a rendered build that is not a KEDA or Karpenter one passes --strict."""
    builtin = [doc for doc in rendered[build] if not _is_crd_object(doc)]
    assert builtin
    for doc in builtin:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _is_crd_object(doc: Doc) -> bool:
    return str(doc["apiVersion"]).split("/")[0] in {"keda.sh", "karpenter.sh", "karpenter.k8s.aws"}


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) → the served storage version's schema, from ../shared/crds."""
    if not CRDS.is_dir():
        pytest.skip(
            f"no upstream CRDs at {CRDS}: they are kept outside the repository, in shared/crds"
        )
    schemas: dict[tuple[str, str], Doc] = {}
    for path in sorted(CRDS.rglob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"] and version["storage"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def _crd_objects(rendered: dict[str, list[Doc]]) -> Iterator[Doc]:
    for docs in rendered.values():
        yield from (doc for doc in docs if _is_crd_object(doc))


def test_keda_and_karpenter_objects_match_the_upstream_crd_schemas(
    rendered: dict[str, list[Doc]], crd_schemas: dict[tuple[str, str], Doc]
) -> None:
    """ScaledObjects, TriggerAuthentications, the NodePool and EC2NodeClass validate."""
    kinds = set()
    for doc in _crd_objects(rendered):
        schema = crd_schemas[(doc["apiVersion"], doc["kind"])]
        errors = [error.message for error in jsonschema.Draft4Validator(schema).iter_errors(doc)]
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors}"
        kinds.add(doc["kind"])
    assert kinds == {"ScaledObject", "TriggerAuthentication", "NodePool", "EC2NodeClass"}


def test_keda_and_karpenter_objects_use_no_field_their_schemas_lack(
    rendered: dict[str, list[Doc]], crd_schemas: dict[tuple[str, str], Doc]
) -> None:
    """A misspelt field, which plain jsonschema lets through, is caught here."""
    for doc in _crd_objects(rendered):
        schema = crd_schemas[(doc["apiVersion"], doc["kind"])]
        unknown = list(_unknown_fields(doc, schema, doc["kind"]))
        assert not unknown, unknown


def _unknown_fields(value: Any, schema: Doc, where: str) -> Iterator[str]:
    """Paths in `value` that an object schema with fixed properties does not name."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from _unknown_fields(item, schema.get("items", {}), f"{where}[{index}]")
    if not isinstance(value, dict) or "properties" not in schema:
        return
    if where.endswith(".metadata"):
        return  # ObjectMeta is left open in CRD schemas and checked by the API server
    for key, item in value.items():
        if key not in schema["properties"]:
            yield f"{where}.{key}"
        else:
            yield from _unknown_fields(item, schema["properties"][key], f"{where}.{key}")


@pytest.mark.parametrize("pool", POOLS)
def test_the_grace_period_outlasts_sdworkers_shutdown_and_fits_the_spot_notice(
    rendered: dict[str, list[Doc]], pool: str
) -> None:
    """Grace ≥ shutdown deadline + backend grace + 5 s, and ≤ the Spot notice's budget."""
    pod = _pod(rendered[pool])
    env = _env(_sdworker(pod))
    needed = float(env["SDWORKER_SHUTDOWN_DEADLINE"]) + float(env["SDWORKER_BACKEND_GRACE"]) + 5
    assert needed <= pod["terminationGracePeriodSeconds"] <= SPOT_NOTICE_BUDGET_S


def _sdworker(pod: Doc) -> Doc:
    [container] = [c for c in pod["containers"] if c["name"] == "sdworker"]
    return container


@pytest.mark.parametrize(("pool", "runtime"), [("a1111", "webui"), ("comfyui", "comfyui")])
def test_the_runtime_is_a_native_sidecar_with_the_gpu_and_a_startup_probe(
    rendered: dict[str, list[Doc]], pool: str, runtime: str
) -> None:
    """The runtime starts first and stops last; sdworker is the only main container."""
    pod = _pod(rendered[pool])
    [sidecar] = pod["initContainers"]
    assert sidecar["name"] == runtime and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["port"] == sidecar["ports"][0]["name"]
    assert sidecar["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert [c["name"] for c in pod["containers"]] == ["sdworker"]
    assert "nvidia.com/gpu" not in _sdworker(pod)["resources"]["limits"]
    port = sidecar["ports"][0]["containerPort"]
    assert _env(_sdworker(pod))["SDWORKER_BACKEND_URL"] == f"http://127.0.0.1:{port}"


def test_the_diffusers_pool_gives_sdworker_the_gpu_alone(rendered: dict[str, list[Doc]]) -> None:
    """No sidecar: sdworker holds the GPU and reads its model from the models volume."""
    pod = _pod(rendered["diffusers"])
    assert "initContainers" not in pod
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env(container)["SDWORKER_DIFFUSERS_MODEL"].startswith("/models/")


@pytest.mark.parametrize("pool", POOLS)
def test_each_pool_scales_one_job_per_pod_on_its_own_queue(
    rendered: dict[str, list[Doc]], pool: str
) -> None:
    """KEDA scales the pool's Deployment from zero, one message (in flight or not) per pod."""
    docs = rendered[pool]
    scaled, config = _one(docs, "ScaledObject"), _pool_config(docs)
    [trigger] = scaled["spec"]["triggers"]
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["scaleTargetRef"]["name"] == _one(docs, "Deployment")["metadata"]["name"]
    assert trigger["type"] == "aws-sqs-queue"
    assert trigger["metadata"] == {
        "queueURL": config["SDWORKER_QUEUE_URL"],
        "awsRegion": config["AWS_REGION"],
        "queueLength": "1",
        "activationQueueLength": "0",
        "scaleOnInFlight": "true",
    }
    assert _env(_sdworker(_pod(docs)))["SDWORKER_PREFETCH"] == "0"


@pytest.mark.parametrize("pool", POOLS)
def test_keda_reads_the_queue_with_the_pools_scaler_role(
    rendered: dict[str, list[Doc]], pool: str
) -> None:
    """The TriggerAuthentication uses AWS pod identity with the role named in pool.env."""
    docs = rendered[pool]
    auth = _one(docs, "TriggerAuthentication")
    assert auth["spec"]["podIdentity"] == {
        "provider": "aws",
        "roleArn": _pool_config(docs)["KEDA_ROLE_ARN"],
    }
    [trigger] = _one(docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


@pytest.mark.parametrize("pool", POOLS)
def test_the_pods_run_as_the_service_account_the_pool_stack_binds(
    rendered: dict[str, list[Doc]], pool: str
) -> None:
    """The service account is sdworker-<pool>, as pool.yaml's Pod Identity association names it."""
    docs = rendered[pool]
    account = _one(docs, "ServiceAccount")["metadata"]["name"]
    assert account == f"sdworker-{pool}" == _pod(docs)["serviceAccountName"]
    assert _pool_config(docs)["SDWORKER_BACKEND"] == pool


@pytest.mark.parametrize("pool", POOLS)
def test_every_container_runs_unprivileged(rendered: dict[str, list[Doc]], pool: str) -> None:
    """Non-root, no privilege escalation, no capabilities; sdworker's root filesystem read-only."""
    pod = _pod(rendered[pool])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
    assert _sdworker(pod)["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("pool", POOLS)
def test_models_are_mounted_read_only(rendered: dict[str, list[Doc]], pool: str) -> None:
    """Every mount of the models volume is read-only, and so is the claim."""
    pod = _pod(rendered[pool])
    [volume] = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"] == {"claimName": "sdworker-models", "readOnly": True}
    mounts = [
        mount
        for container in [*pod.get("initContainers", []), *pod["containers"]]
        for mount in container.get("volumeMounts", [])
        if mount["name"] == "models"
    ]
    assert mounts and all(mount["readOnly"] is True for mount in mounts)


@pytest.mark.parametrize("pool", POOLS)
def test_sdworkers_probes_use_its_health_port(rendered: dict[str, list[Doc]], pool: str) -> None:
    """Liveness /healthz and readiness /readyz go to the port SDWORKER_HEALTH_PORT names."""
    container = _sdworker(_pod(rendered[pool]))
    [port] = [p for p in container["ports"] if p["name"] == "health"]
    assert str(port["containerPort"]) == _env(container)["SDWORKER_HEALTH_PORT"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_the_without_health_probes_component_removes_sdworkers_probes(tmp_path: Path) -> None:
    """For images without the health server, the component leaves sdworker unprobed."""

    def relative(path: Path) -> str:  # kustomize refuses absolute paths
        return os.path.relpath(path, tmp_path)

    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [relative(K8S / "overlays" / "a1111")],
                "components": [relative(K8S / "components" / "without-health-probes")],
            }
        )
    )
    pod = _pod(_kustomize(tmp_path))
    assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(_sdworker(pod))
    assert "startupProbe" in pod["initContainers"][0]


@pytest.mark.parametrize("pool", POOLS)
def test_pods_land_on_the_gpu_node_pool(rendered: dict[str, list[Doc]], pool: str) -> None:
    """Pods select sdworker-gpu nodes and tolerate their nvidia.com/gpu taint."""
    pod = _pod(rendered[pool])
    [node_pool] = [doc for doc in rendered["cluster"] if doc["kind"] == "NodePool"]
    assert pod["nodeSelector"] == {"karpenter.sh/nodepool": node_pool["metadata"]["name"]}
    [taint] = node_pool["spec"]["template"]["spec"]["taints"]
    assert {"key": taint["key"], "operator": "Exists", "effect": taint["effect"]} in pod[
        "tolerations"
    ]


def test_the_node_pool_takes_gpu_spot_first_with_on_demand_fallback_on_bottlerocket(
    rendered: dict[str, list[Doc]],
) -> None:
    """Spot and on-demand G-family single-GPU nodes, Bottlerocket, only empty nodes consolidated."""
    node_pool = _one(rendered["cluster"], "NodePool")
    node_class = _one(rendered["cluster"], "EC2NodeClass")
    requirements = {
        r["key"]: r["values"] for r in node_pool["spec"]["template"]["spec"]["requirements"]
    }
    assert requirements["karpenter.sh/capacity-type"] == ["spot", "on-demand"]
    assert requirements["karpenter.k8s.aws/instance-family"] == ["g5", "g6", "g6e"]
    assert node_pool["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty"
    assert node_class["spec"]["amiSelectorTerms"] == [{"alias": "bottlerocket@latest"}]
    assert (
        node_pool["spec"]["template"]["spec"]["nodeClassRef"]["name"]
        == (node_class["metadata"]["name"])
    )


def test_the_cluster_values_reach_the_node_class_and_models_volume(
    rendered: dict[str, list[Doc]],
) -> None:
    """cluster.env's names land in the EC2NodeClass and the PV; its ConfigMap is not applied."""
    values = dict(
        line.split("=", 1) for line in (K8S / "cluster" / "cluster.env").read_text().splitlines()
    )
    docs = rendered["cluster"]
    node_class = _one(docs, "EC2NodeClass")["spec"]
    assert node_class["role"] == values["NODE_ROLE"]
    assert node_class["subnetSelectorTerms"] == [
        {"tags": {"karpenter.sh/discovery": values["CLUSTER_NAME"]}}
    ]
    volume = _one(docs, "PersistentVolume")["spec"]
    assert volume["csi"]["volumeAttributes"] == {"bucketName": values["MODELS_BUCKET"]}
    assert f"region {values['AWS_REGION']}" in volume["mountOptions"]
    assert not [doc for doc in docs if doc["kind"] == "ConfigMap"]


# --- Linters over everything -----------------------------------------------------------------


def test_yamllint_accepts_everything_under_infra() -> None:
    """yamllint (infra/.yamllint.yaml) reports nothing."""
    yamllint = _tool("yamllint")
    if yamllint is None:
        pytest.skip("yamllint is not installed (make install adds it)")
    result = subprocess.run(
        [str(yamllint), "--strict", "-c", str(INFRA / ".yamllint.yaml"), str(INFRA)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def checkov(rendered: dict[str, list[Doc]], tmp_path_factory: pytest.TempPathFactory) -> Doc:
    """One checkov run over the templates, the rendered manifests and the Dockerfiles."""
    checkov = _tool("checkov")
    if checkov is None:
        pytest.skip(
            "checkov is not installed: `make install` puts it in .venv/tools (it pins its own "
            "botocore, which clashes with the project's aiobotocore)"
        )
    scanned = tmp_path_factory.mktemp("checkov")
    shutil.copytree(TEMPLATES, scanned / "cloudformation")
    shutil.copytree(INFRA / "docker", scanned / "docker")
    (scanned / "kubernetes").mkdir()
    for name, docs in rendered.items():
        (scanned / "kubernetes" / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [
            str(checkov),
            "--directory",
            str(scanned),
            "--skip-download",
            "--output",
            "json",
            "--framework",
            "cloudformation",
            "kubernetes",
            "dockerfile",
        ],
        capture_output=True,
        text=True,
        check=False,  # exit code 1 means failed checks; the tests below name them
    )
    reports = json.loads(result.stdout)
    return {report["check_type"]: report for report in _as_list(reports)}


@pytest.mark.parametrize("framework", ["cloudformation", "kubernetes", "dockerfile"])
def test_checkov_fails_no_check(checkov: Doc, framework: str) -> None:
    """Every checkov check passes or is skipped with a written reason where it is skipped."""
    report = checkov[framework]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for c in report["results"]["failed_checks"]
    ]
    assert not failed
    assert report["summary"]["passed"] > 0
    skipped = report["results"]["skipped_checks"]
    assert all(len(check["check_result"].get("suppress_comment", "")) > 20 for check in skipped)


def test_no_account_id_or_credential_beyond_placeholders() -> None:
    """Every 12-digit number under infra/ and in the deploy guide is a documented placeholder."""
    placeholders = {"111122223333"}
    files = [p for p in INFRA.rglob("*") if p.is_file()] + [REPO / "docs" / "deploy.md"]
    numbers = {
        (path.name, number)
        for path in files
        for number in re.findall(r"(?<!\d)\d{12}(?!\d)", path.read_text(errors="replace"))
        if number not in placeholders
    }
    assert not numbers
    assert not [p for p in files if re.search(r"AKIA[0-9A-Z]{16}", p.read_text(errors="replace"))]
