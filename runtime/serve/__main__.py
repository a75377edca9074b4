"""``python -m runtime.serve``: build the engine (load, compile, warm up), then serve the OpenAI API
(runtime/serve/server.py); ``--headless`` runs this host's data-parallel engine cores only."""
from __future__ import annotations

import sys

from runtime.serve import data_parallel
from runtime.serve.cli import build_parser, configure_logging
from runtime.serve.server import engine_config, serve


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    configure_logging(args)
    try:
        if args.headless:
            return data_parallel.run_headless(args, engine_config(args))
        placement = data_parallel.placement_from_args(args) if data_parallel.uses_engine_core_processes(args) else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.api_server_count == 1:
        return serve(args, 0, placement)
    metrics_dir = data_parallel.share_metrics_between_processes()
    try:
        return serve(args, 0, placement, argv)
    finally:
        data_parallel.forget_shared_metrics(metrics_dir)


if __name__ == "__main__":
    sys.exit(main())
