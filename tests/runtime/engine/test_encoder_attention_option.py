"""``mm_encoder_attn_backend`` (``--mm-encoder-attn-backend``) picks the vision encoder's attention kernel; it
is refused for a model without an encoder, for an unknown kernel, and against a model built otherwise."""
import pytest

from models.loader import load_model
from models.testing import write_tiny_checkpoint
from models.vision_testing import write_tiny_qwen2_vl_checkpoint
from runtime import LLM

ENGINE = dict(max_num_seqs=2, max_model_len=128, num_kv_blocks=32, max_num_batched_tokens=64, dtype="float32")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return write_tiny_qwen2_vl_checkpoint(str(tmp_path_factory.mktemp("vlm")))


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_the_chosen_backend_reaches_the_encoder(vlm, backend):
    llm = LLM(vlm, mm_encoder_attn_backend=backend, **ENGINE)
    model = llm.engine.executor.worker.runner.model
    assert model.encoder_attention == backend
    assert {block.attn.backend for block in model.visual.blocks} == {backend}


def test_refused_where_it_cannot_apply(vlm, tmp_path):
    with pytest.raises(ValueError, match="unknown encoder attention backend 'flash'"):
        LLM(vlm, mm_encoder_attn_backend="flash", **ENGINE)
    llama = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="LlamaForCausalLM has no vision encoder"):
        LLM(llama, mm_encoder_attn_backend="naive", **ENGINE)
    built_with_sdpa = load_model(vlm, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="built with 'sdpa'"):
        LLM.from_loaded(built_with_sdpa, mm_encoder_attn_backend="naive", **{k: v for k, v in ENGINE.items()
                                                                               if k != "dtype"})
