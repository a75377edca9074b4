"""Batched token sampler: logits [B, V] -> one token per request.

Stages, in order: penalties -> greedy argmax -> temperature -> top-k -> top-p -> min-p ->
exponential-race sample. Every stage is a batched tensor op on the logits' device. Which
stages run is decided by host-side flags precomputed in ``SamplingBatch.build``, so
``Sampler.forward`` never syncs with the device (no ``.item()``, ``.tolist()``,
``bool(tensor)``) and a batch where nobody uses top-p never pays for the sort.

Reported logprobs come from the *raw* model logits (before penalties, temperature and
truncation), like vLLM's default "raw_logprobs" mode: they describe what the model thought,
not the shaped distribution, and they stay finite for every token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from runtime.contracts.sampling_params import SamplingParams
from runtime.platforms import current_platform


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A per-request generator; the worker creates it when it first sees the request and keeps it
    for the request's life, so its stream continues across steps instead of restarting each step."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [r + [pad] * (width - len(r)) for r in rows]
    return current_platform.to_device(padded, torch.int64, device).reshape(len(rows), width)


@dataclass
class SamplingBatch:
    """Per-step sampling tensors for B requests, built once per step on the host."""

    temperature: Tensor  # [B] float32; greedy rows hold 1.0 so the division stays finite
    top_p: Tensor  # [B] float32
    top_k: Tensor  # [B] int64; vocab_size where top-k is off
    min_p: Tensor  # [B] float32
    repetition_penalty: Tensor  # [B] float32
    presence_penalty: Tensor  # [B] float32
    frequency_penalty: Tensor  # [B] float32
    is_greedy: Tensor  # [B] bool
    all_greedy: bool
    any_greedy: bool
    any_penalties: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    vocab_size: int
    # Token history for penalties, [B, L] int64 padded with vocab_size (a column past the
    # vocabulary that scatters land in and are then dropped); None when no row has penalties.
    prompt_token_ids: Tensor | None = None
    output_token_ids: Tensor | None = None
    # row -> the request's own generator; only non-greedy seeded rows, since greedy rows
    # never draw and must not advance their stream.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    max_num_logprobs: int | None = None

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str = "cpu",
        seeded_generators: list[torch.Generator | None] | None = None,
    ) -> "SamplingBatch":
        device = torch.device(device)
        num = len(params)
        if seeded_generators is None:
            seeded_generators = [None] * num
        if not (len(prompt_ids) == len(output_ids) == len(seeded_generators) == num):
            raise ValueError("params, prompt_ids, output_ids and seeded_generators need one entry per request")

        def on_device(values: list, dtype: torch.dtype) -> Tensor:
            # Built on the host and copied without making the host wait for the device (the async
            # scheduling launch path must never wait; tests/gpu/test_async_scheduling_gpu.py).
            return current_platform.to_device(values, dtype, device)

        greedy = [p.greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        any_penalties = any(p.has_penalties for p in params)
        requested = [p.logprobs for p in params if p.logprobs is not None]
        floats = on_device([[1.0 if g else p.temperature for p, g in zip(params, greedy)], [p.top_p for p in params],
                            [p.min_p for p in params], [p.repetition_penalty for p in params],
                            [p.presence_penalty for p in params], [p.frequency_penalty for p in params]],
                           torch.float32).reshape(6, num)
        return cls(
            temperature=floats[0],
            top_p=floats[1],
            top_k=on_device(top_k, torch.int64),
            min_p=floats[2],
            repetition_penalty=floats[3],
            presence_penalty=floats[4],
            frequency_penalty=floats[5],
            is_greedy=on_device(greedy, torch.bool),
            all_greedy=num > 0 and all(greedy),
            any_greedy=any(greedy),
            any_penalties=any_penalties,
            any_top_k=any(k < vocab_size for k in top_k),
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0.0 for p in params),
            vocab_size=vocab_size,
            prompt_token_ids=_pad(prompt_ids, vocab_size, device) if any_penalties else None,
            output_token_ids=_pad(output_ids, vocab_size, device) if any_penalties else None,
            generators=_collect_generators(params, greedy, seeded_generators),
            max_num_logprobs=max(requested) if requested else None,
        )


def _collect_generators(
    params: list[SamplingParams], greedy: list[bool], gens: list[torch.Generator | None]
) -> dict[int, torch.Generator]:
    out: dict[int, torch.Generator] = {}
    for row, (p, g, gen) in enumerate(zip(params, greedy, gens)):
        if p.seed is not None and gen is None:
            # A generator made here would restart every step and repeat the same noise.
            raise ValueError(f"request in row {row} has seed={p.seed} but no generator; use make_generator")
        if gen is not None and not g:
            out[row] = gen
    return out


@dataclass
class SamplerOutput:
    sampled_token_ids: Tensor  # [B] int64
    logprobs: Tensor | None = None  # [B] float32: sampled token's logprob under the raw logits (when asked)
    top_logprobs: Tensor | None = None  # [B, K] float32, descending
    top_token_ids: Tensor | None = None  # [B, K] int64


def _history_counts(token_ids: Tensor, vocab_size: int) -> Tensor:
    """[B, L] padded ids -> [B, V] float32 occurrence counts (padding is dropped)."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (HF style, prompt + output) then presence/frequency (output only)."""
    assert batch.prompt_token_ids is not None and batch.output_token_ids is not None
    output_counts = _history_counts(batch.output_token_ids, batch.vocab_size)
    seen = (_history_counts(batch.prompt_token_ids, batch.vocab_size) > 0) | (output_counts > 0)
    rep = batch.repetition_penalty.unsqueeze(1)
    # Dividing a negative logit would raise it, so negatives are multiplied instead.
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - batch.frequency_penalty.unsqueeze(1) * output_counts
    return logits - batch.presence_penalty.unsqueeze(1) * (output_counts > 0).float()


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Mask tokens outside top-k, then outside the top-p nucleus of what is left.

    One descending sort serves both. Top-k keeps exactly k tokens (ties broken by token id,
    via a stable sort). Top-p keeps a token while the mass strictly before it is < p, so the
    most likely token always survives and the nucleus is the smallest set reaching p.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        remove = ranks >= top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Rows with p == 1 are exempt: cumsum rounding could otherwise clip the tail.
        outside = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        remove = remove | outside
    mask = torch.empty_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def shape_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Temperature and truncation: turns penalised logits into the distribution sampled from."""
    logits = logits / batch.temperature.unsqueeze(1)
    if batch.any_top_k or batch.any_top_p:
        top_k = batch.top_k if batch.any_top_k else None
        top_p = batch.top_p if batch.any_top_p else None
        logits = apply_top_k_top_p(logits, top_k, top_p)
    if batch.any_min_p:
        logits = apply_min_p(logits, batch.min_p)
    return logits


def exponential_race(probs: Tensor, generators: dict[int, torch.Generator]) -> Tensor:
    """argmax(probs / q), q ~ Exp(1) i.i.d., is an exact draw from each row of probs.

    Seeded rows draw their [V] noise from their own generator, so their tokens depend only on
    their seed and step count, never on which other requests share the batch.
    """
    if len(generators) == probs.shape[0]:
        q = torch.empty_like(probs)
    else:
        q = torch.empty_like(probs).exponential_()
    for row, generator in generators.items():
        q[row] = torch.empty_like(probs[row]).exponential_(generator=generator)
    # Exp(1) can round to 0; a zero would turn 0/0 into NaN for masked tokens.
    q = q.clamp_min(torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def _logprobs(raw: Tensor, token_ids: Tensor, k: int | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if not k:
        # Only the sampled token is needed: skip materialising the full log_softmax.
        picked = raw.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        return picked - raw.logsumexp(dim=-1), None, None
    logprobs = raw.log_softmax(dim=-1)
    top_values, top_ids = logprobs.topk(k, dim=-1)
    return logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1), top_values, top_ids


class Sampler(torch.nn.Module):
    """Stateless: all per-request state (params, history, generators) arrives in the batch."""

    def process_logits(self, logits: Tensor, batch: SamplingBatch) -> Tensor:
        """The final float32 logits that non-greedy rows sample from (-inf = removed)."""
        logits = logits.float()
        if batch.any_penalties:
            logits = apply_penalties(logits, batch)
        return shape_logits(logits, batch)

    def forward(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        if batch.all_greedy and not batch.any_penalties and batch.max_num_logprobs is None:
            # The argmax of the model's dtype is the float32 one (the cast is exact and keeps the order):
            # no float copy of every row's logits on the decode path.
            return SamplerOutput(sampled_token_ids=logits.argmax(dim=-1))
        # .float() may alias the caller's tensor; every stage below is out-of-place.
        raw = logits.float()
        penalised = apply_penalties(raw, batch) if batch.any_penalties else raw
        greedy_ids = penalised.argmax(dim=-1) if batch.any_greedy else None
        if batch.all_greedy:
            assert greedy_ids is not None
            sampled = greedy_ids
        else:
            probs = shape_logits(penalised, batch).softmax(dim=-1)
            sampled = exponential_race(probs, batch.generators)
            if greedy_ids is not None:
                sampled = torch.where(batch.is_greedy, greedy_ids, sampled)
        if batch.max_num_logprobs is None:  # nobody asked: skip a pass over every row's logits
            return SamplerOutput(sampled_token_ids=sampled)
        token_logprob, top_values, top_ids = _logprobs(raw, sampled, batch.max_num_logprobs)
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs=token_logprob,
            top_logprobs=top_values,
            top_token_ids=top_ids,
        )
