"""pdserve's inference engine: paged KV cache, continuous batching, dense and MoE models."""
from engine.llm import LLM
from engine.llm_engine import EngineStats, KVImport, LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineStats", "KVImport"]
