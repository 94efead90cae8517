"""Token sampling: penalties, temperature, top-k/top-p/min-p, seeded generators, logprobs.

Greedy rows without penalties or logprobs take one batched argmax; every other row is
processed on its own (per-request seeds and penalties make batching them awkward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels import cpu_ops
from engine.request import Request


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None  # sampled token plus the top-N, from the raw distribution


def _apply_penalties(logits: torch.Tensor, req: Request) -> torch.Tensor:
    p = req.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.all_token_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
        out = torch.tensor(req.output_token_ids, dtype=torch.long)
        counts = torch.bincount(out, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _suppress_stops(logits: torch.Tensor, req: Request) -> None:
    """min_tokens: end-of-sequence and stop tokens are impossible until enough tokens exist."""
    if req.num_output_tokens < req.params.min_tokens:
        ids = [t for t in (*req.eos_token_ids, *req.params.stop_token_ids) if t < logits.shape[-1]]
        if ids:
            logits[ids] = float("-inf")


def _filter(logits: torch.Tensor, req: Request) -> torch.Tensor:
    p = req.params
    logits = logits / p.temperature
    if p.top_k_enabled and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (always keeps the first).
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, idx, sorted_logits)
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def _logprobs(raw: torch.Tensor, token: int, n: int) -> dict[int, float]:
    lp = torch.log_softmax(raw, dim=-1)
    result = {token: float(lp[token])}
    if n > 0:
        top = torch.topk(lp, n)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            result.setdefault(t, v)
    return result


def sample(logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
    """logits: [B, V] float32, one row per request. Rows are modified in place."""
    results: list[SampleResult | None] = [None] * len(requests)
    fast = [
        i
        for i, r in enumerate(requests)
        if r.params.greedy and not r.params.needs_penalties and r.params.logprobs is None and r.num_output_tokens >= r.params.min_tokens
    ]
    if fast:
        ops = cpu_ops() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
        # torch's argmax over a 49k vocabulary takes ~70 us a row here; the kernel one pass.
        tokens = ops.argmax_rows(logits, fast) if ops is not None else logits[fast].argmax(dim=-1).tolist()
        for i, t in zip(fast, tokens):
            results[i] = SampleResult(t, None)
    for i, req in enumerate(requests):
        if results[i] is not None:
            continue
        raw = logits[i]
        row = raw.clone()
        row = _apply_penalties(row, req)
        _suppress_stops(row, req)
        if req.params.greedy:
            token = int(row.argmax())
        else:
            probs = _filter(row, req).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=req.step_generator()))
        lp = _logprobs(raw, token, req.params.logprobs) if req.params.logprobs is not None else None
        results[i] = SampleResult(token, lp)
    return results  # type: ignore[return-value]
