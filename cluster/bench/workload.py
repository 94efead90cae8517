"""Benchmark prompts (random or JSONL) and request arrival schedules."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Common short English words: nearly all are one token in BPE vocabularies, so without a
# tokenizer a prompt of N words is roughly N tokens.
_WORDS = tuple(dict.fromkeys(
    """the of and to in is was for on that with as by at from his it an were are which this be
    has had one not but all they their been first time more new can after its other two only
    over into most some would about when there year many these may such city also him then
    made work part between world each where game any under three state group used during since
    early life later both known name small number second high school city water team family
    place people great house after power long music old well through while end line show
    light point form war case day house world film river book road music open night story west
    north south east land side order field water head fire tree stone cold warm blue green red
    black white green brown hand eye king queen ship star moon sun rain snow wind sea hill lake
    bird fish horse dog cat bread milk salt gold iron glass paper table chair door window wall
    floor roof garden market bridge tower castle forest valley island desert voice word letter
    song dance game rule law plan idea fact truth answer question reason result""".split()
))


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send. prompt_len is an estimate when no tokenizer was given."""

    index: int
    prompt: str
    prompt_len: int
    output_len: int | None  # None: no max_tokens is sent, the server decides


def sample_lengths(rng: np.random.Generator, n: int, mean: int, range_ratio: float) -> list[int]:
    """n lengths uniform in [mean*(1-r), mean*(1+r)] (at least 1); r = 0 gives exactly mean."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean * (1.0 - range_ratio)))
    high = max(low, math.ceil(mean * (1.0 + range_ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    *,
    seed: int = 0,
    range_ratio: float = 0.0,
    tokenizer: Any | None = None,
) -> list[BenchRequest]:
    """Random prompts: decoded random token ids with a tokenizer, random words without."""
    if num < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num prompts, input len and output len must be at least 1")
    rng = np.random.default_rng(seed)
    in_lens = sample_lengths(rng, num, input_len, range_ratio)
    out_lens = sample_lengths(rng, num, output_len, range_ratio)
    requests = []
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens)):
        if tokenizer is None:
            prompt, plen = " ".join(rng.choice(_WORDS, size=n_in)), n_in
        else:
            prompt, plen = _random_token_prompt(rng, tokenizer, n_in)
        requests.append(BenchRequest(index=i, prompt=prompt, prompt_len=plen, output_len=n_out))
    return requests


def _random_token_prompt(rng: np.random.Generator, tokenizer: Any, length: int) -> tuple[str, int]:
    """Decode random non-special ids; re-encode and trim, since decode/encode is not a bijection."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    allowed = np.setdiff1d(np.arange(vocab), np.fromiter(special, dtype=np.int64, count=len(special)))
    ids = rng.choice(allowed, size=length).tolist()
    text = tokenizer.decode(ids)
    for _ in range(4):  # a few rounds converge in practice; the last length is reported as is
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == length:
            break
        if len(ids) > length:
            ids = ids[:length]
        else:
            ids = ids + rng.choice(allowed, size=length - len(ids)).tolist()
        text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def load_tokenizer(path: str) -> Any:
    """A transformers tokenizer (imported lazily: it is only needed for random token prompts)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_jsonl(
    path: str | Path,
    *,
    default_output_len: int | None = None,
    num: int | None = None,
    tokenizer: Any | None = None,
) -> list[BenchRequest]:
    """Read {"prompt": str, "output_len": int (optional)} lines; ValueError names the bad line."""
    requests: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON: {exc.msg}") from None
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
            prompt = item.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f'{where}: "prompt" must be a non-empty string')
            out = item.get("output_len", default_output_len)
            if out is not None and (isinstance(out, bool) or not isinstance(out, int) or out < 1):
                raise ValueError(f'{where}: "output_len" must be a positive integer, got {out!r}')
            plen = len(tokenizer.encode(prompt)) if tokenizer is not None else len(prompt.split())
            requests.append(BenchRequest(len(requests), prompt, plen, out))
            if num is not None and len(requests) >= num:
                break
    if not requests:
        raise ValueError(f"{path}: no prompts found")
    if num is not None and len(requests) < num:
        logger.warning("%s has %d prompts, fewer than the %d asked for", path, len(requests), num)
    return requests


def arrival_offsets(n: int, rate: float, kind: str = "poisson", seed: int = 0) -> list[float]:
    """Send times in seconds from the start; the first request goes at 0.

    rate = inf sends everything at once; "poisson" draws exponential gaps of mean 1/rate,
    "fixed" spaces requests exactly 1/rate apart.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate) or n == 0:
        return [0.0] * n
    if kind == "fixed":
        gaps = np.full(n - 1, 1.0 / rate)
    elif kind == "poisson":
        # A stream of its own: the same seed gives the same arrivals whatever the prompts are.
        gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, size=n - 1)
    else:
        raise ValueError(f"unknown arrival kind {kind!r} (poisson or fixed)")
    return [0.0] + np.cumsum(gaps).tolist()
