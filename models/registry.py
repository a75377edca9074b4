"""HF ``config.architectures[0]`` -> our model class."""
from __future__ import annotations

from typing import Any

from torch import nn

from models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from models.qwen2_vl import Qwen2VLForConditionalGeneration
from models.qwen3_moe import Qwen3MoeForCausalLM
from runtime.plugins import load_general_plugins

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
}

# GGUF configs carry a model_type but no architectures list.
_MODEL_TYPE_TO_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                       "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


class UnsupportedArchitectureError(ValueError):
    pass


def architecture_of(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(config, "model_type", None)
    if model_type in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[model_type]
    raise UnsupportedArchitectureError(f"config names no architecture (model_type={model_type!r})")


def register_model(architecture: str, model_class: type[nn.Module]) -> None:
    """Serve checkpoints whose config names ``architecture`` with ``model_class`` (an out-of-tree model, from
    a ``graphmode.general_plugins`` entry point: runtime/plugins.py). Replacing a built-in one is allowed."""
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise TypeError(f"register_model({architecture!r}, ...) needs an nn.Module subclass, got {model_class!r}")
    MODEL_REGISTRY[architecture] = model_class


def resolve_model_class(config: Any) -> type[nn.Module]:
    load_general_plugins()  # they may register architectures
    arch = architecture_of(config)
    try:
        return MODEL_REGISTRY[arch]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
