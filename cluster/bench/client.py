"""Streams one request to an OpenAI-compatible server and times it (TTFT, ITL, E2E)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from cluster.bench.workload import BenchRequest

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class RequestRecord:
    """What one request measured. Times are seconds; start_s counts from the benchmark start."""

    index: int
    success: bool
    start_s: float
    e2e_s: float  # send to end of stream (or to the error, for a failure)
    ttft_s: float | None = None  # send to the first chunk with content
    itl_s: tuple[float, ...] = ()  # gaps between consecutive content chunks
    output_tokens: int = 0  # usage.completion_tokens, else the number of content chunks
    prompt_tokens: int = 0  # usage.prompt_tokens, else the workload's estimate
    usage_reported: bool = False
    error: str | None = None


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to send: one per benchmark run."""

    url: str
    model: str
    chat: bool
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float | None = None
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None  # whole-request limit; None = no limit


def join_url(base_url: str, endpoint: str) -> str:
    """base + endpoint, tolerating a base that already ends in /v1 (a common way to write it)."""
    base = base_url.rstrip("/")
    path = "/" + endpoint.lstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[3:]
    return base + path


def is_chat_endpoint(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith("chat/completions")


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(cfg: EndpointConfig, req: BenchRequest) -> dict[str, Any]:
    """The JSON body: streamed, with usage, and ignore_eos/min_tokens as vLLM's bench sends."""
    body: dict[str, Any] = {"model": cfg.model, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if req.output_len is not None:
        # max_tokens rather than max_completion_tokens: vLLM, SGLang and pdserve all take it on
        # both endpoints; --extra-body can add the other where a server insists.
        body["max_tokens"] = req.output_len
        if cfg.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = req.output_len
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    body.update(cfg.extra_body)
    return body


_DONE = object()


def parse_sse_line(line: str) -> dict[str, Any] | object | None:
    """One SSE line -> a JSON event, _DONE, or None for blank lines, comments and other fields."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    if not data:
        return None
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError(f"unexpected SSE payload: {data[:_MAX_ERROR_CHARS]}")
    return event


def chunk_text(event: Mapping[str, Any], chat: bool) -> str:
    """The generated text in one event (empty for role-only, finish and usage chunks)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream their thinking separately; it is still generated output.
    return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""


def error_message(body: str) -> str:
    """The message inside an OpenAI/FastAPI error body, else the body itself, shortened."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:_MAX_ERROR_CHARS]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail")
            if msg:
                return str(msg)[:_MAX_ERROR_CHARS]
        elif isinstance(err, str):
            return err[:_MAX_ERROR_CHARS]
        if "detail" in data:
            return str(data["detail"])[:_MAX_ERROR_CHARS]
    return body.strip()[:_MAX_ERROR_CHARS]


class ServerError(Exception):
    """The server answered, but with an error (HTTP status or an error event in the stream)."""


class _Progress:
    """Mutable timings of a request in flight, kept outside the coroutine so a timeout keeps them."""

    def __init__(self) -> None:
        self.token_times: list[float] = []
        self.usage: Mapping[str, Any] | None = None


class StreamingClient:
    """Sends BenchRequests over a shared httpx.AsyncClient; send() never raises but on cancel."""

    def __init__(self, cfg: EndpointConfig, http: httpx.AsyncClient) -> None:
        self.cfg = cfg
        self.http = http

    async def send(self, req: BenchRequest, bench_start: float) -> RequestRecord:
        progress = _Progress()
        start = time.perf_counter()
        error: str | None = None
        try:
            if self.cfg.timeout_s is None:
                await self._stream(req, start, progress)
            else:
                await asyncio.wait_for(self._stream(req, start, progress), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            error = f"timed out after {self.cfg.timeout_s:g} s"
        except ServerError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure is one failed request, not a crash
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        end = time.perf_counter()
        if error is None and not progress.token_times:
            error = "stream ended without any generated text"
        return _record(req, start - bench_start, start, end, progress, error)

    async def _stream(self, req: BenchRequest, start: float, progress: _Progress) -> None:
        payload = build_payload(self.cfg, req)
        headers = auth_headers(self.cfg.api_key)
        async with self.http.stream("POST", self.cfg.url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", errors="replace")
                raise ServerError(f"HTTP {resp.status_code}: {error_message(body)}")
            async for line in resp.aiter_lines():
                now = time.perf_counter()  # before parsing, so JSON decoding is not counted
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event is _DONE:
                    break
                assert isinstance(event, dict)
                if "error" in event or event.get("object") == "error":
                    raise ServerError(f"error event: {error_message(json.dumps(event))}")
                if chunk_text(event, self.cfg.chat):
                    progress.token_times.append(now)
                if event.get("usage"):  # the last report wins (some servers send one per chunk)
                    progress.usage = event["usage"]


def _record(
    req: BenchRequest, start_s: float, start: float, end: float, progress: _Progress, error: str | None
) -> RequestRecord:
    times = progress.token_times
    usage = progress.usage or {}
    completion = usage.get("completion_tokens")
    prompt = usage.get("prompt_tokens")
    return RequestRecord(
        index=req.index,
        success=error is None,
        start_s=start_s,
        e2e_s=end - start,
        ttft_s=times[0] - start if times else None,
        itl_s=tuple(b - a for a, b in zip(times, times[1:])),
        output_tokens=int(completion) if isinstance(completion, int) else len(times),
        prompt_tokens=int(prompt) if isinstance(prompt, int) else req.prompt_len,
        usage_reported=isinstance(completion, int),
        error=error,
    )


async def first_model(http: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The first model id listed by GET /v1/models."""
    resp = await http.get(join_url(base_url, "/v1/models"), headers=auth_headers(api_key))
    if resp.status_code != 200:
        raise ServerError(f"GET /v1/models: HTTP {resp.status_code}: {error_message(resp.text)}")
    models = resp.json().get("data") or []
    if not models:
        raise ServerError("GET /v1/models returned no models; pass --model")
    return str(models[0]["id"])
