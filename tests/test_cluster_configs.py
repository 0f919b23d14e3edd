"""The deployment files in cluster/: parse, pin Ray 2.60.0, set CPU/GPU resources, keep token
auth on, hold no secret value and expose no port. No cluster needed.

Each rule is a checker returning a list of problems; every test runs it on the real files
(no problems) and on a deliberately broken copy (a problem), so no test can pass vacuously.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
RAY_IMAGE = re.compile(r"rayproject/ray:2\.60\.0-py311(-gpu)?")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a variable or setting name, not a path
PYTHON_SCRIPT = re.compile(r"\bpython3?\s+([\w./-]+\.py)\b")
GPU = "nvidia.com/gpu"


def load(name: str) -> list[Any]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc is not None]


def kind(docs: list[Any], wanted: str) -> dict:
    return next(doc for doc in docs if doc.get("kind") == wanted)


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) of every mapping entry, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


# ---------------------------------------------------------------- KubeRay structure


def cluster_specs(docs: list[Any]) -> Iterator[tuple[str, dict]]:
    """RayCluster specs: of a RayCluster, and the one a RayJob creates."""
    for doc in docs:
        if doc.get("kind") == "RayCluster":
            yield "RayCluster", doc["spec"]
        elif doc.get("kind") == "RayJob" and "rayClusterSpec" in doc["spec"]:
            yield "RayJob.rayClusterSpec", doc["spec"]["rayClusterSpec"]


def pod_specs(docs: list[Any]) -> Iterator[tuple[str, dict]]:
    """Every pod spec that runs Ray: head, worker groups, and a RayJob's submitter."""
    for where, spec in cluster_specs(docs):
        yield f"{where}.head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{where}.{group['groupName']}", group["template"]["spec"]
    for doc in docs:
        if doc.get("kind") == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            yield "RayJob.submitter", doc["spec"]["submitterPodTemplate"]["spec"]


def containers(docs: list[Any]) -> Iterator[tuple[str, dict]]:
    for where, pod in pod_specs(docs):
        for container in pod["containers"]:
            yield f"{where}.{container['name']}", container


def worker_groups(docs: list[Any]) -> Iterator[tuple[str, dict]]:
    for where, spec in cluster_specs(docs):
        for group in spec.get("workerGroupSpecs", []):
            yield f"{where}.{group['groupName']}", group


# ---------------------------------------------------------------- checkers


def image_problems(docs: list[Any]) -> list[str]:
    problems = [f"{path}: {value!r} is not rayproject/ray:2.60.0-py311[-gpu]"
                for path, key, value in walk(docs)
                if key in ("image", "head_image", "worker_image") and not RAY_IMAGE.fullmatch(str(value))]
    problems += [f"{where}.rayVersion: {spec.get('rayVersion')!r} is not '2.60.0'"
                 for where, spec in cluster_specs(docs) if spec.get("rayVersion") != "2.60.0"]
    return problems


