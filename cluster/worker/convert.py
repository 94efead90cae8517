"""Engine objects <-> wire messages: SamplingParams and per-step output deltas (TokenChunk)."""
from __future__ import annotations

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from pdserve.v1 import worker_pb2

_FINISH = {
    None: worker_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": worker_pb2.FINISH_REASON_STOP,
    "length": worker_pb2.FINISH_REASON_LENGTH,
    "abort": worker_pb2.FINISH_REASON_ABORT,
}
FINISH_REASON_NAMES = {v: k for k, v in _FINISH.items()}

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "skip_special_tokens")


def params_to_pb(p: SamplingParams) -> worker_pb2.SamplingParams:
    if p.n != 1:
        raise ValueError("a worker runs one sequence per request: fan out n > 1 before calling it")
    pb = worker_pb2.SamplingParams(
        max_tokens=p.max_tokens, min_tokens=p.min_tokens, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos, include_stop_str_in_output=p.include_stop_str_in_output,
    )
    for name in _OPTIONAL:
        value = getattr(p, name)
        if value is not None:
            setattr(pb, name, value)
    return pb


def params_from_pb(pb: worker_pb2.SamplingParams) -> SamplingParams:
    """Build (and so validate: ValueError) engine SamplingParams from the wire message."""
    kwargs = {name: getattr(pb, name) for name in _OPTIONAL if pb.HasField(name)}
    return SamplingParams(
        max_tokens=pb.max_tokens, min_tokens=pb.min_tokens, stop=tuple(pb.stop), stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos, include_stop_str_in_output=pb.include_stop_str_in_output, **kwargs,
    )


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
        token_ids=list(c.new_token_ids), text=c.new_text, finish_reason=_FINISH[c.finish_reason],
        num_prompt_tokens=len(out.prompt_token_ids), num_cached_tokens=out.num_cached_tokens,
    )
    if c.stop_reason is not None:
        chunk.stop_reason = str(c.stop_reason)
    if top_n is not None and c.logprobs is not None and c.new_token_ids:
        new = c.logprobs[len(c.logprobs) - len(c.new_token_ids):]
        chunk.logprobs.extend(token_logprobs(t, e, top_n) for t, e in zip(c.new_token_ids, new))
    return chunk
