"""A minimal paged-KV driver for model tests: one mixed prefill, then one-token decode steps.

The engine's scheduler does this for real; here the metadata is built by hand so the model and
the attention op can be checked on their own.
"""
from __future__ import annotations

import torch

from runtime.attention.kv_tensors import allocate_kv_caches
from runtime.attention.metadata import AttentionMetadata
from runtime.forward_context import set_forward_context

BLOCK_SIZE = 16


class PagedDriver:
    def __init__(self, model, max_len: int, num_seqs: int, device="cpu", dtype=torch.float32):
        self.model, self.device = model, device
        blocks_per_seq = -(-max_len // BLOCK_SIZE)
        # Interleave the block ids of different sequences so block tables are non-trivial.
        self.tables = [[b * num_seqs + s + 1 for b in range(blocks_per_seq)] for s in range(num_seqs)]
        self.kv = allocate_kv_caches(model, blocks_per_seq * num_seqs + 1, BLOCK_SIZE, dtype, device)

    @torch.inference_mode()
    def step(self, new_tokens: list[list[int]], start_positions: list[int], rows: list[int]) -> torch.Tensor:
        """Run the new tokens of the sequences in ``rows``; returns logits of every token [T, V]."""
        ids = torch.tensor([t for toks in new_tokens for t in toks], device=self.device)
        pos = torch.tensor([p + i for toks, p in zip(new_tokens, start_positions) for i in range(len(toks))],
                           device=self.device)
        md = AttentionMetadata.build(
            query_lens=[len(t) for t in new_tokens],
            seq_lens=[p + len(t) for t, p in zip(new_tokens, start_positions)],
            block_tables=[self.tables[r] for r in rows], block_size=BLOCK_SIZE, device=self.device)
        with set_forward_context(md, self.kv):
            hidden = self.model(ids, pos)
        return self.model.compute_logits(hidden)

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int,
                        eos_token_id: int | None = None) -> tuple[list[list[int]], torch.Tensor]:
        """Greedy tokens per prompt (stopping at eos) and the prefill logits."""
        logits = self.step(prompts, [0] * len(prompts), list(range(len(prompts))))
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
        nxt = logits[ends.to(logits.device)].argmax(-1).tolist()
        outputs = [[t] for t in nxt]
        lengths = [len(p) for p in prompts]
        for _ in range(max_new_tokens - 1):
            rows = [i for i, out in enumerate(outputs) if out[-1] != eos_token_id]
            if not rows:
                break
            step_logits = self.step([[outputs[r][-1]] for r in rows], [lengths[r] for r in rows], rows)
            for r, tok in zip(rows, step_logits.argmax(-1).tolist()):
                outputs[r].append(tok)
                lengths[r] += 1
        return outputs, logits
