"""The address a worker registers (cluster/worker/address.py) and where ClusterConfig binds workers."""
from __future__ import annotations

import pytest

from cluster.config import ClusterConfig, PoolPlacement
from cluster.worker.address import advertised_host, node_ip


def _never() -> str:
    raise AssertionError("node_ip must not be asked for")


@pytest.mark.parametrize("bind, advertise, want", [
    ("127.0.0.1", None, "127.0.0.1"),
    ("10.1.2.3", None, "10.1.2.3"),
    ("0.0.0.0", "worker-0.pdserve.svc", "worker-0.pdserve.svc"),
    ("127.0.0.1", "10.9.9.9", "10.9.9.9"),
    ("::1", None, "[::1]"),
    ("[::1]", None, "[::1]"),
])
def test_configured_or_bound_host_wins(bind, advertise, want):
    assert advertised_host(bind, advertise, _never) == want


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "", "[::]"])
def test_a_wildcard_bind_registers_the_node_ip(bind):
    assert advertised_host(bind, None, lambda: "10.0.0.7") == "10.0.0.7"
    assert advertised_host(bind, None, lambda: "fd00::7") == "[fd00::7]"


def test_node_ip_is_an_address():
    ip = node_ip()
    assert ip and ip not in ("0.0.0.0", "")


def test_config_binds_workers_and_advertises():
    c = ClusterConfig()
    assert {s.host for s in c.worker_specs("redis://r")} == {"127.0.0.1"}  # pdserve serve: unchanged
    assert {s.host for s in c.worker_specs("redis://r", host="0.0.0.0")} == {"0.0.0.0"}  # launch's default
    assert {s.port for s in c.worker_specs("redis://r")} == {0}  # a free port each
    c = ClusterConfig(worker_host="10.0.0.5", advertise_host="node-a", worker_port=50051)
    spec = c.worker_specs("redis://r", host=None)[0]
    assert (spec.host, spec.advertise_host, spec.port) == ("10.0.0.5", "node-a", 50051)


def test_pool_placement_ray_options():
    assert PoolPlacement().ray_options(2) == {"num_cpus": 2}
    opts = PoolPlacement(num_cpus=4, num_gpus=1, memory_gb=2, resources={"prefill_pool": 1},
                         node_labels={"ray.io/node-group": "prefill"}).ray_options(1)
    assert opts == {"num_cpus": 4, "num_gpus": 1, "memory": 2 << 30, "resources": {"prefill_pool": 1},
                    "label_selector": {"ray.io/node-group": "prefill"}}
