"""Sampler and SamplingParams tests (CPU)."""
from __future__ import annotations

import pytest
import torch

from runtime.worker.sampler import Sampler, SamplingBatch, make_generator
from runtime.contracts.sampling_params import SamplingParams

NEG_INF = float("-inf")


def make_batch(
    params: list[SamplingParams],
    vocab: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingBatch:
    num = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[] for _ in range(num)],
        outputs if outputs is not None else [[] for _ in range(num)],
        vocab,
        "cpu",
        generators,
    )


def sample(logits: torch.Tensor, params: list[SamplingParams], **kw) -> torch.Tensor:
    return Sampler()(logits, make_batch(params, logits.shape[1], **kw)).sampled_token_ids


# ---------------------------------------------------------------- greedy and truncation


def test_greedy_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 8)
    assert torch.equal(out, logits.argmax(dim=-1))


def test_greedy_rows_in_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5) for i in range(6)]
    batch = make_batch(params, 50)
    assert not batch.all_greedy and batch.any_greedy
    argmax = logits.argmax(dim=-1)
    random_differs = False
    for _ in range(20):
        out = Sampler()(logits, batch).sampled_token_ids
        assert torch.equal(out[0::2], argmax[0::2])
        random_differs |= not torch.equal(out[1::2], argmax[1::2])
    # Guards against the whole batch silently falling back to greedy.
    assert random_differs


def test_top_k_one_equals_greedy():
    torch.manual_seed(2)
    logits = torch.randn(16, 200)
    out = sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 16)
    assert torch.equal(out, logits.argmax(dim=-1))


def test_tiny_top_p_equals_greedy():
    torch.manual_seed(3)
    logits = torch.randn(16, 200)
    out = sample(logits, [SamplingParams(temperature=2.0, top_p=1e-6)] * 16)
    assert torch.equal(out, logits.argmax(dim=-1))


def test_top_k_keeps_exactly_k():
    torch.manual_seed(4)
    logits = torch.randn(3, 40)
    params = [SamplingParams(top_k=5), SamplingParams(top_k=-1), SamplingParams(top_k=17)]
    processed = Sampler().process_logits(logits, make_batch(params, 40))
    assert torch.isfinite(processed).sum(dim=-1).tolist() == [5, 40, 17]
    kept = torch.isfinite(processed[0]).nonzero().flatten().tolist()
    assert sorted(kept) == sorted(logits[0].topk(5).indices.tolist())


@pytest.mark.parametrize("top_p, kept", [(0.45, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p_nucleus(top_p, kept):
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    processed = Sampler().process_logits(logits, make_batch([SamplingParams(top_p=top_p)], 4))
    assert torch.isfinite(processed[0]).nonzero().flatten().tolist() == kept


def test_min_p_removes_low_tokens_in_processed_logits():
    logits = torch.tensor([[0.5, 0.3, 0.12, 0.08], [0.5, 0.3, 0.12, 0.08]]).log()
    params = [SamplingParams(min_p=0.2), SamplingParams(min_p=0.0)]
    processed = Sampler().process_logits(logits, make_batch(params, 4))
    # Threshold 0.2 * 0.5 = 0.1: token 3 (0.08) goes, token 2 (0.12) stays.
    assert torch.isfinite(processed).tolist() == [[True, True, True, False], [True] * 4]
    assert torch.allclose(processed[0, :3], logits[0, :3])


def test_min_p_never_samples_removed_tokens():
    torch.manual_seed(5)
    logits = torch.tensor([[0.5, 0.3, 0.12, 0.08]]).log().expand(4000, 4)
    out = sample(logits, [SamplingParams(min_p=0.2)] * 4000)
    counts = torch.bincount(out, minlength=4)
    assert counts[3] == 0 and counts[2] > 0


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_changes_argmax():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2)]
    assert sample(logits, [SamplingParams(temperature=0.0)]).tolist() == [0]
    # Token 0 in the prompt, token 2 in the output: both penalised HF style.
    batch = make_batch(params, 4, prompts=[[0]], outputs=[[2]])
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [1]
    processed = Sampler().process_logits(logits, batch)
    assert torch.allclose(processed, torch.tensor([[2.0 / 1.2, 1.9, -1.2, 0.5]]))


def test_presence_and_frequency_penalties_subtract():
    logits = torch.zeros(2, 6)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams()]
    # Prompt tokens must not count towards presence/frequency.
    batch = make_batch(params, 6, prompts=[[1, 1], [3]], outputs=[[3, 3, 5], [3, 3]])
    processed = Sampler().process_logits(logits, batch)
    expected = torch.zeros(2, 6)
    expected[0, 3] = -0.5 - 2 * 0.25
    expected[0, 5] = -0.5 - 1 * 0.25
    assert torch.allclose(processed, expected)


