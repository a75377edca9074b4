"""One API server process: bind the port, build the engine (or this process's front to the engine cores),
serve the OpenAI API until a signal, then shut down cleanly.

The port opens only once the engine is ready. SIGINT/SIGTERM stop accepting connections, abort the
requests in flight (their streams end with an error event and ``[DONE]``), shut the engine down and
exit 0. A second SIGINT forces the exit.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterator

from runtime.serve.cli import DEFAULT_SERVED_NAME, build_parser, configure_logging

logger = logging.getLogger("runtime.serve")

_ENGINE_WATCH_S = 0.5
_GRACEFUL_SHUTDOWN_S = 15


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """During start-up, SIGTERM interrupts like Ctrl-C does (and the process still exits 0)."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Claims the port before the slow engine build (fails fast when taken); it listens only once serving.
    ``reuse_port``: several API server processes share it (the kernel spreads the connections)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def engine_config(args: argparse.Namespace):
    from runtime.contracts.config import EngineConfig

    return EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                          num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb,
                          compilation_config=args.compilation_config, enforce_eager=args.enforce_eager,
                          enable_dbo=args.dbo,
                          async_scheduling=args.async_scheduling,
                          dbo_decode_token_threshold=args.dbo_decode_token_threshold,
                          dbo_prefill_token_threshold=args.dbo_prefill_token_threshold,
                          max_image_patches=args.max_image_patches,
                          tensor_parallel_size=args.tensor_parallel_size,
                          enable_expert_parallel=args.enable_expert_parallel,
                          expert_parallel_comm=args.expert_parallel_comm,
                          generation_config=args.generation_config,
                          mm_encoder_attn_backend=args.mm_encoder_attn_backend,
                          data_parallel_size=args.data_parallel_size, kv_transfer_config=args.kv_transfer_config)


def _build_engine(args: argparse.Namespace, front_index: int = 0, placement=None):
    """The engine in this process, or (data parallelism, several API servers) front ``front_index`` to the
    engine cores' processes."""
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.core import EngineCore

    config = engine_config(args)
    start = time.perf_counter()
    logger.info("building the engine: model=%s dtype=%s compilation=%s graphs=%s%s (load, compile, warm-up) ...",
                args.model or DEFAULT_SERVED_NAME, args.dtype, config.compilation_config.mode,
                config.compilation_config.graph_mode, " (enforce_eager)" if config.enforce_eager else "")
    if placement is not None:
        from runtime.engine.dp_client import DataParallelClient

        core = DataParallelClient(config, placement, args.data_parallel_tolerate_failure, front_index)
        blocks = core.num_kv_blocks
    else:
        core = EngineCore(config)
        blocks = core.kv_cache.num_blocks
    logger.info("engine ready in %.1f s: max_model_len=%d, max_num_seqs=%d, KV cache %d blocks%s",
                time.perf_counter() - start, core.max_model_len, config.max_num_seqs, blocks,
                f" per engine core ({config.data_parallel_size} cores)" if config.data_parallel_size > 1 else "")
    return AsyncEngine(core)


def _make_server(config, on_exit: Callable[[], None]):
    import uvicorn

    class Server(uvicorn.Server):
        """Shuts the engine down on the first signal and exits 0 (uvicorn would re-raise the signal)."""
        _exiting = False

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            if not self._exiting:
                self._exiting = True
                logger.info("received %s: no new connections; aborting requests in flight and stopping the engine",
                            signal.Signals(sig).name)
                on_exit()

    return Server(config)


def _exit_when_engine_dies(engine, server, api_servers: list | None = None) -> None:
    """A dead engine loop (e.g. a tensor-parallel worker died), or another API server process gone, stops the
    server: serving only errors would hide the failure from whatever supervises this process."""
    def watch() -> None:
        while not server.should_exit:
            gone = [p.name for p in api_servers or [] if not p.is_alive()]
            if (not engine.is_alive or gone) and not server.should_exit:
                logger.error("%s: shutting the server down", f"API server(s) {', '.join(gone)} exited" if gone
                             else f"the engine stopped ({engine.failure})")
                server.should_exit = True
                return
            time.sleep(_ENGINE_WATCH_S)

    threading.Thread(target=watch, name="graphmode-engine-watch", daemon=True).start()


def engine_died_cleanly(engine) -> bool:
    return engine.failure is None


def run_api_server(argv: list[str], index: int, placement) -> int:
    """API server process ``index`` > 0 (spawned by the first: runtime/serve/data_parallel.py)."""
    args = build_parser().parse_args(argv)
    configure_logging(args)
    return serve(args, index, placement)


def serve(args: argparse.Namespace, front_index: int, placement, argv: list[str] | None = None) -> int:
    """Bind, build the engine (or this API server's front to the engine cores), serve until a signal.
    ``argv``: the first of several API servers starts the others with it."""
    from models.checkpoint import CheckpointError
    from models.default import DefaultModelMissing
    from runtime.serve.data_parallel import start_api_servers, stop_api_servers
    from runtime.serve.settings import MiB, ServerSettings

    api_key = args.api_key or os.environ.get("GRAPHMODE_API_KEY") or None
    try:
        sock = _bind(args.host, args.port, reuse_port=args.api_server_count > 1)
    except OSError as e:
        print(f"error: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    api_servers = start_api_servers(run_api_server, argv, placement) if argv is not None else []
    try:
        settings = ServerSettings(served_model_names=args.served_model_name or [args.model or DEFAULT_SERVED_NAME],
                                  api_key=api_key, max_n=args.max_n, max_body_bytes=int(args.max_body_mb * MiB),
                                  created=int(time.time()),
                                  profiler_dir=os.path.abspath(args.profiler_dir) if args.profiler_dir else None,
                                  data_parallel_size=args.data_parallel_size)
        with _interrupt_on_sigterm():
            engine = _build_engine(args, front_index, placement)
    except KeyboardInterrupt:
        sock.close()
        stop_api_servers(api_servers, _GRACEFUL_SHUTDOWN_S)
        logger.info("interrupted during start-up")
        return 0
    except (ValueError, CheckpointError, DefaultModelMissing) as e:
        sock.close()
        stop_api_servers(api_servers, _GRACEFUL_SHUTDOWN_S)
        print(f"error: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from runtime.serve.app import create_app

    def stop_engine() -> None:  # from a signal handler: never block the event loop
        threading.Thread(target=engine.shutdown, name="graphmode-shutdown", daemon=True).start()

    config = uvicorn.Config(create_app(engine, settings), host=args.host, port=args.port, log_config=None,
                            log_level=args.log_level, access_log=not args.no_access_log,
                            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)
    server = _make_server(config, stop_engine)
    _exit_when_engine_dies(engine, server, api_servers)
    logger.info("serving %s on http://%s:%d%s%s", settings.model_name, args.host, sock.getsockname()[1],
                " (API key required)" if api_key else "",
                f" (API server {front_index} of {args.api_server_count})" if args.api_server_count > 1 else "")
    try:
        server.run(sockets=[sock])  # listening starts here, with the engine ready
    except OSError as e:  # another process bound the same port meanwhile and listened first
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    finally:
        stop_api_servers(api_servers, _GRACEFUL_SHUTDOWN_S)  # before the cores: their requests end first
        engine.shutdown()
        sock.close()
    if not server.started or not engine_died_cleanly(engine):
        return 1
    logger.info("shut down cleanly")
    return 0
