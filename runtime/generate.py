"""`python -m runtime.generate "prompt"`: one completion from a model (the embedded SmolLM2 by default)."""
from __future__ import annotations

import argparse
import logging
import sys

from models.checkpoint import CheckpointError
from models.default import DefaultModelMissing
from runtime.logger import set_level as set_log_level


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.generate",
                                description="Generate a completion with graphmode's offline engine.")
    p.add_argument("prompt", nargs="?", default="What is the capital of France?", help="the prompt text")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, .gguf file, or a hub id (org/name) in the local Hugging Face cache "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto",
                   help="weights and activations: auto (the checkpoint's, float32 on CPU), float32, bfloat16 or "
                        "float16 (default: auto)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 = greedy (default: the model's generation config; the embedded "
                        "SmolLM2 samples at 0.2)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: keep the smallest set of tokens whose probability reaches this "
                        "(default: the model's generation config; 0.9 for the embedded SmolLM2)")
    p.add_argument("--seed", type=int, default=None,
                   help="per-request seed: the same seed gives the same completion (default: the engine's seed)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as is; by default a chat model gets it as a user message through its "
                        "chat template")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="where default sampling comes from: the checkpoint ('auto'), the library ('vllm'), or a "
                        "directory with a generation_config.json (default: %(default)s)")
    p.add_argument("--log-level", default="WARNING", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    set_log_level(args.log_level)  # our loggers carry their own level (runtime/logger.py)
    from runtime import LLM

    try:
        llm = LLM(args.model, dtype=args.dtype, max_num_seqs=1, generation_config=args.generation_config)
        chosen = {"temperature": args.temperature, "top_p": args.top_p}
        params = llm.engine.default_sampling_params(max_tokens=args.max_tokens, seed=args.seed,
                                                    **{k: v for k, v in chosen.items() if v is not None})
    except (ValueError, CheckpointError, DefaultModelMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.raw or llm.tokenizer.chat_template is None:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    print(out.outputs[0].text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