def resource_problems(docs: list[Any]) -> list[str]:
    """Ray containers have CPU and memory requests and limits; there is a CPU worker group and
    a GPU one whose limits ask for nvidia.com/gpu on a -gpu image (and only there)."""
    problems = []
    for where, container in containers(docs):
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in container.get("resources", {}).get(part, {}):
                    problems.append(f"{where}: no {part}.{resource}")
        wants_gpu = GPU in container.get("resources", {}).get("limits", {})
        if wants_gpu != container["image"].endswith("-gpu"):
            problems.append(f"{where}: {GPU} limit and -gpu image must go together")
    for where, _ in cluster_specs(docs):
        gpu_flags = [any(GPU in c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"])
                     for w, g in worker_groups(docs) if w.startswith(f"{where}.")]
        if True not in gpu_flags or False not in gpu_flags:
            problems.append(f"{where}: needs a CPU worker group and a GPU worker group ({GPU} in limits)")
    return problems


def token_problems(docs: list[Any]) -> list[str]:
    """Every Ray container (and the autoscaler) runs RAY_AUTH_MODE=token with RAY_AUTH_TOKEN
    from a Secret."""
    envs = [(where, c.get("env", [])) for where, c in containers(docs)]
    envs += [(f"{where}.autoscalerOptions", spec.get("autoscalerOptions", {}).get("env", []))
             for where, spec in cluster_specs(docs) if spec.get("enableInTreeAutoscaling")]
    problems = []
    for where, env in envs:
        by_name = {item["name"]: item for item in env}
        if by_name.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{where}: RAY_AUTH_MODE is not 'token'")
        ref = by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if not (ref.get("name") and ref.get("key")):
            problems.append(f"{where}: RAY_AUTH_TOKEN does not come from a secretKeyRef")
    return problems


def secret_problems(text: str, docs: list[Any]) -> list[str]:
    """No literal secret: no AWS key id in the text, no Secret manifest with data, no env entry or
    key named like a credential with a literal value."""
    problems = [f"looks like an AWS access key id: {m.group(0)[:4]}..." for m in AWS_KEY_ID.finditer(text)]
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"Secret {doc['metadata']['name']}: holds values; create it with kubectl instead")
    for path, key, value in walk(docs):
        if key == "name" and isinstance(value, str) and any(w in value.upper() for w in SECRET_WORDS):
            parent = _lookup(docs, path.rsplit(".", 1)[0])
            if isinstance(parent, dict) and "value" in parent:
                problems.append(f"{path}: {value} has a literal value")
        elif (isinstance(key, str) and ENV_NAME.fullmatch(key) and any(w in key.upper() for w in SECRET_WORDS)
              and isinstance(value, (str, int))):
            problems.append(f"{path}: credential-like key with a literal value")
    return problems


def _lookup(root: Any, path: str) -> Any:
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        root = root[part[0]] if part[0] else root[int(part[1])]
    return root


def exposure_problems(docs: list[Any]) -> list[str]:
    """KubeRay: head and any Service are ClusterIP. Autoscaler: every node type uses a given
    security group (Ray's default one opens SSH to the world) and no rule opens 0.0.0.0/0."""
    problems = [f"{where}: serviceType {spec['headGroupSpec'].get('serviceType')!r}"
                for where, spec in cluster_specs(docs)
                if spec["headGroupSpec"].get("serviceType", "ClusterIP") != "ClusterIP"]
    problems += [f"Service {doc['metadata']['name']}: type {doc['spec'].get('type')!r}"
                 for doc in docs if doc.get("kind") == "Service" and doc["spec"].get("type", "ClusterIP") != "ClusterIP"]
    problems += [f"{path}: {value!r}" for path, key, value in walk(docs)
                 if key in ("serviceType", "type") and value in ("LoadBalancer", "NodePort")]
    for doc in docs:
        for name, node_type in doc.get("available_node_types", {}).items() if "provider" in doc else ():
            if not node_type["node_config"].get("SecurityGroupIds"):
                problems.append(f"{name}: no SecurityGroupIds (Ray would create a group with SSH open to all)")
    problems += [f"{path}: opens {value}" for path, key, value in walk(docs)
                 if key in ("CidrIp", "CidrIpv6") and value in ("0.0.0.0/0", "::/0")]
    return problems


def s3_access_problems(docs: list[Any]) -> list[str]:
    """Every Ray pod reaches S3 without inline keys: an IRSA service account or an envFrom Secret."""
    irsa = {doc["metadata"]["name"] for doc in docs if doc.get("kind") == "ServiceAccount"
            and doc["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")}
    problems = []
    for where, pod in pod_specs(docs):
        if where.endswith(".submitter"):
            continue  # submits over HTTP only; the job's code is fetched by the head
        from_secret = all(any("secretRef" in e for e in c.get("envFrom", [])) for c in pod["containers"])
        if pod.get("serviceAccountName") not in irsa and not from_secret:
            problems.append(f"{where}: no IRSA service account and no envFrom secretRef for S3")
    for doc in docs:
        for name, node_type in doc.get("available_node_types", {}).items() if "provider" in doc else ():
            if not node_type["node_config"].get("IamInstanceProfile"):
                problems.append(f"{name}: no IamInstanceProfile for S3")
    return problems


