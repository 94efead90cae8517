"""values.schema.json: generated from ClusterConfig, committed in sync, and enforced by helm."""
from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from cluster import config_schema
from tests.deploy.render import CHART, VALUES
from tests.deploy.tools import run


def test_committed_schema_matches_generation():
    committed = config_schema.SCHEMA_PATH.read_text()
    assert committed == config_schema.render(), \
        "helm/pdserve/values.schema.json is stale: run `python -m cluster.config_schema --write`"
    assert config_schema.main(["--check"]) == 0


def test_schema_follows_cluster_config():
    text = config_schema.render()
    schema = json.loads(text)
    jsonschema.Draft7Validator.check_schema(schema)
    newer = [k for k in ("prefixItems", "unevaluatedProperties", "unevaluatedItems", "dependentRequired",
                         "dependentSchemas", "$dynamicRef", "$anchor") if f'"{k}"' in text]
    assert not newer, f"keywords Helm 3's draft-07 validator ignores: {newer}"
    cluster = schema["$defs"]["ClusterConfig"]
    fields = set(config_schema.ClusterConfig.model_fields)
    assert set(cluster["properties"]) == fields - set(config_schema.CHART_MANAGED)
    assert cluster["additionalProperties"] is False  # extra="forbid" carries over: typos are errors


def test_values_files_match_schema():
    validator = jsonschema.Draft7Validator(json.loads(config_schema.render()))
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    validator.validate(base)
    for path in VALUES:
        validator.validate({**base, **(yaml.safe_load(path.read_text()) or {})})


@pytest.mark.parametrize("setting, message", [
    ("cluster.api_keys={sk-inline-1}", "at '/cluster': additional properties 'api_keys' not allowed"),
    ("cluster.redis_url=redis://user:pw@elsewhere:6379", "additional properties 'redis_url' not allowed"),
    ("cluster.kv_transport=tcp", "at '/cluster/kv_transport': value must be one of 'nixl', 'grpc'"),
    ("cluster.engine.max_num_seqs=0", "at '/cluster/engine/max_num_seqs'"),
    ("cluster.workers_typo=1", "additional properties 'workers_typo' not allowed"),
    ("router.replicas=0", "at '/router/replicas': minimum: got 0, want 1"),
    ("ray.pools[0].name=Bad_Name", "'Bad_Name' does not match pattern"),
    ("launcher.mode=driver", "at '/launcher/mode': value must be one of 'rayjob', 'head'"),
    ("redis.mode=external", "redis.mode=external needs redis.external.existingSecret"),
    ("cluster.port=0", "cluster.port must be a fixed port on Kubernetes"),
    ("cluster.mixed=0,cluster.decode=0", "cluster needs mixed > 0, or at least one prefill and one decode worker"),
])
def test_bad_values_rejected(setting: str, message: str):
    proc = run("helm", "template", "pd", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0, f"helm accepted --set {setting}"
    assert message in proc.stderr, proc.stderr
    assert "sk-inline-1" not in proc.stdout


def test_pool_must_host_every_role(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("ray:\n  pools:\n    - {name: decode, roles: [decode], replicas: 1}\n")
    proc = run("helm", "template", "pd", str(CHART), "-f", str(values), check=False)
    assert proc.returncode != 0
    assert 'cluster asks for 1 prefill worker(s) but no ray.pools entry lists role "prefill"' in proc.stderr


def test_planner_shorthand_accepted():
    """`planner: true` is what ClusterConfig accepts; the schema takes it too."""
    out = run("helm", "template", "pd", str(CHART), "--set", "cluster.planner=true").stdout
    assert "planner: true" in out
