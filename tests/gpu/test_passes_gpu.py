"""The fusion passes on CUDA in bf16: Qwen3 (q/k norm + rotary) and Qwen3-MoE, passes on vs off.

The fused kernels round where torch rounds and sum RMSNorm's squares in torch's order
(runtime/ops/reduction_order.py covers every shape these models produce), so the fused model's
logits are the unfused model's bit for bit, and greedy decoding takes the same path. The tiny test
models (hidden 64, heads of 32 or 16: rows read element by element) and small ones of LLM-like widths
(hidden 256, heads of 128: rows read as vectors) cover both of torch's row layouts. SmolLM2 with
natural prompts: tests/gpu/test_graphs.py.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    print(f"skipping {__name__}: CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

from compiler import CompilationConfig, counters  # noqa: E402
from models.loader import load_model  # noqa: E402
from models.testing import write_tiny_checkpoint  # noqa: E402
from tests.helpers.paged import PagedDriver  # noqa: E402


def _generate(path: str, passes: list[str], prompts: list[list[int]],
              dtype: torch.dtype = torch.bfloat16) -> tuple[list[list[int]], torch.Tensor, int]:
    counters.reset()
    loaded = load_model(path, dtype=str(dtype).removeprefix("torch."), device="cuda",
                        compilation_config=CompilationConfig(mode="compile", backend="eager", passes=passes))
    driver = PagedDriver(loaded.model, max_len=128, num_seqs=len(prompts), device="cuda", dtype=dtype)
    tokens, prefill_logits = driver.generate_greedy(prompts, max_new_tokens=16)
    return tokens, prefill_logits, sum(counters.pass_matches.values())


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 200, (n,), generator=g).tolist() for n in (3, 11, 40, 90, 1, 7)]


LLM_LIKE_WIDTHS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=128)


@pytest.mark.parametrize("widths", ["tiny", "llm_like"])
@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_passes_keep_bf16_bits_and_greedy_tokens(arch, widths, tmp_path):
    overrides = {}
    if widths == "llm_like":
        overrides = dict(LLM_LIKE_WIDTHS, **({"moe_intermediate_size": 128} if "Moe" in arch else {}))
    path = write_tiny_checkpoint(arch, str(tmp_path / arch), **overrides)
    unfused_tokens, unfused_logits, none_matched = _generate(path, [], _prompts())
    fused_tokens, fused_logits, matched = _generate(path, ["default"], _prompts())
    assert none_matched == 0 and matched > 0
    torch.testing.assert_close(fused_logits, unfused_logits, atol=0, rtol=0)
    assert fused_tokens == unfused_tokens


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_norm_linear_logits_as_close_to_fp32_as_the_unfused_model(arch, tmp_path):
    # fuse_norm_linear's kernel sums in its own order (not bit-identical to cuBLAS): its model must be no
    # further from the fp32 model than the unfused one. Short prompts (42 tokens) so that the prefill,
    # too, runs through the kernel (<= 64 tokens), and every decode step does.
    path = write_tiny_checkpoint(arch, str(tmp_path / arch), **LLM_LIKE_WIDTHS)
    prompts = [p[:20] for p in _prompts()[:5]]
    _, exact, _ = _generate(path, [], prompts, dtype=torch.float32)
    unfused_tokens, unfused, _ = _generate(path, ["default"], prompts)
    fused_tokens, fused, _ = _generate(path, ["default", "fuse_norm_linear"], prompts)
    assert counters.pass_matches["fuse_norm_linear"] == 2 * 2  # q/k/v and gate/up of both layers
    unfused_error = (unfused.float() - exact).abs().mean().item()
    fused_error = (fused.float() - exact).abs().mean().item()
    agree = sum(a == b for x, y in zip(unfused_tokens, fused_tokens) for a, b in zip(x, y))
    print(f"{arch}: mean |logit error| vs fp32 unfused {unfused_error:.3e} fused {fused_error:.3e}; "
          f"greedy tokens equal {agree}/{sum(map(len, unfused_tokens))}")
    assert fused_error <= 1.1 * unfused_error
