"""StatsResponse assembly from the engine's and the KV layer's counters."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from cluster.worker.roles import PhaseDurations
from engine.llm_engine import EngineStats
from pdserve.v1 import worker_pb2


def stats_response(worker_id: str, role: int, epoch: int, s: EngineStats, kv=None, *, num_active_leases: int = 0,
                   queued_prefill_tokens: int = 0, role_switches_total: int = 0, expert_parallel_size: int = 1,
                   expert_load: Sequence[Sequence[int]] = (),
                   role_switch_counts: Mapping[tuple[int, int], int] | None = None,
                   phase_durations: PhaseDurations | None = None,
                   sequences_migrated_total: int = 0) -> worker_pb2.StatsResponse:
    """`kv` is a cluster.kv.counters.KVCounters (None for a worker that moves no KV); `expert_load`
    holds, per MoE layer, the tokens routed to each expert since load; `role_switch_counts` the
    completed switches by (from, to) protobuf role; `phase_durations` the role machine's switch
    phase histograms."""
    msg = worker_pb2.StatsResponse(
        worker_id=worker_id, role=role, epoch=epoch, num_requests_running=s.num_running,
        num_requests_waiting=s.num_waiting, num_holding_kv=s.num_holding_kv, num_waiting_for_kv=s.num_waiting_for_kv,
        num_free_blocks=s.num_free_blocks, num_blocks=s.num_blocks, prefix_cache_queries=s.prefix_cache_queries,
        prefix_cache_hits=s.prefix_cache_hits, prompt_tokens_total=s.prompt_tokens_total,
        generation_tokens_total=s.generation_tokens_total, num_preemptions=s.num_preemptions,
        queued_prefill_tokens=queued_prefill_tokens, num_active_leases=num_active_leases,
        role_switches_total=role_switches_total, expert_parallel_size=expert_parallel_size,
        expert_load=[worker_pb2.ExpertLoad(layer=i, tokens=list(counts)) for i, counts in enumerate(expert_load)],
        role_switch_counts=[worker_pb2.RoleSwitchCount(from_role=a, to_role=b, count=n)
                            for (a, b), n in sorted((role_switch_counts or {}).items())],
        sequences_migrated_total=sequences_migrated_total,
    )
    if phase_durations is not None:
        for phase, counts in sorted(phase_durations.counts.items()):
            msg.role_switch_phase_seconds.add(phase=phase, upper_bounds=phase_durations.buckets, bucket_counts=counts,
                                              sum=phase_durations.sums[phase])
    if kv is not None:
        msg.kv_transfers_total = kv.transfers_total
        msg.kv_transfer_bytes_total = kv.transfer_bytes_total
        msg.kv_transfer_seconds_total = kv.transfer_seconds_total
        msg.kv_transfer_failures_total = kv.failures_total
        msg.kv_lease_expired_total = kv.lease_expired_total
        msg.kv_recompute_total = kv.recompute_total
        msg.kv_blocks_skipped_total = kv.blocks_skipped_total
        msg.kv_blocks_served_total = kv.blocks_served_total
        msg.requests_resumed_total = kv.resumed_total
        msg.sequences_migrated_in_total = kv.migrated_in_total
        msg.migration_recompute_total = kv.migration_recompute_total
    return msg
