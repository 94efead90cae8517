"""JSON schema of the Helm chart's own values (everything but `cluster:`), by hand.

cluster/config_schema.py joins it with ClusterConfig's schema into helm/pdserve/values.schema.json.
Kubernetes-typed values (resources, tolerations, probes, peers) are checked loosely here and
strictly by the API server; pdserve's own keys are closed (`additionalProperties: false`).
"""
from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

ROLES = ("prefill", "decode", "mixed")


def _obj(props: dict[str, Schema], desc: str = "", required: tuple[str, ...] = ()) -> Schema:
    out: Schema = {"type": "object", "additionalProperties": False, "properties": props}
    if desc:
        out["description"] = desc
    if required:
        out["required"] = list(required)
    return out


def _str(desc: str = "", **kw: Any) -> Schema:
    return {"type": "string", **({"description": desc} if desc else {}), **kw}


def _int(desc: str = "", minimum: int = 0, **kw: Any) -> Schema:
    return {"type": "integer", "minimum": minimum, **({"description": desc} if desc else {}), **kw}


def _bool(desc: str) -> Schema:
    return {"type": "boolean", "description": desc}


_STR_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY: Schema = {"anyOf": [{"type": "string"}, {"type": "number"}]}
_RESOURCES: Schema = _obj({"requests": {"type": "object", "additionalProperties": _QUANTITY},
                           "limits": {"type": "object", "additionalProperties": _QUANTITY}},
                          "container resources (requests/limits)")
_K8S_LIST: Schema = {"type": "array", "items": {"type": "object"}}
_K8S_OBJ: Schema = {"type": "object"}
_PORT: Schema = _int("TCP port", minimum=1, maximum=65535)


def _placement() -> dict[str, Schema]:
    return {"nodeSelector": {**_STR_MAP, "description": "node labels the pods must match"},
            "tolerations": {**_K8S_LIST, "description": "pod tolerations"},
            "affinity": {**_K8S_OBJ, "description": "pod affinity"}}


def _secret_ref(desc: str, key: str) -> Schema:
    return _obj({"existingSecret": _str("name of an existing Secret (empty: not used)"),
                 "key": _str(f"key in that Secret (default {key!r})", minLength=1)}, desc)


def _pool() -> Schema:
    return _obj({
        "name": _str("worker group name (Kubernetes DNS label)", pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                     maxLength=40),
        "roles": {"type": "array", "items": {"enum": list(ROLES)}, "minItems": 1, "uniqueItems": True,
                  "description": "worker roles this pool hosts; each adds the Ray resource pdserve_<role>"},
        "replicas": _int("pods in the pool", minimum=1),
        "minReplicas": _int("autoscaler floor (default: replicas)"),
        "maxReplicas": _int("autoscaler ceiling (default: replicas)", minimum=1),
        "gpus": _int("nvidia.com/gpu per pod (requests = limits)"),
        "resources": _RESOURCES,
        "rayResources": {**_STR_MAP, "description": "extra custom Ray resources per pod"},
        "rayLabels": {**_STR_MAP, "description": "extra Ray node labels"},
        "rayStartParams": {**_STR_MAP, "description": "extra `ray start` flags"},
        **_placement(),
    }, "a KubeRay worker group", required=("name", "roles", "replicas"))


def _probe() -> Schema:
    return _obj({"initialDelaySeconds": _int(), "periodSeconds": _int(minimum=1),
                 "timeoutSeconds": _int(minimum=1), "failureThreshold": _int(minimum=1)})


