"""SamplingParams and finish reasons <-> wire messages. Torch-free: the router builds requests with
it and the worker reads them back (cluster/worker/convert.py adds the engine-side conversions)."""
from __future__ import annotations

from pdcommon.sampling_params import SamplingParams
from pdserve.v1 import worker_pb2

FINISH_REASONS = {
    None: worker_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": worker_pb2.FINISH_REASON_STOP,
    "length": worker_pb2.FINISH_REASON_LENGTH,
    "abort": worker_pb2.FINISH_REASON_ABORT,
}
FINISH_REASON_NAMES = {v: k for k, v in FINISH_REASONS.items()}

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
    """Build (and so validate: ValueError) SamplingParams from the wire message."""
    kwargs = {name: getattr(pb, name) for name in _OPTIONAL if pb.HasField(name)}
    return SamplingParams(
        max_tokens=pb.max_tokens, min_tokens=pb.min_tokens, stop=tuple(pb.stop), stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos, include_stop_str_in_output=pb.include_stop_str_in_output, **kwargs,
    )
