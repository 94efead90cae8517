"""The Helm chart with the real helm: lint, render per values file and Kubernetes version,
validate (kubernetes-validate --strict, the KubeRay CRDs) and check what the objects say."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.cli import build_parser
from tests.deploy import checks
from tests.deploy.render import (CHART, KUBE_VERSIONS, VALUES, containers, env_of, helm_template, kinds,
                                 kubernetes_validate, one, validate_custom)
from tests.deploy.tools import run

CASES = [pytest.param(v, k, id=f"{v.name.removesuffix('-values.yaml')}-k{k}") for v in VALUES for k in KUBE_VERSIONS]


def _values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def test_values_files_cover_the_issue():
    assert {v.name for v in VALUES} >= {"defaults-values.yaml", "gpu-pools-values.yaml", "external-redis-values.yaml",
                                        "planner-values.yaml"}


@pytest.mark.parametrize("values, kube", CASES)
def test_lint_strict(values: Path, kube: str):
    out = run("helm", "lint", "--strict", str(CHART), "-f", str(values), "--kube-version", kube).stdout
    assert "0 chart(s) failed" in out and "[ERROR]" not in out and "[WARNING]" not in out, out


@pytest.mark.parametrize("values, kube", CASES)
def test_render_validates(values: Path, kube: str):
    text, docs = helm_template(values, kube)
    assert {"RayCluster", "Deployment", "Service", "ConfigMap"} <= kinds(docs)
    kubernetes_validate(docs, kube)
    validate_custom(docs)
    checks.check_all(text, docs)


@pytest.mark.parametrize("values", VALUES, ids=lambda v: v.name)
def test_launcher(values: Path):
    _, docs = helm_template(values, KUBE_VERSIONS[-1])
    rc = one(docs, "RayCluster")
    mode = _values(values).get("launcher", {}).get("mode", "rayjob")
    head = containers(rc["spec"]["headGroupSpec"]["template"]["spec"])["ray-head"]
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    assert "/etc/pdserve" in mounts, "the launcher (on the head) reads cluster.yaml from the ConfigMap"
    assert "PDSERVE_REDIS_URL" in env_of(head), "the launcher's driver inherits the head's environment"
    if mode == "rayjob":
        job = one(docs, "RayJob")
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["pdserve", "launch"]
        assert build_parser().parse_args(argv[1:]).config == "/etc/pdserve/cluster.yaml"
        assert "command" not in head
    else:
        assert "RayJob" not in kinds(docs)
        assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        script = head["args"][0]
        assert "KUBERAY_GEN_RAY_START_CMD" in script
        assert 'pdserve launch --config /etc/pdserve/cluster.yaml --redis-url "$PDSERVE_REDIS_URL" &' in script
        for g in rc["spec"]["workerGroupSpecs"]:  # KubeRay then leaves the workers' command to us too
            assert "KUBERAY_GEN_RAY_START_CMD" in containers(g["template"]["spec"])["ray-worker"]["args"][0]


def test_configmap_is_the_values_cluster():
    values = CHART / "ci" / "gpu-pools-values.yaml"
    _, docs = helm_template(values, KUBE_VERSIONS[0])
    config = checks.cluster_config(docs)
    want = _values(values)["cluster"]
    assert config.model_dump(include=set(want)) == checks.ClusterConfig.model_validate(want).model_dump(
        include=set(want))
    assert config.redis_url == "redis://pd-pdserve-redis:6379/0"  # internal Redis, no password: not secret


def test_gpu_pools_as_asked():
    values = _values(CHART / "ci" / "gpu-pools-values.yaml")
    _, docs = helm_template(CHART / "ci" / "gpu-pools-values.yaml", KUBE_VERSIONS[0])
    groups = {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}
    assert list(groups) == [p["name"] for p in values["ray"]["pools"]]
    for pool in values["ray"]["pools"]:
        g = groups[pool["name"]]
        assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (
            pool["replicas"], pool.get("minReplicas", pool["replicas"]), pool.get("maxReplicas", pool["replicas"]))
        assert set(g["resources"]) == {f"pdserve_{r}" for r in pool["roles"]}
        spec = g["template"]["spec"]
        res = containers(spec)["ray-worker"]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == pool["gpus"]
        assert res["requests"]["cpu"] == pool["resources"]["requests"]["cpu"]
        assert res["requests"]["memory"] == pool["resources"]["requests"]["memory"]
        assert spec["nodeSelector"] == pool["nodeSelector"] and spec["tolerations"] == pool["tolerations"]
    svc = one(docs, "Service", "-router")
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["ports"][0]["port"] == 443


def test_gpu_pools_keys_and_monitoring():
    _, docs = helm_template(CHART / "ci" / "gpu-pools-values.yaml", KUBE_VERSIONS[0])
    env = env_of(containers(one(docs, "Deployment", "-router")["spec"]["template"]["spec"])["router"])
    assert env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "pdserve-api-keys", "key": "keys"}
    assert env["PDSERVE_ADMIN_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "pdserve-admin-keys",
                                                                         "key": "admin-api-keys"}
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "kube-prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    svc_labels = one(docs, "Service", "-router")["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc_labels.items()
    dashboard = json.loads(one(docs, "ConfigMap", "-dashboard")["data"]["pdserve.json"])
    assert dashboard["uid"] == "pdserve" and len(dashboard["panels"]) >= 8


def test_dashboard_queries_name_real_metrics():
    """Each pdserve: series the dashboard plots is one cluster/metrics.py exports."""
    source = (Path(checks.__file__).resolve().parents[2] / "cluster" / "metrics.py").read_text()
    exported = set(re.findall(r'"(pdserve:[a-z0-9_]+)"', source))
    queried = set(re.findall(r"(pdserve:[a-z0-9_]+)", (CHART / "files" / "grafana-dashboard.json").read_text()))
    suffixes = ("_bucket", "_total")
    missing = {q for q in queried if q not in exported and not any(
        q.endswith(s) and q.removesuffix(s) in exported for s in suffixes)}
    assert queried and not missing, f"dashboard queries unknown metrics: {sorted(missing)}"


def test_network_policy():
    _, docs = helm_template(CHART / "ci" / "gpu-pools-values.yaml", KUBE_VERSIONS[0],
                            "networkPolicy.workerGrpcPorts.port=50051", "networkPolicy.workerGrpcPorts.endPort=50099")
    pols = {d["metadata"]["name"].removeprefix("pd-pdserve-"): d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(pols) == {"ray", "router", "redis"}
    ray_pods = {"ray.io/cluster": "pd-pdserve"}
    router = checks.pod_labels(one(docs, "Deployment", "-router"))
    assert pols["ray"]["podSelector"]["matchLabels"] == ray_pods
    from_ray, from_router, _dashboard = pols["ray"]["ingress"]
    assert from_ray == {"from": [{"podSelector": {"matchLabels": ray_pods}}]}  # workers <-> workers: KV, Ray
    assert from_router["from"][0]["podSelector"]["matchLabels"].items() <= router.items()
    assert from_router["ports"] == [{"protocol": "TCP", "port": 50051, "endPort": 50099}]
    assert pols["redis"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_external_redis_only_from_secret():
    text, docs = helm_template(CHART / "ci" / "external-redis-values.yaml", KUBE_VERSIONS[0])
    assert "StatefulSet" not in kinds(docs) and "HorizontalPodAutoscaler" not in kinds(docs)
    assert one(docs, "Deployment", "-router")["spec"]["replicas"] == 3
    for where, pod in checks.pod_specs(docs).items():
        for c in pod["containers"]:
            url = env_of(c)["PDSERVE_REDIS_URL"]
            assert url == {"name": "PDSERVE_REDIS_URL",
                           "valueFrom": {"secretKeyRef": {"name": "pdserve-redis", "key": "url"}}}, where
    assert checks.cluster_config(docs).redis_url is None  # the launcher takes $PDSERVE_REDIS_URL
    assert "redis://" not in text


def test_planner_values():
    _, docs = helm_template(CHART / "ci" / "planner-values.yaml", KUBE_VERSIONS[0])
    config = checks.cluster_config(docs)
    assert config.planner.enabled and config.planner.slo_ttft_ms == 500
    assert (config.prefill, config.decode, config.mixed) == (1, 2, 1)
    assert config.redis_url is None, "a password-protected Redis URL stays out of the ConfigMap"
    redis = one(docs, "StatefulSet", "-redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    c = containers(redis["spec"]["template"]["spec"])["redis"]
    assert '--requirepass "$PDSERVE_REDIS_PASSWORD"' in c["args"][0]
    router_env = env_of(containers(one(docs, "Deployment", "-router")["spec"]["template"]["spec"])["router"])
    assert router_env["PDSERVE_REDIS_URL"]["value"] == "redis://:$(PDSERVE_REDIS_PASSWORD)@pd-pdserve-redis:6379/0"
    assert "PDSERVE_API_KEY" not in router_env


def test_defaults_objects():
    _, docs = helm_template(None, KUBE_VERSIONS[0])
    assert kinds(docs) == {"ConfigMap", "RayCluster", "RayJob", "Deployment", "Service", "HorizontalPodAutoscaler",
                           "PodDisruptionBudget", "StatefulSet"}
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == "pd-pdserve-router"
    assert "replicas" not in one(docs, "Deployment", "-router")["spec"], "the HPA owns the replica count"
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert one(docs, "RayCluster")["spec"]["authOptions"] == {"mode": "token"}


def test_validators_catch_typos():
    """The checks above would fail on a misspelt field: neither validator passes unknown fields."""
    import copy

    _, docs = helm_template(None, KUBE_VERSIONS[0])
    bad = copy.deepcopy(docs)
    rc = next(d for d in bad if d["kind"] == "RayCluster")
    rc["spec"]["workerGroupSpec"] = rc["spec"].pop("workerGroupSpecs")
    with pytest.raises(AssertionError, match="'workerGroupSpec' was unexpected"):
        validate_custom(bad)
    deploy = next(d for d in bad if d["kind"] == "Deployment")
    deploy["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/health"}
    with pytest.raises(AssertionError, match="kubernetes-validate"):
        kubernetes_validate(bad, KUBE_VERSIONS[0])


def test_secret_values_never_rendered(tmp_path):
    """An operator's Secrets (made here with kubectl, as they would) are referenced by name and key;
    their values appear nowhere in the chart's output, plain or base64."""
    import base64

    values = {"api-keys": "sk-live-4f1c9a", "admin-api-keys": "sk-admin-77e0b2", "url": "redis://:pw-9d3e@r:6379/0"}
    made = yaml.safe_load(run("kubectl", "create", "secret", "generic", "pdserve-keys", "--dry-run=client", "-o",
                              "yaml", *[f"--from-literal={k}={v}" for k, v in values.items()]).stdout)
    assert set(made["data"]) == set(values)
    file = tmp_path / "values.yaml"
    file.write_text(yaml.safe_dump({
        "secrets": {"apiKeys": {"existingSecret": "pdserve-keys"}, "adminApiKeys": {"existingSecret": "pdserve-keys"}},
        "redis": {"mode": "external", "external": {"existingSecret": "pdserve-keys", "key": "url"}}}))
    text, docs = helm_template(file, KUBE_VERSIONS[0])
    forbidden = (*values.values(), *made["data"].values(),
                 *(base64.b64encode(v.encode()).decode() for v in values.values()))
    checks.check_secrets(text, docs, forbidden)
    env = env_of(containers(one(docs, "Deployment", "-router")["spec"]["template"]["spec"])["router"])
    assert {n: env[n]["valueFrom"]["secretKeyRef"] for n in ("PDSERVE_API_KEY", "PDSERVE_ADMIN_API_KEY",
                                                             "PDSERVE_REDIS_URL")} == {
        "PDSERVE_API_KEY": {"name": "pdserve-keys", "key": "api-keys"},
        "PDSERVE_ADMIN_API_KEY": {"name": "pdserve-keys", "key": "admin-api-keys"},
        "PDSERVE_REDIS_URL": {"name": "pdserve-keys", "key": "url"}}


