"""``POST /start_profile`` and ``POST /stop_profile``: a torch profiler trace of every rank, as vLLM's server
offers. On only with ``--profiler-dir``; the traces (Chrome trace JSON, one per rank) open in Perfetto."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from runtime.engine.async_engine import AsyncEngine
from runtime.serve.errors import bad_request
from runtime.serve.settings import ServerSettings
from runtime.tracing import ProfilerStateError


def add_profiler_routes(app: FastAPI, engine: AsyncEngine, settings: ServerSettings) -> None:
    def directory() -> str:
        if settings.profiler_dir is None:
            raise bad_request("profiling is off: start the server with --profiler-dir DIR", code="profiler_disabled")
        return settings.profiler_dir

    @app.post("/start_profile", summary="Start a torch profiler trace on every rank (--profiler-dir)")
    async def start_profile() -> JSONResponse:
        where = directory()
        try:
            await engine.run_in_engine(lambda core: core.start_profile(where))
        except ProfilerStateError as e:
            raise bad_request(str(e), code="profiler_state") from None
        return JSONResponse({"status": "profiling", "directory": where})

    @app.post("/stop_profile", summary="Stop the trace and write one file per rank")
    async def stop_profile() -> JSONResponse:
        directory()
        try:
            traces = await engine.run_in_engine(lambda core: core.stop_profile())
        except ProfilerStateError as e:
            raise bad_request(str(e), code="profiler_state") from None
        return JSONResponse({"status": "stopped", "traces": traces})
