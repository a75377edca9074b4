"""The fusion passes on CUDA in bf16: tiny Qwen3 (q/k norm + rotary) and Qwen3-MoE, passes on vs off."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    print(f"skipping {__name__}: CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

from compiler import CompilationConfig, counters  # noqa: E402
from models.loader import load_model  # noqa: E402
from models.testing import write_tiny_checkpoint  # noqa: E402
from runtime.engine import LLM  # noqa: E402
from runtime.sampling_params import SamplingParams  # noqa: E402


def _greedy(path: str, passes: list[str]) -> tuple[list[list[int]], int]:
    counters.reset()
    loaded = load_model(path, dtype="bfloat16", device="cuda", compilation_config=CompilationConfig(
        mode="compile", backend="eager", passes=passes))
    llm = LLM.from_loaded(loaded, max_num_seqs=8, max_model_len=256, num_kv_blocks=128, max_num_batched_tokens=64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, loaded.config.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 40, 90)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], sum(counters.pass_matches.values())


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_passes_keep_bf16_greedy_tokens(arch, tmp_path):
    path = write_tiny_checkpoint(arch, str(tmp_path / arch))
    unfused, none_matched = _greedy(path, [])
    fused, matched = _greedy(path, ["default"])
    assert none_matched == 0 and matched > 0
    assert fused == unfused
