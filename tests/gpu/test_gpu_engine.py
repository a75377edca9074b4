"""The engine on CUDA: SmolLM2 in bf16 and fp32, the Triton kernels inside the full model, the 1B shape."""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    print(f"skipping {__name__}: CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

from models.loader import load_model  # noqa: E402
from models.testing import build_random_model, llama_1b_config  # noqa: E402
from runtime.attention.op import BACKEND_ENV  # noqa: E402
from runtime import LLM  # noqa: E402
from runtime.contracts.sampling_params import SamplingParams  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,",
           "Once upon a time, in a land far away, there lived a", "The quick brown fox", "Water boils at",
           "import torch\n", "My favourite colour is"]


def test_smollm2_bf16_answers(smollm2_path):
    loaded = load_model(smollm2_path, dtype="bfloat16", device="cuda")
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    llm = LLM.from_loaded(loaded, max_num_seqs=8, max_model_len=512)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert llm.engine.kv_cache.num_used_blocks == 0


def _greedy(loaded, backend: str, monkeypatch) -> list[list[int]]:
    monkeypatch.setenv(BACKEND_ENV, backend)
    llm = LLM.from_loaded(loaded, max_num_seqs=8, max_model_len=512, num_kv_blocks=256)
    params = [SamplingParams(temperature=0.0, max_tokens=16 + 2 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    # A long shared prefix on half the prompts exercises the paged prefix path of the prefill kernel.
    prompts = [("Here is some context. " * 12 if i % 2 else "") + p for i, p in enumerate(PROMPTS)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_triton_attention_matches_torch_reference_in_the_model(smollm2_path, monkeypatch):
    loaded = load_model(smollm2_path, dtype="float32", device="cuda")
    assert _greedy(loaded, "triton", monkeypatch) == _greedy(loaded, "torch", monkeypatch)


def test_llama_1b_shape_runs_a_forward():
    config = llama_1b_config()
    model = build_random_model(config, torch.bfloat16, "cuda")
    from models.loader import LoadedModel

    llm = LLM.from_loaded(LoadedModel(model, config, None, torch.bfloat16, torch.device("cuda")),
                          max_num_seqs=4, max_model_len=256)
    outs = llm.generate([list(range(100, 228))] * 2, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert os.environ.get(BACKEND_ENV) is None
