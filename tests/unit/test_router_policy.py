"""Worker picking (pure): prefill by prefix overlap and queued work, decode by free KV and load."""
from __future__ import annotations

import pytest

from cluster.errors import NoWorkerError
from cluster.router.policy import WorkerView, pick_decode, pick_prefill, prefill_cost


def w(worker_id: str, *, role: str = "prefill", running: int = 0, waiting: int = 0, free: int = 100, blocks: int = 100,
      queued: int = 0, inflight: int = 0) -> WorkerView:
    return WorkerView(worker_id, role, f"{worker_id}:50051", 1, running, waiting, free, blocks, queued, inflight)


# (workers, overlap blocks, prompt blocks, w_overlap, expected)
PREFILL_CASES = [
    pytest.param([w("a"), w("b")], {}, 4, 1.0, "a", id="tie-breaks-on-worker-id"),
    pytest.param([w("b"), w("a")], {}, 4, 1.0, "a", id="tie-break-independent-of-order"),
    pytest.param([w("a"), w("b")], {"b": 3}, 4, 1.0, "b", id="prefix-overlap-wins"),
    pytest.param([w("a"), w("b", queued=50)], {"b": 4}, 4, 1.0, "b", id="overlap-outweighs-small-queue"),
    pytest.param([w("a"), w("b", queued=50)], {"b": 4}, 4, 0.5, "a", id="lower-overlap-weight"),
    pytest.param([w("a", queued=500), w("b", queued=10)], {"a": 2}, 4, 1.0, "b", id="queued-prefill-tokens"),
    pytest.param([w("a", inflight=3), w("b", inflight=1)], {}, 4, 1.0, "b", id="inflight-breaks-cost-ties"),
    pytest.param([w("a"), w("b")], {"a": 10}, 4, 1.0, "a", id="overlap-beyond-prompt-is-capped"),
]


@pytest.mark.parametrize("workers,overlap,prompt_blocks,w_overlap,expected", PREFILL_CASES)
def test_pick_prefill(workers, overlap, prompt_blocks, w_overlap, expected):
    assert pick_prefill(workers, overlap, prompt_blocks, 16, w_overlap).worker_id == expected


def test_prefill_cost_in_tokens():
    assert prefill_cost(w("a", queued=7), 1, 4, 16) == 3 * 16 + 7
    assert prefill_cost(w("a"), 9, 4, 16) == 0


# (workers, blocks needed, expected)
DECODE_CASES = [
    pytest.param([w("a", role="decode"), w("b", role="decode")], 10, "a", id="tie-breaks-on-worker-id"),
    pytest.param([w("a", free=20), w("b", free=80)], 10, "b", id="more-free-kv"),
    pytest.param([w("a", free=80, running=9), w("b", free=79, running=1)], 10, "b", id="near-equal-kv-fewer-running"),
    pytest.param([w("a", free=50, running=1), w("b", free=90, running=30)], 10, "b", id="much-more-kv-wins"),
    pytest.param([w("a", free=5), w("b", free=12, running=50)], 10, "b", id="only-one-fits"),
    pytest.param([w("a", running=2, waiting=3), w("b", running=4)], 1, "b", id="waiting-counts-as-load"),
    pytest.param([w("a", inflight=2), w("b", inflight=0)], 1, "b", id="inflight-breaks-ties"),
    pytest.param([w("a", free=50, blocks=100), w("b", free=60, blocks=200)], 1, "a", id="fraction-not-count"),
]


@pytest.mark.parametrize("workers,need,expected", DECODE_CASES)
def test_pick_decode(workers, need, expected):
    assert pick_decode(workers, need).worker_id == expected


def test_decode_falls_back_to_most_free_blocks_when_nothing_fits():
    # The worst case (prompt + max_tokens) rarely materialises: queue on the roomiest worker.
    assert pick_decode([w("a", free=10), w("b", free=49, running=9)], 50).worker_id == "b"
    assert pick_decode([w("b", free=20), w("a", free=20)], 50).worker_id == "a"


def test_empty_lists_raise_no_worker():
    with pytest.raises(NoWorkerError):
        pick_prefill([], {}, 1, 16)
    with pytest.raises(NoWorkerError):
        pick_decode([], 1)
