"""Assertions every rendering of pdserve must pass (Helm chart and kustomize overlays alike)."""
from __future__ import annotations

import yaml

from cluster.cli import build_parser
from cluster.config import ClusterConfig
from tests.deploy.render import Doc, containers, env_of, one

SECRET_ENV = ("PDSERVE_API_KEY", "PDSERVE_ADMIN_API_KEY", "PDSERVE_REDIS_PASSWORD")
ROLES = ("prefill", "decode", "mixed")


def cluster_config(docs: tuple[Doc, ...]) -> ClusterConfig:
    """The ConfigMap's cluster.yaml, parsed as `pdserve launch` parses it."""
    data = yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["cluster.yaml"])
    return ClusterConfig.model_validate(data)


def router_args(docs: tuple[Doc, ...]):
    """The router container's command line, parsed by pdserve's own CLI parser."""
    pod = one(docs, "Deployment", "-router")["spec"]["template"]["spec"]
    c = containers(pod)["router"]
    argv = [*c["command"][1:], *c["args"]]
    argv = [a.replace("$(PDSERVE_REDIS_URL)", "redis://from-env:6379/0") for a in argv]
    return build_parser().parse_args(argv)


def check_router(docs: tuple[Doc, ...]) -> None:
    config = cluster_config(docs)
    args = router_args(docs)
    assert args.config == "/etc/pdserve/cluster.yaml" and args.redis_url and args.host == "0.0.0.0"
    assert args.port == config.port, f"router listens on {args.port}, config says {config.port}"
    deploy = one(docs, "Deployment", "-router")
    pod = deploy["spec"]["template"]["spec"]
    c = containers(pod)["router"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": config.port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]] and "configMap" in volumes[mounts["/etc/pdserve"]]
    # The image's user's home is written too (Ray's ~/.ray; seen refused in a read-only container).
    assert "emptyDir" in volumes[mounts["/home/pdserve"]]
    svc = one(docs, "Service", "-router")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert svc["spec"]["selector"].items() <= pod_labels(deploy).items()


def pod_labels(workload: Doc) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def pod_specs(docs: tuple[Doc, ...]) -> dict[str, Doc]:
    """Every pod template: Deployments, StatefulSets, the Ray head and each worker group."""
    out = {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"] for d in docs
           if d["kind"] in ("Deployment", "StatefulSet")}
    for rc in (d for d in docs if d["kind"] == "RayCluster"):
        out["RayCluster/head"] = rc["spec"]["headGroupSpec"]["template"]["spec"]
        for g in rc["spec"]["workerGroupSpecs"]:
            out[f"RayCluster/{g['groupName']}"] = g["template"]["spec"]
    return out


def check_security(docs: tuple[Doc, ...]) -> None:
    """Non-root pods; containers without privilege escalation or capabilities."""
    for where, pod in pod_specs(docs).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
            assert "privileged" not in sc and c.get("resources", {}).get("limits"), where
            if c["name"] in ("router", "ray-head", "ray-worker") and sc.get("readOnlyRootFilesystem"):
                # What the image writes at run time: /tmp (Ray's session) and the home (~/.ray).
                writable = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert {"/tmp", "/home/pdserve"} <= writable, (where, c["name"], writable)


def check_secrets(text: str, docs: tuple[Doc, ...], forbidden: tuple[str, ...] = ()) -> None:
    """Keys and Redis credentials reach containers only as secretKeyRef; none is rendered."""
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart must not render Secrets"
    for value in forbidden:
        assert value not in text, f"secret value {value!r} appears in the rendered manifests"
    for where, pod in pod_specs(docs).items():
        for c in pod["containers"]:
            for name, e in env_of(c).items():
                if name in SECRET_ENV:
                    assert set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"], (where, name)
                if name == "PDSERVE_REDIS_URL" and "value" in e:
                    assert "@" not in e["value"] or "$(PDSERVE_REDIS_PASSWORD)" in e["value"], (where, e)
    config = one(docs, "ConfigMap", "-config")["data"]["cluster.yaml"]
    assert "api_keys" not in config and "@" not in config, "keys or credentials in the cluster ConfigMap"


def check_pools(docs: tuple[Doc, ...]) -> None:
    """Each role the config starts can be placed: some worker group advertises every Ray resource
    the role's placement asks for (and has GPUs when it asks for GPUs)."""
    config = cluster_config(docs)
    rc = one(docs, "RayCluster")
    groups = rc["spec"]["workerGroupSpecs"]
    for role in {spec.role for spec in config.worker_specs("redis://x")}:
        placement = config.placement.pool(role)
        assert placement.resources, f"{role} workers are not pinned to a pool"
        fits = [g["groupName"] for g in groups if set(placement.resources) <= set(g.get("resources", {}))
                and (not placement.num_gpus or _gpus(g) >= placement.num_gpus)]
        assert fits, f"no worker group offers {role}'s placement {placement}"
    head = containers(rc["spec"]["headGroupSpec"]["template"]["spec"])
    assert {"gcs-server", "dashboard"} <= {p["name"] for c in head.values() for p in c["ports"]}
    assert rc["spec"]["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "no worker on the head"


def _gpus(group: Doc) -> int:
    limits = containers(group["template"]["spec"])["ray-worker"]["resources"].get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def check_all(text: str, docs: tuple[Doc, ...], forbidden: tuple[str, ...] = ()) -> None:
    check_router(docs)
    check_security(docs)
    check_secrets(text, docs, forbidden)
    check_pools(docs)