def chart_properties() -> dict[str, Schema]:
    """`properties` of the values schema, `cluster` excepted."""
    return {
        "nameOverride": _str("replaces the chart name in object names"),
        "fullnameOverride": _str("replaces <release>-<chart> in object names"),
        "image": _obj({"repository": _str(minLength=1), "tag": _str("default: the chart's appVersion"),
                       "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}},
                      "the pdserve image (Dockerfile at the repo root): Ray pods, launcher, router",
                      required=("repository",)),
        "imagePullSecrets": {"type": "array", "items": _obj({"name": _str(minLength=1)}, required=("name",))},
        "extraEnv": {**_K8S_LIST, "description": "more env entries (EnvVar) for every pdserve container"},
        "extraVolumes": {**_K8S_LIST, "description": "more pod volumes (e.g. a PVC holding models) for Ray pods "
                         "and routers"},
        "extraVolumeMounts": {**_K8S_LIST, "description": "where the pdserve containers mount them (workers and "
                              "routers both read the model folder)"},
        "podSecurityContext": {**_K8S_OBJ, "description": "pod securityContext of every pdserve pod"},
        "securityContext": {**_K8S_OBJ, "description": "container securityContext of every pdserve container"},
        "ray": _obj({
            "version": _str("Ray version in the image (RayCluster spec.rayVersion)", minLength=1),
            "auth": _obj({"mode": {"enum": ["token", "disabled"]},
                          "secretName": _str("Secret with key auth_token (empty: KubeRay generates one)")},
                         "Ray token authentication (on by default since Ray 2.60)"),
            "readOnlyRootFilesystem": _bool("Ray containers' root filesystem read-only (torch extension "
                                            "builds and Ray write outside /tmp; off by default)"),
            "head": _obj({"resources": _RESOURCES, "rayStartParams": _STR_MAP, **_placement()},
                         "the Ray head pod (runs no pdserve worker: num-cpus 0)"),
            "pools": {"type": "array", "items": _pool(), "minItems": 1,
                      "description": "KubeRay worker groups: one shared pool, or one per role"},
        }),
        "launcher": _obj({
            "mode": {"enum": ["rayjob", "head"], "description": "rayjob: a KubeRay RayJob submits `pdserve "
                     "launch` to the RayCluster; head: the head container runs it beside `ray start`"},
            "extraArgs": {"type": "array", "items": {"type": "string"}},
            "backoffLimit": _int("RayJob retries of the launcher"),
        }),
        "router": _obj({
            "replicas": _int(minimum=1),
            "resources": _RESOURCES,
            "extraArgs": {"type": "array", "items": {"type": "string"}, "description": "more `pdserve router` flags"},
            "service": _obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": _PORT}),
            "autoscaling": _obj({"enabled": _bool("HorizontalPodAutoscaler on CPU"),
                                 "minReplicas": _int(minimum=1), "maxReplicas": _int(minimum=1),
                                 "targetCPUUtilizationPercentage": _int(minimum=1, maximum=100)}),
            "pdb": _obj({"enabled": _bool("PodDisruptionBudget"), "minAvailable": _int(minimum=1)}),
            "livenessProbe": _probe(),
            "readinessProbe": _probe(),
            **_placement(),
        }, "`pdserve router` Deployment (discovers workers through Redis)"),
        "redis": _obj({
            "mode": {"enum": ["internal", "external"], "description": "internal: a StatefulSet; external: "
                     "the URL from redis.external"},
            "image": _obj({"repository": _str(minLength=1), "tag": _str(minLength=1),
                           "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}),
            "resources": _RESOURCES,
            "persistence": _obj({"enabled": _bool("a PersistentVolumeClaim for /data"), "size": _str(),
                                 "storageClassName": _str()}),
            "auth": _secret_ref("internal Redis password (requirepass) from a Secret", "password"),
            "external": _secret_ref("external Redis: its URL (redis://...) from a Secret", "url"),
            **_placement(),
        }),
        "secrets": _obj({"apiKeys": _secret_ref("router API keys (comma separated) -> PDSERVE_API_KEY", "api-keys"),
                         "adminApiKeys": _secret_ref("admin API keys -> PDSERVE_ADMIN_API_KEY", "admin-api-keys")},
                        "keys come only from Secrets; none is written into a manifest"),
        "metrics": _obj({
            "serviceMonitor": _obj({"enabled": _bool("a monitoring.coreos.com/v1 ServiceMonitor"),
                                    "interval": _str(pattern="^[0-9]+(ms|s|m|h)$"), "labels": _STR_MAP}),
            "grafanaDashboard": _obj({"enabled": _bool("a ConfigMap holding the Grafana dashboard"),
                                      "labels": _STR_MAP}),
        }),
        "networkPolicy": _obj({
            "enabled": _bool("NetworkPolicies: routers -> workers' gRPC, workers <-> workers, Redis"),
            "workerGrpcPorts": _obj({"port": _PORT, "endPort": _PORT},
                                    "ports routers may reach on worker pods (the workers' gRPC range)"),
            "routerIngressFrom": {**_K8S_LIST, "description": "NetworkPolicyPeers allowed to the router "
                                  "(empty: everyone)"},
        }),
    }
