"""The OpenAI-compatible HTTP front: `create_app(backend, settings) -> FastAPI`.

Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize (behind
API keys and rate limits when configured), /health, /ready, /metrics (open), /admin/... (behind
the admin keys; off without one; cluster backends only, see cluster/router/admin.py). Every error
leaves in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from cluster.errors import InvalidRequestError, NoWorkerError, PdserveError
from cluster.metrics import RouterMetrics
from cluster.router.admin import add_admin_routes
from cluster.router.backend import Backend
from cluster.router.chat import create_chat_completion
from cluster.router.completions import create_completion
from cluster.router.limits import FixedWindowRateLimiter, RateLimiter
from cluster.router.logprobs import TokenText
from cluster.router.middleware import GuardMiddleware, error_response
from cluster.router.openai import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                                   ModelCard, ModelList, TokenizeChatRequest, TokenizeCompletionRequest,
                                   TokenizeResponse)
from cluster.router.media.content import has_media
from cluster.router.media.fetch import MediaLoader
from cluster.router.media.prompt import multimodal_chat_prompt
from cluster.router.reasoning import get_reasoning_parser
from cluster.router.serving import RouterState, check_model, render_chat
from cluster.router.settings import RouterSettings

logger = logging.getLogger(__name__)


class Service(Protocol):
    """Background work that lives as long as the app (the planner): started after the backend is
    up, stopped before it closes."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def create_app(backend: Backend, settings: RouterSettings | None = None, *, rate_limiter: RateLimiter | None = None,
               close_backend: bool = True, metrics: RouterMetrics | None = None,
               services: Sequence[Service] = ()) -> FastAPI:
    """The router app over `backend`.

    rate_limiter: defaults to an in-memory fixed window when settings.rate_limit_per_minute is set
    (pass a `RedisRateLimiter` to share limits between routers). close_backend: close the backend
    when the app shuts down (the app's event loop owns its connections). metrics: the app's
    series (pass one when a service reads them, as the planner reads TTFT/ITL). services: run
    with the app's lifespan, in its event loop.
    """
    settings = settings or RouterSettings()
    if rate_limiter is None and settings.rate_limit_per_minute:
        rate_limiter = FixedWindowRateLimiter(settings.rate_limit_per_minute)
    info = backend.model
    media = settings.media
    if media.enable_mm is None:
        media = media.model_copy(update={"enable_mm": info.vision is not None})
    elif media.enable_mm and info.vision is None:
        raise ValueError(f"enable_mm: {info.name} is not a vision model (it takes text only)")
    state = RouterState(
        backend=backend, settings=settings, metrics=metrics or RouterMetrics(),
        model_name=settings.served_model_name or info.name, token_text=TokenText(info.tokenizer),
        reasoning=get_reasoning_parser(settings.reasoning_parser) if settings.reasoning_parser else None,
        media=media, media_loader=MediaLoader(media),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        logger.info("router serving %s (max_model_len %d) with %s", state.model_name, info.max_model_len, settings)
        started: list[Service] = []
        try:
            for service in services:
                await service.start()
                started.append(service)
            yield
        finally:
            for service in reversed(started):
                try:
                    await service.stop()
                except Exception as exc:  # noqa: BLE001 - the others and the backend must still stop
                    logger.warning("stopping %s: %s", type(service).__name__, exc)
            if close_backend:
                await backend.close()

    app = FastAPI(title="pdserve", lifespan=lifespan)
    app.state.router = state
    # Chat requests may carry base64 images: their cap is the multimodal one when images are on.
    chat_cap = {"/v1/chat/completions": max(settings.max_body_bytes, media.max_mm_body_bytes)} if media.enable_mm else {}
    app.add_middleware(GuardMiddleware, api_keys=settings.api_keys, limiter=rate_limiter,
                       max_body_bytes=settings.max_body_bytes, admin_api_keys=settings.admin_api_keys,
                       path_body_bytes=chat_cap)
    _add_error_handlers(app)
    admin = getattr(backend, "admin", None)
    if admin is not None and settings.admin_api_keys:
        add_admin_routes(app, admin)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, request, body)

    def card() -> ModelCard:
        return ModelCard(id=state.model_name, created=info.created, root=info.name, max_model_len=info.max_model_len)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> ModelCard:
        check_model(state, model)
        return card()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)  # the process is up; /ready says whether it can serve

    @app.get("/ready")
    async def ready() -> Response:
        try:
            ok, reason = await backend.readiness()
        except Exception as exc:  # noqa: BLE001 - a failing check means not ready, with the reason
            ok, reason = False, f"readiness check failed: {exc}"
        if ok:
            return JSONResponse({"ready": True, "reason": reason})
        return error_response(NoWorkerError(reason or "not ready"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await state.metrics.render(backend), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        check_model(state, body.model)
        tok = info.tokenizer
        if isinstance(body, TokenizeChatRequest) and has_media(body.messages):
            # Images count as the tokens they become (the prompt a worker computes).
            ids = list((await multimodal_chat_prompt(state, body.messages, body.add_generation_prompt,
                                                     body.continue_final_message, body.chat_template_kwargs)).token_ids)
        else:
            if isinstance(body, TokenizeChatRequest):
                text = render_chat(tok, body.messages, body.add_generation_prompt, body.continue_final_message,
                                   body.chat_template_kwargs)
            else:
                text = body.prompt
            ids = list(tok(text, add_special_tokens=body.add_special_tokens).input_ids)
        strs = [state.token_text(t) for t in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=info.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(state, body.model)
        vocab = len(info.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=info.tokenizer.decode(body.tokens))

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PdserveError)
    async def pdserve_error(_: Request, exc: PdserveError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        # FastAPI says 422; OpenAI (and its clients) expect 400 for a bad body.
        message, param = validation_message(exc.errors())
        return error_response(InvalidRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        err = PdserveError(str(exc.detail))
        err.status = exc.status_code
        err.type = "invalid_request_error"
        return error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        logger.error("unhandled error", exc_info=exc)
        return error_response(PdserveError("internal server error"))


def validation_message(errors: Any) -> tuple[str, str | None]:
    """A readable message (and the first bad field) from pydantic's error list."""
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"Invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        # Union members (e.g. prompt's str | list[...] forms) repeat in loc; keep the field path.
        field = ".".join(x for x in loc if not _is_type_tag(x))
        param = param or (field or None)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing" and not field:
            msg = "a JSON object body is required"
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(dict.fromkeys(parts)) or "invalid request body", param


# pydantic names union members in `loc` ("str", "list[int]", "function-after[...]", model names);
# field names are snake_case, so these never clash with them.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-[\w-]+\[.*\]|[A-Z]\w*)$")


def _is_type_tag(loc: str) -> bool:
    return bool(_TYPE_TAG.match(loc))
