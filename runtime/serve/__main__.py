"""``python -m runtime.serve``: build the engine (load, compile, warm up), then serve the OpenAI API.

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

from runtime.logger import set_level as set_log_level

logger = logging.getLogger("runtime.serve")

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
_ENGINE_WATCH_S = 0.5
_GRACEFUL_SHUTDOWN_S = 15


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.serve",
        description="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health, "
                    "/metrics) for graphmode's engine.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, .gguf file, or a hub id (org/name) already in the local Hugging Face "
                        "cache (nothing is downloaded); default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in the 'model' field; the first is reported in responses "
                        "(default: the --model argument, or SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for all interfaces (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*; also read from $GRAPHMODE_API_KEY")
    p.add_argument("--dtype", default="auto",
                   help="weights/activations dtype: auto, float32, bfloat16 or float16 (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="sequences batched together at most per step (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + completion) in tokens; default: min(model's maximum, 4096)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens processed per engine step at most; prefill chunks are cut to fit "
                        "(default: %(default)s)")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="fixed KV cache size in blocks of 16 tokens, overriding memory-based sizing "
                        "(default: profiled on GPU; on CPU a quarter of free memory, at most 1 GiB)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="fixed KV cache size in GiB (default: sized from free memory)")
    p.add_argument("--compilation-config", default=None, metavar="JSON",
                   help="compiler settings as JSON, e.g. '{\"mode\": \"compile\", \"graph_mode\": \"piecewise\"}' "
                        "(default: the platform's: compile + full_and_piecewise CUDA graphs on a GPU, eager on CPU)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no compilation and no static graphs, whatever --compilation-config says (vLLM's flag)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the model over this many ranks, one worker process each (default: %(default)s)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models under tensor or data parallelism: whole experts per rank instead of slices of "
                        "every expert (over data-parallel ranks the tokens always travel all-to-all)")
    # The choices of runtime.distributed.parallel_state.EXPERT_PARALLEL_COMMS, spelled out: --help imports no torch.
    p.add_argument("--expert-parallel-comm", choices=("all_reduce", "all_to_all"), default="all_reduce",
                   help="how expert outputs meet under --enable-expert-parallel: all_reduce (every rank runs its "
                        "experts on every token, one all-reduce; captures in graphs) or all_to_all (each token "
                        "travels to its experts' ranks and back; not capturable) (default: %(default)s)")
    dp = p.add_argument_group("data parallelism", "several engine cores, each a process with its own device(s) and KV "
                              "cache, behind this server; requests go to the least loaded one, or to the one the "
                              "X-data-parallel-rank header names")
    dp.add_argument("--data-parallel-size", type=int, default=1,
                    help="engine cores in all, on every host (default: %(default)s)")
    dp.add_argument("--data-parallel-size-local", type=int, default=None,
                    help="engine cores this host runs (default: all of them; 0 runs none here)")
    dp.add_argument("--data-parallel-start-rank", type=int, default=0,
                    help="the rank of this host's first engine core (default: %(default)s)")
    dp.add_argument("--data-parallel-address", default="127.0.0.1",
                    help="where the server listens for engine cores, which the other hosts connect to "
                         "(default: %(default)s)")
    dp.add_argument("--data-parallel-rpc-port", type=int, default=None,
                    help="the port of --data-parallel-address (needed when cores run on other hosts; default: a "
                         "free one)")
    dp.add_argument("--headless", action="store_true",
                    help="run this host's engine cores only, no HTTP server; they connect to the server at "
                         "--data-parallel-address:--data-parallel-rpc-port")
    dp.add_argument("--data-parallel-tolerate-failure", action="store_true",
                    help="when an engine core dies, fail its requests and serve on with the others (/health "
                         "still reports 503); default: shut the server down")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch each engine step while the previous one runs on the device, its "
                        "sampled tokens feeding the next step there (default: on for devices with streams, off on CPU; "
                        "off under tensor parallelism)")
    p.add_argument("--dbo", action="store_true",
                   help="dual-batch overlap: split large steps into two micro-batches whose communication "
                        "overlaps the other's compute (with tensor/expert parallelism; on one device it "
                        "stays off, as there is nothing to overlap)")
    p.add_argument("--dbo-decode-token-threshold", type=int, default=32,
                   help="with --dbo: split decode-only steps of at least this many tokens (default: %(default)s)")
    p.add_argument("--dbo-prefill-token-threshold", type=int, default=512,
                   help="with --dbo: split steps with a prefill of at least this many tokens "
                        "(default: %(default)s)")
    p.add_argument("--max-image-patches", type=int, default=None,
                   help="vision models: the largest image in encoder patches (default: the processor's max_pixels)")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="default sampling for fields a request leaves out: 'auto' reads the checkpoint's "
                        "generation_config.json (the embedded SmolLM2: temperature 0.2, top_p 0.9, its model "
                        "card's settings); 'vllm' uses the library defaults (temperature 1.0); or a directory "
                        "holding a generation_config.json (default: %(default)s)")
    p.add_argument("--profiler-dir", default=None, metavar="DIR",
                   help="turn on POST /start_profile and /stop_profile: a torch profiler trace of every rank "
                        "(host ops, and device kernels on a GPU) written to DIR as Chrome trace JSON, which "
                        "Perfetto opens (default: off)")
    p.add_argument("--mm-encoder-attn-backend", default=None, choices=["sdpa", "naive"],
                   help="vision models: the encoder's attention kernel; sdpa (torch's fused attention over all "
                        "images at once, capturable) or naive (the fp32 reference) (default: sdpa)")
    p.add_argument("--max-n", type=int, default=16,
                   help="largest n (completions per prompt) a request may ask for (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body in MiB; larger ones get 413 (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level of the server and the engine (default: %(default)s)")
    p.add_argument("--no-access-log", action="store_true", help="don't log one line per HTTP request")
    return p


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


def _bind(host: str, port: int) -> socket.socket:
    """Claims the port before the slow engine build (fails fast when taken); it listens only once serving."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _engine_config(args: argparse.Namespace):
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
                          data_parallel_size=args.data_parallel_size)