def entrypoint_problems(text: str) -> list[str]:
    """Every `python some/script.py` named in cluster/ exists in the repository."""
    return [f"{script}: not in the repository" for script in PYTHON_SCRIPT.findall(text)
            if not (REPO / script).is_file()]


# ---------------------------------------------------------------- the tests

KUBE = ["raycluster.yaml", "rayjob.yaml"]
ALL_YAML = sorted(p.name for p in CLUSTER.glob("*.y*ml"))


def bad_copy(docs: list[Any], edit: Callable[[list[Any]], None]) -> list[Any]:
    broken = copy.deepcopy(docs)
    edit(broken)
    return broken


def first_worker(docs: list[Any], group: str) -> dict:
    return next(g for _, g in worker_groups(docs) if g["groupName"] == group)["template"]["spec"]["containers"][0]


def test_cluster_folder_has_every_file():
    assert {"raycluster.yaml", "rayjob.yaml", "aws-autoscaler.yaml", "runtime_env.yaml", "networkpolicy.yaml"} <= set(ALL_YAML)


@pytest.mark.parametrize("name", ALL_YAML)
def test_every_yaml_parses(name):
    docs = load(name)
    assert docs and all(isinstance(doc, dict) for doc in docs)
    for doc in docs:  # strings that are YAML themselves parse too
        if doc.get("kind") == "RayJob":
            assert isinstance(yaml.safe_load(doc["spec"]["runtimeEnvYAML"]), dict)
    with pytest.raises(yaml.YAMLError):
        list(yaml.safe_load_all("spec: [unclosed\n  key: value"))


@pytest.mark.parametrize("name", ALL_YAML)
def test_images_pin_ray_2_60_0(name):
    docs = load(name)
    assert image_problems(docs) == []
    assert image_problems([{"spec": {"containers": [{"name": "x", "image": "rayproject/ray:2.9.0"}]}}])
    assert image_problems([{"docker": {"image": "rayproject/ray:latest-gpu"}}])


@pytest.mark.parametrize("name", KUBE)
def test_cpu_and_gpu_resources_are_set(name):
    docs = load(name)
    assert resource_problems(docs) == []
    assert resource_problems(bad_copy(docs, lambda d: first_worker(d, "gpu")["resources"]["limits"].pop(GPU)))
    assert resource_problems(bad_copy(docs, lambda d: first_worker(d, "cpu")["resources"].pop("requests")))