def test_penalties_apply_before_temperature():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    params = [SamplingParams(temperature=0.5, frequency_penalty=1.0)]
    processed = Sampler().process_logits(logits, make_batch(params, 3, outputs=[[2]]))
    assert torch.allclose(processed, torch.tensor([[2.0, 4.0, 4.0]]))


# ---------------------------------------------------------------- randomness


def test_distribution_matches_probabilities():
    torch.manual_seed(6)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    num = 20000
    logits = probs.log().expand(num, 4)
    out = sample(logits, [SamplingParams()] * num)
    freq = torch.bincount(out, minlength=4).float() / num
    assert torch.allclose(freq, probs, atol=0.02), freq


def test_temperature_sharpens_distribution():
    torch.manual_seed(7)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    num = 20000
    out = sample(probs.log().expand(num, 4), [SamplingParams(temperature=0.5)] * num)
    expected = probs**2 / (probs**2).sum()
    freq = torch.bincount(out, minlength=4).float() / num
    assert torch.allclose(freq, expected, atol=0.02), freq


def _run_steps(logits_rows, params, row, generators, steps=8) -> list[int]:
    """Sample `steps` times, returning the tokens of `row`; generators persist across steps."""
    tokens = []
    for step in range(steps):
        logits = torch.stack([lr[step] for lr in logits_rows])
        batch = make_batch(params, logits.shape[1], generators=generators)
        tokens.append(Sampler()(logits, batch).sampled_token_ids[row].item())
    return tokens


def test_seeded_sampling_reproducible_and_batch_independent():
    torch.manual_seed(8)
    vocab, steps = 500, 8
    target = torch.randn(steps, vocab) * 0.5
    others = [torch.randn(steps, vocab) for _ in range(3)]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    alone = _run_steps([target], [seeded], 0, [make_generator(1234, "cpu")])
    again = _run_steps([target], [seeded], 0, [make_generator(1234, "cpu")])
    assert alone == again
    assert len(set(alone)) > 1  # the stream advances between steps

    params = [SamplingParams(seed=99), SamplingParams(), seeded, SamplingParams(temperature=0.0, top_k=3)]
    gens = [make_generator(99, "cpu"), None, make_generator(1234, "cpu"), None]
    torch.manual_seed(123)  # different unseeded noise than the solo runs
    batched = _run_steps([others[0], others[1], target, others[2]], params, 2, gens)
    assert batched == alone

    other_seed = _run_steps([target], [SamplingParams(seed=4321)], 0, [make_generator(4321, "cpu")])
    assert other_seed != alone


def test_seed_without_generator_is_rejected():
    with pytest.raises(ValueError, match="seed"):
        make_batch([SamplingParams(seed=3)], 10)


# ---------------------------------------------------------------- logprobs


def test_logprobs_of_sampled_token_are_raw_log_softmax():
    torch.manual_seed(9)
    logits = torch.randn(5, 64)
    params = [SamplingParams(temperature=0.7, top_k=10, presence_penalty=1.0, logprobs=0)] * 5
    out = Sampler()(logits, make_batch(params, 64, outputs=[[1, 2]] * 5))
    expected = logits.log_softmax(dim=-1).gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1)
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, expected, atol=1e-5)
    assert out.top_logprobs is None and out.top_token_ids is None


def test_no_logprobs_are_computed_when_none_are_asked_for():
    out = Sampler()(torch.randn(2, 64), make_batch([SamplingParams(temperature=0.0)] * 2, 64))
    assert out.logprobs is None and out.top_logprobs is None


def test_top_logprobs():
    torch.manual_seed(10)
    logits = torch.randn(3, 64, dtype=torch.bfloat16)
    params = [SamplingParams(logprobs=2), SamplingParams(logprobs=4), SamplingParams(temperature=0.0)]
    out = Sampler()(logits, make_batch(params, 64))
    full = logits.float().log_softmax(dim=-1)
    ref_values, ref_ids = full.topk(4, dim=-1)
    assert out.top_logprobs.shape == (3, 4)
    assert torch.allclose(out.top_logprobs, ref_values)
    assert torch.equal(out.top_token_ids, ref_ids)
    expected = full.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1)
    assert torch.allclose(out.logprobs, expected, atol=1e-5)


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("min_tokens", 17),  # > default max_tokens of 16
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop_token_ids", [1, "2"]),
        ("seed", "7"),
        ("seed", 1.5),
    ],
)
def test_invalid_params_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_error_message_names_value():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1.0"):
        SamplingParams(temperature=-1.0)


def test_valid_params_and_normalisation():
    p = SamplingParams(temperature=0, stop="###", top_k=-1, logprobs=0, seed=0)
    assert p.greedy and p.stop == ["###"] and p.stop_token_ids == []
    assert SamplingParams().stop == [] and not SamplingParams().greedy
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(min_tokens=16, max_tokens=16).min_tokens == 16