def _placement(args: argparse.Namespace):
    from runtime.engine.dp_client import DataParallelPlacement

    local = args.data_parallel_size if args.data_parallel_size_local is None else args.data_parallel_size_local
    if local < 0:
        raise ValueError(f"--data-parallel-size-local must be >= 0, got {local}")
    start = args.data_parallel_start_rank
    return DataParallelPlacement(args.data_parallel_size, range(start, start + local), args.data_parallel_address,
                                 args.data_parallel_rpc_port)


def _build_engine(args: argparse.Namespace):
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.core import EngineCore
    from runtime.engine.dp_client import DataParallelClient

    config = _engine_config(args)
    start = time.perf_counter()
    logger.info("building the engine: model=%s dtype=%s compilation=%s graphs=%s%s (load, compile, warm-up) ...",
                args.model or DEFAULT_SERVED_NAME, args.dtype, config.compilation_config.mode,
                config.compilation_config.graph_mode, " (enforce_eager)" if config.enforce_eager else "")
    if config.data_parallel_size > 1:
        placement = _placement(args)
        if placement.local_ranks and placement.local_ranks.start != 0:
            raise ValueError("the server's host runs data-parallel rank 0 (--data-parallel-start-rank 0); other "
                             "hosts run theirs with --headless")
        core = DataParallelClient(config, placement, tolerate_failure=args.data_parallel_tolerate_failure)
        blocks = core.num_kv_blocks
    else:
        core = EngineCore(config)
        blocks = core.kv_cache.num_blocks
    logger.info("engine ready in %.1f s: max_model_len=%d, max_num_seqs=%d, KV cache %d blocks%s",
                time.perf_counter() - start, core.max_model_len, config.max_num_seqs, blocks,
                f" per engine core ({config.data_parallel_size} cores)" if config.data_parallel_size > 1 else "")
    return AsyncEngine(core)


def _run_headless(args: argparse.Namespace) -> int:
    """This host's engine cores only: they connect to the server's host and run until it stops them."""
    from runtime.engine.dp_client import start_engine_cores

    placement = _placement(args)
    if placement.rpc_port is None:
        raise ValueError("--headless needs --data-parallel-rpc-port (the server's) and --data-parallel-address")
    if not placement.local_ranks:
        raise ValueError("--headless with no engine cores to run: set --data-parallel-size-local")
    procs = start_engine_cores(_engine_config(args), placement.local_ranks,
                               f"tcp://{placement.address}:{placement.rpc_port}", headless=True)
    logger.info("headless: engine cores %d..%d started, serving the front at %s:%d", placement.local_ranks.start,
                placement.local_ranks.stop - 1, placement.address, placement.rpc_port)

    def stop(signum, frame) -> None:
        for proc in procs:
            proc.terminate()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for proc in procs:
        proc.join()
    failed = [p.name for p in procs if p.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        logger.error("engine cores ended with an error: %s", ", ".join(failed))
    return 1 if failed else 0


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


def _exit_when_engine_dies(engine, server) -> None:
    """A dead engine loop (e.g. a tensor-parallel worker died) stops the server: serving only
    errors would hide the failure from whatever supervises this process."""
    def watch() -> None:
        while not server.should_exit:
            if not engine.is_alive and not server.should_exit:
                logger.error("the engine stopped (%s): shutting the server down", engine.failure)
                server.should_exit = True
                return
            time.sleep(_ENGINE_WATCH_S)

    threading.Thread(target=watch, name="graphmode-engine-watch", daemon=True).start()


def engine_died_cleanly(engine) -> bool:
    return engine.failure is None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_log_level(args.log_level)  # our loggers carry their own level (runtime/logger.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    api_key = args.api_key or os.environ.get("GRAPHMODE_API_KEY") or None

    from models.checkpoint import CheckpointError
    from models.default import DefaultModelMissing
    from runtime.serve.settings import MiB, ServerSettings

    if args.headless:
        try:
            return _run_headless(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"error: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    try:
        settings = ServerSettings(served_model_names=args.served_model_name or [args.model or DEFAULT_SERVED_NAME],
                                  api_key=api_key, max_n=args.max_n, max_body_bytes=int(args.max_body_mb * MiB),
                                  created=int(time.time()),
                                  profiler_dir=os.path.abspath(args.profiler_dir) if args.profiler_dir else None,
                                  data_parallel_size=args.data_parallel_size)
        with _interrupt_on_sigterm():
            engine = _build_engine(args)
    except KeyboardInterrupt:
        sock.close()
        logger.info("interrupted during start-up")
        return 0
    except (ValueError, CheckpointError, DefaultModelMissing) as e:
        sock.close()
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
    _exit_when_engine_dies(engine, server)
    logger.info("serving %s on http://%s:%d%s", settings.model_name, args.host, sock.getsockname()[1],
                " (API key required)" if api_key else "")
    try:
        server.run(sockets=[sock])  # listening starts here, with the engine ready
    except OSError as e:  # another process bound the same port meanwhile and listened first
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    finally:
        engine.shutdown()
        sock.close()
    if not server.started or not engine_died_cleanly(engine):
        return 1
    logger.info("shut down cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