def test_rayjob_follows_the_config():
    """A changed cluster config names a new RayJob (KubeRay does not resubmit a changed one); the same
    config keeps the name, so an unrelated `helm upgrade` leaves the launcher alone."""
    def job(*sets: str) -> str:
        return one(helm_template(None, KUBE_VERSIONS[0], *sets)[1], "RayJob")["metadata"]["name"]

    assert job() == job("router.replicas=5") != job("cluster.decode=2")
    assert job().startswith("pd-pdserve-launch-") and len(job()) <= 63
    assert checks.cluster_config(helm_template(None, KUBE_VERSIONS[0])[1]).launch.workers_outlive_job


def test_readme_values_example(tmp_path):
    """The values example in the README's "Kubernetes (Helm)" section renders and validates."""
    readme = (CHART.parents[1] / "README.md").read_text()
    section = readme.split("## Kubernetes (Helm)", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in section.split("```yaml\n")[1:] if b.startswith("# my-values.yaml")).split("```", 1)[0]
    (tmp_path / "values.yaml").write_text(block)
    text, docs = helm_template(tmp_path / "values.yaml", KUBE_VERSIONS[-1])
    kubernetes_validate(docs, KUBE_VERSIONS[-1])
    validate_custom(docs)
    checks.check_all(text, docs)
    assert [g["groupName"] for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]] == ["prefill", "decode"]


