"""Validate KubeRay custom resources against the CRDs' openAPIV3Schema, unknown fields as errors.

The CRD files (KubeRay v1.7.0) live in ../shared/kuberay-crds beside the repo, or where
$PDSERVE_KUBERAY_CRDS points. The API server prunes unknown fields of a structural schema; a
test wants them reported instead (a `workerGroupSpec` typo must fail), so every object schema
that lists properties, sets no additionalProperties and does not preserve unknown fields is
closed. Defaults are filled in before validating, as the API server would.
"""
from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}


class CRDsMissing(RuntimeError):
    """The KubeRay CRD files are not where the tests look."""


def crd_dir() -> Path:
    return Path(os.environ.get("PDSERVE_KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay-crds")


def _close(node: Any) -> None:
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)


@cache
def crd_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    """The closed openAPIV3Schema of `kind` at `version`; CRDsMissing when the file is absent."""
    path = crd_dir() / CRD_FILES[kind]
    if not path.is_file():
        raise CRDsMissing(f"KubeRay CRD {path} is missing: put the KubeRay v1.7.0 CRDs in {crd_dir()} "
                          "or point $PDSERVE_KUBERAY_CRDS at them")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 25k lines
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            _close(schema)
            return schema
    raise CRDsMissing(f"{path} has no version {version}")


def _fill_defaults(instance: Any, schema: dict[str, Any]) -> None:
    if isinstance(instance, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                _fill_defaults(instance[name], sub)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(item, schema["items"])


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of one ray.io/v1 object, as 'path: message' lines."""
    kind = doc["kind"]
    schema = crd_schema(kind, doc["apiVersion"].split("/", 1)[1])
    instance = copy.deepcopy(doc)
    _fill_defaults(instance, schema)
    validator = jsonschema.Draft7Validator(schema)
    return [f"{kind} {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]
