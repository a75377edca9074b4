"""The GGUF -> HF tensor name map built from a flat view of the model (one visit) equals transformers' own
(one visit per submodule, seconds on a real model) for every architecture the loader flattens."""
import pytest
import torch

from models.gguf_file import _FLAT_NAME_MAP, _FlatReference
from models.testing import tiny_config

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
PROCESSOR_NAMES = {"qwen3_moe": "qwen3moe"}  # transformers keys its tensor processors by gguf's spelling


def test_every_flattened_architecture_is_checked_here():
    assert set(ARCHITECTURES) == _FLAT_NAME_MAP


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_flat_name_map_equals_transformers_map(model_type):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = tiny_config(ARCHITECTURES[model_type])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(PROCESSOR_NAMES.get(model_type, model_type), TensorProcessor)(
        config=config.to_dict())
    full = get_gguf_hf_weights_map(model, processor)
    assert full and get_gguf_hf_weights_map(_FlatReference(model), processor) == full