def test_autoscaler_yaml_passes_rays_own_validation():
    """Ray's cluster launcher fills in the AWS defaults and validates against its schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("aws-autoscaler.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    gpu = [name for name, t in types.items() if t.get("docker", {}).get("worker_image", "").endswith("-gpu")]
    cpu = [name for name in types if name != config["head_node_type"] and name not in gpu]
    assert gpu and cpu and re.match(r"[gp]\d", types[gpu[0]]["node_config"]["InstanceType"])
    broken = bad_copy([config], lambda d: d[0]["available_node_types"]["ray.worker.cpu"].update(bogus=1))[0]
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", KUBE)
def test_ray_token_comes_from_a_secret(name):
    docs = load(name)
    assert token_problems(docs) == []
    assert token_problems(bad_copy(docs, lambda d: first_worker(d, "cpu").pop("env")))
    assert token_problems(bad_copy(docs, lambda d: first_worker(d, "gpu").update(
        env=[{"name": "RAY_AUTH_MODE", "value": "token"}, {"name": "RAY_AUTH_TOKEN", "value": "literal"}])))


def test_autoscaler_keeps_token_auth_on():
    config = load("aws-autoscaler.yaml")[0]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in command for command in config[key])
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "RAY_AUTH_MODE=disabled" not in "\n".join(p.read_text() for p in CLUSTER.iterdir())


@pytest.mark.parametrize("name", [*ALL_YAML, "README.md"])
def test_no_inline_secret_values(name):
    text = (CLUSTER / name).read_text()
    docs = load(name) if name.endswith(".yaml") else []
    assert secret_problems(text, docs) == []
    fake_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert secret_problems(f"aws_access_key_id = {fake_id}\n", [])
    assert secret_problems("", [{"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "s3cr3t"}]}])
    assert secret_problems("", [{"env_vars": {"AWS_ACCESS_KEY_ID": "x"}}])
    assert secret_problems("", [{"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}}])


@pytest.mark.parametrize("name", [*KUBE, "aws-autoscaler.yaml"])
def test_nothing_is_exposed(name):
    docs = load(name)
    assert exposure_problems(docs) == []
    if name in KUBE:
        assert exposure_problems(bad_copy(docs, lambda d: next(cluster_specs(d))[1]["headGroupSpec"].update(
            serviceType="LoadBalancer")))
    else:
        assert exposure_problems(bad_copy(docs, lambda d: d[0]["available_node_types"]["ray.worker.gpu"][
            "node_config"].pop("SecurityGroupIds")))
    assert exposure_problems([{"kind": "Service", "metadata": {"name": "s"}, "spec": {"type": "NodePort"}}])
    assert exposure_problems([{"provider": {"security_group": {"IpPermissions": [
        {"FromPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}}}])


@pytest.mark.parametrize("name", [*KUBE, "aws-autoscaler.yaml"])
def test_s3_access_without_keys(name):
    docs = load(name)
    assert s3_access_problems(docs) == []

    def strip_access(d: list[Any]) -> None:
        for doc in d:
            for node_type in doc.get("available_node_types", {}).values():
                node_type["node_config"].pop("IamInstanceProfile")
            if doc.get("kind") == "ServiceAccount":
                doc["metadata"]["annotations"].clear()
        for _, container in containers(d):
            container.pop("envFrom", None)
    assert s3_access_problems(bad_copy(docs, strip_access))


def test_entrypoints_exist():
    texts = "\n".join(p.read_text() for p in sorted(CLUSTER.iterdir()) if p.is_file())
    job = kind(load("rayjob.yaml"), "RayJob")
    assert "jobs/pipeline.py" in shlex.split(job["spec"]["entrypoint"])
    assert PYTHON_SCRIPT.findall(texts) and entrypoint_problems(texts) == []
    assert entrypoint_problems("ray job submit -- python jobs/nope.py --store s3://b")


def runtime_env_problems(runtime_env: dict, job_env: dict) -> list[str]:
    """runtime_env.yaml installs exactly pyproject's dependencies and its train extra (the
    requirements files it reads; ray comes with the image),
    the RayJob's runtimeEnvYAML differs from it only in where the code comes from, and Ray
    itself accepts both."""
    from ray.runtime_env import RuntimeEnv

    problems = []
    dynamic = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    files = dynamic["dependencies"]["file"] + dynamic["optional-dependencies"]["train"]["file"]
    deps = [line.split("#")[0].strip() for name in files for line in (REPO / name).read_text().splitlines()
            if line.split("#")[0].strip()]
    wanted = [d for d in deps if not re.match(r"ray\b", d)]
    if runtime_env.get("pip", {}).get("packages") != wanted:
        problems.append(f"runtime_env pip packages differ from pyproject dependencies and train extra without ray: {wanted}")
    if runtime_env.get("working_dir") != ".":
        problems.append("runtime_env working_dir is not '.'")
    code_fields = ("working_dir", "excludes")
    if {k: v for k, v in runtime_env.items() if k not in code_fields} != \
            {k: v for k, v in job_env.items() if k not in code_fields}:
        problems.append("RayJob runtimeEnvYAML differs from runtime_env.yaml beyond working_dir")
    if not str(job_env.get("working_dir", "")).endswith(".zip"):
        problems.append("RayJob working_dir must be a .zip URI (a cluster has no local checkout)")
    for env in (runtime_env, job_env):
        try:
            RuntimeEnv(**env)
        except Exception as exc:
            problems.append(f"Ray rejects the runtime_env: {exc}")
    return problems


def test_runtime_envs_match_the_project():
    runtime_env = load("runtime_env.yaml")[0]
    job_env = yaml.safe_load(kind(load("rayjob.yaml"), "RayJob")["spec"]["runtimeEnvYAML"])
    assert runtime_env_problems(runtime_env, job_env) == []
    short = copy.deepcopy(runtime_env)
    short["pip"]["packages"].pop()
    assert runtime_env_problems(short, job_env)
    assert runtime_env_problems(runtime_env, {**job_env, "working_dir": "."})
    assert runtime_env_problems(runtime_env, {**job_env, "pip": "not-a-list-or-file.txt", "conda": "x"})


def test_rayjob_cluster_is_raycluster():
    """rayjob.yaml repeats raycluster.yaml's spec and ServiceAccount (YAML cannot include);
    this keeps the two from drifting apart."""
    cluster, job = load("raycluster.yaml"), load("rayjob.yaml")
    assert kind(job, "RayJob")["spec"]["rayClusterSpec"] == kind(cluster, "RayCluster")["spec"]
    assert kind(job, "ServiceAccount") == kind(cluster, "ServiceAccount")
    assert kind(job, "RayJob")["spec"]["shutdownAfterJobFinishes"] is True


# ---------------------------------------------------------------- who may connect

POD_LABEL = ("app.kubernetes.io/part-of", "mdfer")


def pod_templates(docs: list[Any]) -> Iterator[tuple[str, dict]]:
    """Every pod template of a RayCluster/RayJob: head, worker groups, the RayJob's submitter."""
    for where, spec in cluster_specs(docs):
        yield f"{where}.head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{where}.{group['groupName']}", group["template"]
    for doc in docs:
        if doc.get("kind") == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            yield "RayJob.submitter", doc["spec"]["submitterPodTemplate"]


