"""The fusion passes on CUDA in bf16: Qwen3 (q/k norm + rotary) and Qwen3-MoE, passes on vs off.

The fused kernels round where torch rounds and, where runtime/ops/reduction_order.py models it, sum
RMSNorm's squares in torch's order: then the fused model's logits are the unfused model's, bit for bit.
The tiny test models are too narrow for that model (hidden 64 with many rows, heads of 16 or 32): there
the logits must agree within bf16 tolerance. Small models of modelled widths (hidden 256, heads of 128)
must agree to the bit. SmolLM2 with natural prompts: tests/gpu/test_graphs.py.
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
from tests.paged import PagedDriver  # noqa: E402


def _logits(path: str, passes: list[str], prompts: list[list[int]]) -> tuple[torch.Tensor, int]:
    counters.reset()
    loaded = load_model(path, dtype="bfloat16", device="cuda", compilation_config=CompilationConfig(
        mode="compile", backend="eager", passes=passes))
    driver = PagedDriver(loaded.model, max_len=128, num_seqs=len(prompts), device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = driver.step(prompts, [0] * len(prompts), list(range(len(prompts))))
    return logits.float(), sum(counters.pass_matches.values())


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 200, (n,), generator=g).tolist() for n in (3, 11, 40, 90)]


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_passes_keep_bf16_bits_at_modelled_widths(arch, tmp_path):
    path = write_tiny_checkpoint(arch, str(tmp_path / arch), hidden_size=256, intermediate_size=512,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                 **({"moe_intermediate_size": 128} if "Moe" in arch else {}))
    unfused, none_matched = _logits(path, [], _prompts())
    fused, matched = _logits(path, ["default"], _prompts())
    assert none_matched == 0 and matched > 0
    torch.testing.assert_close(fused, unfused, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_passes_keep_bf16_logits(arch, tmp_path):
    path = write_tiny_checkpoint(arch, str(tmp_path / arch))
    unfused, none_matched = _logits(path, [], _prompts())
    fused, matched = _logits(path, ["default"], _prompts())
    assert none_matched == 0 and matched > 0
    # bf16 keeps 8 mantissa bits (0.4% per rounding); over the layers and the MoE's weighted sum a
    # few logits move by a few percent of the logit scale (H100: 8 of 36864 beyond 2%, none beyond 4%).
    scale = unfused.abs().max().item()
    torch.testing.assert_close(fused, unfused, atol=0.05 * scale, rtol=0.02)
