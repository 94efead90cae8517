"""deploy/k8s: `kubectl kustomize` of every overlay renders, validates and says what the chart says."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy import checks
from tests.deploy.render import (KUBE_VERSIONS, OVERLAYS, containers, env_of, helm_template, kinds, kubernetes_validate,
                                 kustomize, one, validate_custom)

CHART_KINDS = {"ConfigMap", "RayCluster", "RayJob", "Deployment", "Service", "HorizontalPodAutoscaler",
               "PodDisruptionBudget", "StatefulSet"}


def test_overlays_present():
    assert {p.name for p in OVERLAYS} >= {"cpu-demo", "gpu-pools"}


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_renders_and_validates(overlay: Path, kube: str):
    text, docs = kustomize(overlay)
    kubernetes_validate(docs, kube)
    validate_custom(docs)
    checks.check_all(text, docs)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_matches_chart_kinds(overlay: Path):
    _, docs = kustomize(overlay)
    assert CHART_KINDS <= kinds(docs)
    assert kinds(docs) - CHART_KINDS <= {"Namespace", "NetworkPolicy"}
    _, chart = helm_template(None, KUBE_VERSIONS[0])
    assert CHART_KINDS == kinds(chart), "the chart's default objects and the kustomize base diverged"


def test_cpu_demo_is_the_default_model():
    overlay = next(p for p in OVERLAYS if p.name == "cpu-demo")
    _, docs = kustomize(overlay)
    config = checks.cluster_config(docs)
    assert config.engine.model is None and config.engine.device == "cpu"  # None = the default model
    assert (config.prefill, config.decode) == (1, 1)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"pdserve-demo"}
    [group] = one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    assert group["replicas"] == 1 and set(group["resources"]) >= {"pdserve_prefill", "pdserve_decode"}


def test_gpu_pools_one_pool_per_role():
    overlay = next(p for p in OVERLAYS if p.name == "gpu-pools")
    _, docs = kustomize(overlay)
    assert checks.cluster_config(docs) == checks.ClusterConfig.model_validate(
        yaml.safe_load((overlay / "cluster.yaml").read_text()))
    groups = {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}
    assert {n: set(g["resources"]) for n, g in groups.items()} == {"prefill": {"pdserve_prefill"},
                                                                  "decode": {"pdserve_decode"}}
    for name, g in groups.items():
        spec = g["template"]["spec"]
        worker = containers(spec)["ray-worker"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"pdserve.io/pool": name}
    key = env_of(containers(one(docs, "Deployment", "-router")["spec"]["template"]["spec"])["router"])
    assert key["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "pdserve-api-keys", "key": "api-keys"}
