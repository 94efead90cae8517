"""Engine objects <-> wire messages: per-step output deltas (TokenChunk); SamplingParams in cluster/sampling_pb."""
from __future__ import annotations

from cluster.sampling_pb import FINISH_REASON_NAMES, FINISH_REASONS, params_from_pb, params_to_pb
from engine.outputs import RequestOutput
from pdserve.v1 import worker_pb2

__all__ = ["FINISH_REASON_NAMES", "params_from_pb", "params_to_pb", "output_to_chunk", "token_logprobs"]


def token_logprobs(token_id: int, entry: dict[int, float], top_n: int) -> worker_pb2.TokenLogprobs:
    """The engine's {token: logprob} (sampled + top-N) as a wire message, top-N best first."""
    top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
    return worker_pb2.TokenLogprobs(
        token_id=token_id, logprob=entry.get(token_id, float("-inf")),
        top=[worker_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in top],
    )


def output_to_chunk(out: RequestOutput, top_n: int | None) -> worker_pb2.TokenChunk:
    """The delta a snapshot of a single-sequence request carries."""
    c = out.outputs[0]
    chunk = worker_pb2.TokenChunk(
        token_ids=list(c.new_token_ids), text=c.new_text, finish_reason=FINISH_REASONS[c.finish_reason],
        num_prompt_tokens=len(out.prompt_token_ids), num_cached_tokens=out.num_cached_tokens,
    )
    if c.stop_reason is not None:
        chunk.stop_reason = str(c.stop_reason)
    if top_n is not None and c.logprobs is not None and c.new_token_ids:
        new = c.logprobs[len(c.logprobs) - len(c.new_token_ids):]
        chunk.logprobs.extend(token_logprobs(t, e, top_n) for t, e in zip(c.new_token_ids, new))
    return chunk
