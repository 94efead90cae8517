"""GuardMiddleware: API keys, per-key rate limits and the body size cap, before any parsing.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and disconnect detection pass
through untouched. The body is read here, counted against the cap (Content-Length is checked
first, but chunked or lying clients are caught by counting), then replayed to the app; after the
replay, `receive` is the server's own, so the app still sees `http.disconnect`.
"""
from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Mapping, Sequence

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.errors import (AuthenticationError, InvalidRequestError, NotFoundError, PdserveError, RateLimitError,
                            RequestTooLargeError)
from cluster.router.limits import RateLimiter
from cluster.router.openai import error_body

logger = logging.getLogger(__name__)

# Paths that need a user key (and count against the rate limit); /health, /ready, /metrics stay
# open. /admin needs an admin key, never a user key, and is off when no admin key is configured.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
ADMIN_PREFIX = "/admin"
BODY_METHODS = ("POST", "PUT", "PATCH")


def error_response(exc: PdserveError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def bearer_key(headers: Headers) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, key = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, api_keys: Sequence[str] = (), limiter: RateLimiter | None = None,
                 max_body_bytes: int = 4 << 20, admin_api_keys: Sequence[str] = (),
                 path_body_bytes: Mapping[str, int] | None = None) -> None:
        self.app = app
        # Per-path caps over the default (chat requests with images take a larger one).
        self.path_body_bytes = dict(path_body_bytes or {})
        self._keys = [k.encode() for k in api_keys]
        self._admin_keys = [k.encode() for k in admin_api_keys]
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes

    def _key_ok(self, key: str | None, keys: Sequence[bytes] | None = None) -> bool:
        if key is None:
            return False
        given = key.encode()
        # Compare against every key (no early exit) in constant time per key.
        return sum(hmac.compare_digest(given, k) for k in (self._keys if keys is None else keys)) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rejection = await self._check_access(scope, headers)
        if rejection is None and scope["method"] in BODY_METHODS:
            limit = self.path_body_bytes.get(scope["path"], self.max_body_bytes)
            rejection, receive = await self._read_body(headers, receive, limit)
        if rejection is not None:
            await rejection(scope, receive, send)
        elif receive is not None:
            await self.app(scope, receive, send)

    async def _check_access(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        path = scope["path"]
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            return self._check_admin(scope, headers)
        if not path.startswith(PROTECTED_PREFIXES):
            return None
        key = bearer_key(headers)
        if self._keys and not self._key_ok(key):
            logger.info("rejected %s %s: missing or wrong API key", scope["method"], scope["path"])
            return error_response(AuthenticationError(
                "Invalid or missing API key: send it as 'Authorization: Bearer <key>'."),
                headers={"WWW-Authenticate": "Bearer"})
        if self.limiter is None:
            return None
        client = scope.get("client")
        subject = key if key is not None else f"ip:{client[0] if client else 'unknown'}"
        try:
            allowed, retry_after = await self.limiter.allow(subject)
        except Exception as exc:  # noqa: BLE001 - fail open: a limiter outage must not take the API down
            logger.warning("rate limiter failed, letting the request through: %s", exc)
            return None
        if allowed:
            return None
        wait = max(1, math.ceil(retry_after))
        return error_response(RateLimitError(f"Rate limit reached for this API key: retry after {wait} s."),
                              headers={"Retry-After": str(wait)})

    def _check_admin(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        if not self._admin_keys:
            return error_response(NotFoundError(
                "The admin API is off: start the router with --admin-api-key (or $PDSERVE_ADMIN_API_KEY)."))
        if not self._key_ok(bearer_key(headers), self._admin_keys):
            logger.info("rejected %s %s: missing or wrong admin key", scope["method"], scope["path"])
            return error_response(AuthenticationError(
                "Invalid or missing admin key: send it as 'Authorization: Bearer <admin key>' "
                "(API keys do not open the admin API)."), headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(self, headers: Headers, receive: Receive,
                         limit: int) -> tuple[JSONResponse | None, Receive | None]:
        """(rejection, replaying receive); (None, None) when the client left while sending."""
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return error_response(InvalidRequestError(f"invalid Content-Length {length!r}")), receive
            if declared > limit:
                return _too_large(declared, limit), receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return _too_large(size, limit, at_least=True), receive
            chunks.append(body)
            if not message.get("more_body", False):
                break
        return None, _replay(b"".join(chunks), receive)


def _too_large(size: int, limit: int, at_least: bool = False) -> JSONResponse:
    what = f"more than {limit}" if at_least else str(size)
    return error_response(RequestTooLargeError(f"Request body is {what} bytes; the limit is {limit} bytes."))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
