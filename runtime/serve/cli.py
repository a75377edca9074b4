"""The server's command line: its flags (``python -m runtime.serve --help``) and its logging."""
from __future__ import annotations

import argparse
import logging
import os

from runtime.logger import set_level as set_log_level

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


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
    dp.add_argument("--api-server-count", type=int, default=1,
                    help="HTTP server processes sharing --port, each talking to every engine core (the cores run in "
                         "processes of their own then, also with --data-parallel-size 1) (default: %(default)s)")
    dp.add_argument("--data-parallel-tolerate-failure", action="store_true",
                    help="when an engine core dies, fail its requests and serve on with the others (/health "
                         "still reports 503); default: shut the server down")
    p.add_argument("--kv-transfer-config", default=None, metavar="JSON",
                   help="prefill/decode disaggregation: this instance's side, e.g. '{\"kv_role\": \"kv_producer\", "
                        "\"kv_port\": 14579}' (a prefill instance serving prompt KV there) or '{\"kv_role\": "
                        "\"kv_consumer\"}' (a decode instance fetching it); fields kv_role (kv_producer, kv_consumer, "
                        "kv_both), kv_connector (zmq), kv_port, kv_ip, transfer_timeout_s. Put "
                        "python -m runtime.serve.disagg_proxy in front of both (default: off)")
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


def configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_log_level(args.log_level)  # our loggers carry their own level (runtime/logger.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