def network_policy_problems(policy: dict, pods: list[tuple[str, dict]]) -> list[str]:
    """The policy selects every mdfer pod and admits only those pods (any port) and the KubeRay
    operator (the job API port only): no ipBlock, no rule open to everyone."""
    problems = []
    selector = policy["spec"]["podSelector"].get("matchLabels", {})
    for where, template in pods:
        labels = template.get("metadata", {}).get("labels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{where}: not selected by the NetworkPolicy")
    if "Ingress" not in policy["spec"].get("policyTypes", []):
        problems.append("policyTypes has no Ingress")
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from")
        if not peers:
            problems.append("an ingress rule open to every source")
            continue
        for peer in peers:
            if "ipBlock" in peer:
                problems.append(f"an ipBlock source: {peer['ipBlock']}")
            labels = peer.get("podSelector", {}).get("matchLabels", {})
            own = labels == selector and "namespaceSelector" not in peer
            operator = labels.get("app.kubernetes.io/name") == "kuberay-operator"
            if not own and not operator:
                problems.append(f"a source that is neither the cluster's pods nor the operator: {peer}")
            if operator and [p.get("port") for p in rule.get("ports", [])] != [8265]:
                problems.append(f"the operator is admitted beyond the job API port: {rule.get('ports')}")
    return problems


def test_network_policy_admits_only_the_clusters_own_pods():
    policy = kind(load("networkpolicy.yaml"), "NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    pods = [p for name in KUBE for p in pod_templates(load(name))]
    assert len(pods) == 7  # RayCluster: head + 2 groups; RayJob: head + 2 groups + submitter
    assert network_policy_problems(policy, pods) == []
    # each mistake is caught: a pod left out, a rule open to all, an outside address range
    unlabelled = copy.deepcopy(pods)
    unlabelled[1][1]["metadata"]["labels"].clear()
    assert network_policy_problems(policy, unlabelled) == [f"{unlabelled[1][0]}: not selected by the NetworkPolicy"]
    assert "an ingress rule open to every source" in network_policy_problems(
        bad_copy([policy], lambda d: d[0]["spec"]["ingress"].append({}))[0], pods)
    assert any("ipBlock" in p for p in network_policy_problems(
        bad_copy([policy], lambda d: d[0]["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}))[0],
        pods))
    assert any("beyond the job API port" in p for p in network_policy_problems(
        bad_copy([policy], lambda d: d[0]["spec"]["ingress"][1].pop("ports"))[0], pods))
