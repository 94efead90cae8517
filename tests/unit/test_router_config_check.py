"""Workers publish their KV block size and context length; a router with other values says so."""
from __future__ import annotations

from cluster.router.cluster_backend import config_mismatches
from cluster.state.store import WorkerInfo


def _info(wid: str, block_size: int = 0, max_model_len: int = 0) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, address="10.0.0.1:1", role="decode", epoch=0, model="m", layout_hash="h",
                      transport="grpc", block_size=block_size, max_model_len=max_model_len)


def test_published_values_round_trip_and_default_to_unknown():
    w = _info("d0", 16, 2048)
    assert WorkerInfo.from_hash(w.to_hash()) == w
    old = {k: v for k, v in w.to_hash().items() if k not in ("block_size", "max_model_len")}
    assert (WorkerInfo.from_hash(old).block_size, WorkerInfo.from_hash(old).max_model_len) == (0, 0)


def test_mismatches_name_the_worker_and_the_field():
    workers = [_info("same", 16, 2048), _info("old", 0, 0), _info("bs", 32, 2048), _info("len", 16, 8192)]
    lines = config_mismatches(workers, block_size=16, max_model_len=2048)
    assert len(lines) == 2
    assert "worker bs" in lines[0] and "32" in lines[0] and "block_size" in lines[0]
    assert "worker len" in lines[1] and "8192" in lines[1] and "max_model_len" in lines[1]
    assert config_mismatches(workers[:2], 16, 2048) == []
