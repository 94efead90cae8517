"""SamplingParams: defined in `pdcommon.sampling_params` (torch-free, shared with the router)."""
from pdcommon.sampling_params import GREEDY_EPS, SamplingParams

__all__ = ["GREEDY_EPS", "SamplingParams"]
