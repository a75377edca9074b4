"""`python -m runtime.generate "prompt"`: one completion from a model (the embedded SmolLM2 by default)."""
from __future__ import annotations

import argparse
import logging
import sys

from models.checkpoint import CheckpointError
from models.default import DefaultModelMissing
from runtime.contracts.sampling_params import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.generate",
                                description="Generate a completion with graphmode's offline engine.")
    p.add_argument("prompt", nargs="?", default="What is the capital of France?", help="the prompt text")
    p.add_argument("--model", default=None, help="checkpoint dir or .gguf file (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from runtime import LLM

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                seed=args.seed)
        llm = LLM(args.model, dtype=args.dtype, max_num_seqs=1)
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
