"""Our models against transformers on the same weights: logits and greedy tokens."""
import os

import pytest
import torch

from models.loader import load_model
from models.testing import write_tiny_checkpoint
from tests.helpers.paged import PagedDriver

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
]


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _assert_close_logits(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err < tol, f"max abs logit error {err:.2e} relative to the logit scale exceeds {tol:.0e}"


def _check_against_hf(ours_model, hf, prompts_ids: list[list[int]], tol: float) -> torch.Tensor:
    driver = PagedDriver(ours_model, max_len=max(map(len, prompts_ids)) + 40, num_seqs=len(prompts_ids))
    _, logits = driver.generate_greedy(prompts_ids, max_new_tokens=1)
    start = 0
    for ids in prompts_ids:
        _assert_close_logits(logits[start:start + len(ids)], _hf_logits(hf, ids), tol)
        start += len(ids)
    return logits


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_path),
                                                gguf_file=os.path.basename(smollm2_path),
                                                dtype=torch.float32).eval()


def test_smollm2_logits_match_transformers(smollm2, smollm2_tokenizer, hf_smollm2):
    prompts = [smollm2_tokenizer.encode(p) for p in PROMPTS]
    _check_against_hf(smollm2.model, hf_smollm2, prompts, tol=1e-4)


def test_smollm2_greedy_decode_matches_transformers_generate(smollm2, smollm2_tokenizer, hf_smollm2):
    prompts = [smollm2_tokenizer.encode(p) for p in PROMPTS]
    eos = smollm2_tokenizer.eos_token_id
    driver = PagedDriver(smollm2.model, max_len=max(map(len, prompts)) + 40, num_seqs=len(prompts))
    ours, _ = driver.generate_greedy(prompts, max_new_tokens=32, eos_token_id=eos)
    for ids, our_tokens in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                      eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
        assert our_tokens == ref


@pytest.mark.parametrize("arch,shard", [
    ("LlamaForCausalLM", None),
    ("Qwen2ForCausalLM", None),
    ("Qwen3ForCausalLM", "60KB"),
    ("Qwen3MoeForCausalLM", "100KB"),
])
def test_tiny_checkpoints_match_transformers(tmp_path, arch, shard):
    from transformers import AutoModelForCausalLM

    path = write_tiny_checkpoint(arch, str(tmp_path / arch), max_shard_size=shard)
    if shard:
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ours = load_model(path, dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 33, 1)]
    _check_against_hf(ours.model, hf, prompts, tol=1e-4)


def test_untied_embeddings_and_sliding_window(tmp_path):
    """Untied lm_head and a Qwen2 sliding-window layer, prompts longer than the window."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_checkpoint("Qwen2ForCausalLM", str(tmp_path / "sw"), tie_word_embeddings=False,
                                 use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                 layer_types=["full_attention", "sliding_attention"])
    ours = load_model(path, dtype="float32", device="cpu")
    assert ours.model.lm_head.weight.data_ptr() != ours.model.model.embed_tokens.weight.data_ptr()
    assert ours.model.model.layers[1].self_attn.sliding_window == 8
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 12)]
    _check_against_hf(ours.model, hf, prompts, tol=1e-4)
