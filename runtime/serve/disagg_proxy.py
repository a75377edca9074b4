"""``python -m runtime.serve.disagg_proxy``: an OpenAI-compatible front for prefill/decode disaggregation.

Each generation request goes first to a prefill instance (a server with ``--kv-transfer-config
'{"kv_role": "kv_producer", ...}'``) with ``max_tokens=1``, no streaming and ``kv_transfer_params=
{"do_remote_decode": true}``; its response says where the prompt's KV waits. The request then goes, as the
client sent it plus those params, to a decode instance (``kv_consumer``), whose answer (streamed or not) is
the proxy's. Round-robin over several of each. A prefill instance that is down or fails leaves the decode
instance to compute the prompt itself (one log line): the request still succeeds.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import sys
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

logger = logging.getLogger("runtime.serve.disagg_proxy")

_FORWARDED_HEADERS = ("authorization",)


def create_proxy_app(prefill: list[str], decode: list[str], timeout_s: float = 600.0) -> FastAPI:
    prefill_urls, decode_urls = itertools.cycle(prefill), itertools.cycle(decode)
    client = httpx.AsyncClient(timeout=timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="graphmode disaggregated prefill/decode proxy", lifespan=lifespan)

    async def prefill_params(path: str, body: dict[str, Any], headers: dict[str, str]) -> dict | None:
        """The KV's whereabouts from a prefill instance, or None (the decode instance then computes it)."""
        first = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
        first.pop("stream_options", None)
        if "max_completion_tokens" in first:
            first["max_completion_tokens"] = 1
        url = next(prefill_urls) + path
        try:
            response = await client.post(url, json=first, headers=headers)
        except httpx.HTTPError as e:
            logger.warning("prefill instance %s failed (%s): the decode instance computes the prompt", url, e)
            return None
        if response.status_code != 200:
            logger.warning("prefill instance %s answered %d: the decode instance computes the prompt", url,
                           response.status_code)
            return None
        return response.json().get("kv_transfer_params")

    async def forward(path: str, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        params = await prefill_params(path, body, headers)
        second = {**body, **({"kv_transfer_params": params} if params else {})}
        url = next(decode_urls) + path
        try:
            if body.get("stream"):
                upstream = await client.send(client.build_request("POST", url, json=second, headers=headers),
                                             stream=True)
                return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                         media_type=upstream.headers.get("content-type"),
                                         background=BackgroundTask(upstream.aclose))
            upstream = await client.post(url, json=second, headers=headers)
        except httpx.HTTPError as e:
            return _error(502, f"decode instance {url} failed: {e}")
        return Response(upstream.content, status_code=upstream.status_code,
                        media_type=upstream.headers.get("content-type"))

    @app.post("/v1/completions", summary="Text completion: prefill on one instance, decode on another")
    async def completions(request: Request) -> Response:
        return await forward("/v1/completions", request)

    @app.post("/v1/chat/completions", summary="Chat completion: prefill on one instance, decode on another")
    async def chat_completions(request: Request) -> Response:
        return await forward("/v1/chat/completions", request)

    @app.get("/v1/models", summary="The decode instances' models")
    async def models(request: Request) -> Response:
        url = decode[0] + "/v1/models"
        try:
            upstream = await client.get(url, headers={k: v for k, v in request.headers.items()
                                                      if k.lower() in _FORWARDED_HEADERS})
        except httpx.HTTPError as e:
            return _error(502, f"decode instance {url} failed: {e}")
        return Response(upstream.content, status_code=upstream.status_code,
                        media_type=upstream.headers.get("content-type"))

    @app.get("/health", summary="200 when every prefill and decode instance is healthy, else 503")
    async def health() -> JSONResponse:
        async def ok(url: str) -> bool:
            try:
                return (await client.get(url + "/health", timeout=5.0)).status_code == 200
            except httpx.HTTPError:
                return False
        urls = prefill + decode
        down = [url for url, up in zip(urls, await asyncio.gather(*map(ok, urls))) if not up]
        if down:
            return _error(503, f"instances not healthy: {', '.join(down)}")
        return JSONResponse({"status": "ok"})

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "proxy_error", "code": status}}, status_code=status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve.disagg_proxy",
                                description="OpenAI-compatible proxy for prefill/decode disaggregation: each request "
                                            "prefills on a kv_producer instance, then decodes on a kv_consumer one.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--prefill", nargs="+", required=True, metavar="URL",
                   help="prefill instances (servers with a kv_producer --kv-transfer-config), e.g. http://host:8100")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL",
                   help="decode instances (servers with a kv_consumer --kv-transfer-config)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one upstream call may take (default: "
                                                                 "%(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for url in args.prefill + args.decode:
        if not url.startswith(("http://", "https://")):
            print(f"error: {url!r} is not an http(s) URL", file=sys.stderr)
            return 2
    import uvicorn

    app = create_proxy_app([u.rstrip("/") for u in args.prefill], [u.rstrip("/") for u in args.decode], args.timeout)
    logger.info("proxy on http://%s:%d: prefill %s, decode %s", args.host, args.port, args.prefill, args.decode)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
