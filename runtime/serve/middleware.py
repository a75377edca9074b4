"""Pure-ASGI guards that run before any route: the API key and the request body size.

Both answer in OpenAI's error shape. A too-large body is read and dropped (up to a bound) before the
413 goes out: closing a socket with unread data makes the kernel reset the connection, and the
client would see a reset instead of the answer.
"""
from __future__ import annotations

import secrets

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.serve.errors import APIError, error_response

_DRAIN_FACTOR = 16  # read at most this many times the limit before giving up on a polite 413


async def _drain(receive: Receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class APIKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on /v1/* when a key is configured."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_key or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        message = "missing API key" if not token else "invalid API key"
        await _drain(receive, 1 << 20)
        response = error_response(APIError(401, f"{message}: send 'Authorization: Bearer <key>'"),
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``, whether announced by Content-Length or sent chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> str:
        return f"request body is larger than the server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await error_response(APIError(400, "invalid Content-Length header"))(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await _drain(receive, self.max_bytes * _DRAIN_FACTOR)
                await error_response(APIError(413, self._too_large()))(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive, self.max_bytes * _DRAIN_FACTOR)
                    # fastapi re-raises HTTPException from body reading; the handler shapes it.
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited_receive, send)
