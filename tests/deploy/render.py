"""Render the chart and the kustomize overlays with the real tools, and check what they produce.

Renders are cached per (source, Kubernetes version) so each test module pays for one helm or
kubectl run per combination.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.crds import crd_errors
from tests.deploy.tools import run

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pdserve"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
OVERLAYS = sorted(p.parent for p in (REPO / "deploy" / "k8s" / "overlays").glob("*/kustomization.yaml"))
KUBE_VERSIONS = ("1.29.0", "1.34.0")
CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")
RELEASE, NAMESPACE = "pd", "serving"

Doc = dict[str, Any]


def _load(text: str) -> tuple[Doc, ...]:
    return tuple(d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d)


@cache
def helm_template(values: Path | None, kube_version: str, *sets: str) -> tuple[str, tuple[Doc, ...]]:
    """`helm template` of the chart: (rendered text, objects)."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version]
    if values is not None:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    text = run("helm", *args).stdout
    return text, _load(text)


@cache
def kustomize(overlay: Path) -> tuple[str, tuple[Doc, ...]]:
    """`kubectl kustomize` of one overlay: (rendered text, objects)."""
    text = run("kubectl", "kustomize", str(overlay)).stdout
    return text, _load(text)


def kubernetes_validate(docs: tuple[Doc, ...], kube_version: str) -> None:
    """`kubernetes-validate --strict` over every built-in object; raises with its output on failure."""
    builtin = [d for d in docs if not d["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert builtin, "nothing to validate"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(builtin, f)
        f.flush()
        exe = Path(sys.executable).parent / "kubernetes-validate"
        assert exe.is_file(), f"{exe} is missing: pip install -e '.[dev]' (kubernetes-validate)"
        proc = subprocess.run([str(exe), "--strict", "--no-warn", "-k", kube_version, f.name],
                              capture_output=True, text=True, timeout=60)
    passed = proc.stdout.count(" passed for resource ")
    assert proc.returncode == 0 and passed == len(builtin), \
        f"kubernetes-validate {kube_version} (rc {proc.returncode}, {passed}/{len(builtin)} passed):\n" \
        f"{proc.stdout}{proc.stderr}"


def validate_custom(docs: tuple[Doc, ...]) -> None:
    """Every KubeRay object against its CRD (unknown fields are errors)."""
    ray = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert ray, "no KubeRay objects rendered"
    errors = [e for d in ray for e in crd_errors(d)]
    assert not errors, "KubeRay objects do not match the CRDs:\n" + "\n".join(errors)


def one(docs: tuple[Doc, ...], kind: str, name_suffix: str = "") -> Doc:
    """The single object of `kind` (whose name ends with `name_suffix`)."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: tuple[Doc, ...]) -> set[str]:
    return {d["kind"] for d in docs}


def containers(pod_spec: Doc) -> dict[str, Doc]:
    return {c["name"]: c for c in pod_spec["containers"]}


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}
