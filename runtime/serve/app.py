"""The FastAPI app: routes, middleware and error handlers around one running AsyncEngine.

Routes never run model code: generation goes through ``AsyncEngine`` (its own thread), and
tokenisation through the preprocessor's worker thread.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import AsyncIterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from runtime.engine.async_engine import AsyncEngine
from runtime.serve.chat import ChatEndpoint
from runtime.serve.completions import CompletionsEndpoint
from runtime.serve.errors import APIError, bad_request, error_response, install_error_handlers
from runtime.serve.metrics import ServerMetrics, StatusCountingMiddleware
from runtime.serve.middleware import APIKeyMiddleware, BodyLimitMiddleware
from runtime.serve.preprocess import Preprocessor
from runtime.serve.profiler import add_profiler_routes
from runtime.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from runtime.serve.settings import ServerSettings
from runtime.serve.streaming import ClientDisconnected

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it


_Body = TypeVar("_Body", bound=BaseModel)


async def parse_body(request: Request, model: type[_Body]) -> _Body:
    """JSON whatever the Content-Type says (curl -d sends a form type); errors become OpenAI-shaped 400s."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


def _json_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def create_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings(created=int(time.time()))
    metrics = ServerMetrics(engine)
    pre = Preprocessor(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pre.close()

    app = FastAPI(title="graphmode", summary="OpenAI-compatible server for the graphmode runtime",
                  version="0.1.0", lifespan=lifespan)
    completions = CompletionsEndpoint(engine, pre, metrics, settings)
    chat = ChatEndpoint(engine, pre, metrics, settings)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics

    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    # Added last runs first: count every response, then check the key, then the body size.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(StatusCountingMiddleware, metrics=metrics)

    @app.post("/v1/completions", response_model=None, summary="Text completion (OpenAI)",
              openapi_extra=_json_body(CompletionRequest))
    async def create_completion(request: Request) -> Response:
        return await completions(await parse_body(request, CompletionRequest), request)

    @app.post("/v1/chat/completions", response_model=None, summary="Chat completion (OpenAI)",
              openapi_extra=_json_body(ChatCompletionRequest))
    async def create_chat_completion(request: Request) -> Response:
        return await chat(await parse_body(request, ChatCompletionRequest), request)

    @app.get("/v1/models", summary="The served model(s)")
    async def list_models() -> JSONResponse:
        cards = [ModelCard(id=name, created=settings.created, root=settings.model_name,
                           max_model_len=pre.max_model_len) for name in settings.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/health", summary="200 while the engine loop and every engine core run, else 503")
    async def health() -> JSONResponse:
        problem = engine.health_problem()
        if problem is not None:
            return error_response(APIError(503, problem))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    add_profiler_routes(app, engine, settings)
    return app
