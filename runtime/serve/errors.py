"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a fitting status.

Bad input never produces a 500 or a stack trace: handlers below turn validation, routing and our own
``APIError`` into 4xx bodies; anything unexpected becomes a logged 500 in the same shape.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
          503: "service_unavailable_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
          500: "internal_error", 503: "engine_unavailable"}
_MAX_LISTED_ERRORS = 3


class APIError(Exception):
    """An error the client caused (or a known server state), reported with status and OpenAI fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or _CODES.get(status, "invalid_value" if status == 400 else None)
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def from_sampling_error(e: ValueError) -> APIError:
    """SamplingParams' ValueErrors start with the field name ("top_p must be in (0, 1], got 2")."""
    message = str(e)
    field = message.split(" ", 1)[0]
    return bad_request(message, param=field if field.isidentifier() else None)


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        where = _loc(tuple(detail.get("loc", ())))
        return bad_request(f"the request body is not valid JSON ({detail.get('msg', 'decode error')}"
                           f"{' at position ' + where if where else ''})", code="invalid_json")
    by_field: dict[str, list[dict]] = {}
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        by_field.setdefault(str(loc[0]) if loc else "", []).append(e)
    parts = []
    for field, errs in list(by_field.items())[:_MAX_LISTED_ERRORS]:
        if not field:
            parts.append("the request body must be a JSON object" if errs[0].get("type") in ("model_type", "dict_type")
                         else str(errs[0].get("msg")))
        elif len(errs) == 1:
            parts.append(f"{_loc(tuple(errs[0].get('loc', ())))}: {errs[0].get('msg')}")
        else:  # a union field: every alternative failed; name the first problem
            parts.append(f"{field}: matches none of its allowed types (e.g. {_loc(tuple(errs[0].get('loc', ())))}: "
                         f"{errs[0].get('msg')})")
    if len(by_field) > _MAX_LISTED_ERRORS:
        parts.append(f"... and {len(by_field) - _MAX_LISTED_ERRORS} more fields")
    param = next(iter(by_field), "") or None
    return bad_request("invalid request: " + "; ".join(parts), param=param, code="invalid_type")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(APIError(exc.status_code, message), headers=getattr(exc, "headers", None))

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return error_response(bad_request("request body is nested too deeply to parse", code="invalid_json"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(APIError(500, "internal server error; see the server log"))