@pytest.mark.parametrize("values", VALUES, ids=lambda v: v.name)
def test_shell_scripts_parse(values: Path):
    """Every `sh -c` / `bash -c` script the chart renders is valid shell (`bash -n`)."""
    import subprocess

    _, docs = helm_template(values, KUBE_VERSIONS[-1])
    scripts = [c["args"][0] for pod in checks.pod_specs(docs).values() for c in pod["containers"]
               if c.get("command", [""])[0] in ("sh", "/bin/sh", "bash", "/bin/bash")]
    for script in scripts:
        proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert proc.returncode == 0, f"{proc.stderr}\n{script}"
    v = _values(values)
    if v.get("launcher", {}).get("mode") == "head" or v.get("redis", {}).get("mode") != "external":
        assert scripts, "expected the head's or Redis's script"


def test_model_volume_reaches_workers_and_routers():
    """A models PVC from values is mounted where the engine loads (workers) and where the router
    reads the tokenizer; extraEnv reaches every pdserve container."""
    _, docs = helm_template(CHART / "ci" / "gpu-pools-values.yaml", KUBE_VERSIONS[0])
    assert checks.cluster_config(docs).engine.model.startswith("/models/")
    for where, pod in checks.pod_specs(docs).items():
        if where.startswith("StatefulSet/"):
            continue  # Redis
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "pdserve-models", "readOnly": True}} \
            in pod["volumes"], where
        for c in pod["containers"]:
            assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"], where
            assert env_of(c)["UCX_TLS"]["value"] == "rc,cuda_copy,cuda_ipc", where
