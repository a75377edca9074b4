"""Random checkpoints for tests and benchmarks, made by transformers itself (no hub access)."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from models.loader import build_model

TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_config(architecture: str, **overrides: Any) -> Any:
    """A small HF config of ``architecture`` (Llama, Qwen2, Qwen3, Qwen3-MoE)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    kwargs = dict(TINY_COMMON)
    if architecture == "LlamaForCausalLM":
        cls = LlamaConfig
        kwargs.update(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif architecture == "Qwen2ForCausalLM":
        cls = Qwen2Config
    elif architecture == "Qwen3ForCausalLM":
        cls = Qwen3Config
        kwargs.update(head_dim=32)
    elif architecture == "Qwen3MoeForCausalLM":
        cls = Qwen3MoeConfig
        kwargs.update(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])
    else:
        raise ValueError(f"no tiny config for {architecture!r}")
    kwargs.update(overrides)
    config = cls(**kwargs)
    config.architectures = [architecture]
    return config


def save_random_checkpoint(config: Any, directory: str, max_shard_size: str | None = None, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> str:
    """Write a randomly initialised transformers model of ``config`` to ``directory``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def write_tiny_checkpoint(architecture: str, directory: str, max_shard_size: str | None = None,
                          **overrides: Any) -> str:
    os.makedirs(directory, exist_ok=True)
    return save_random_checkpoint(tiny_config(architecture, **overrides), directory, max_shard_size)


def llama_1b_config() -> Any:
    """The Llama-3.2-1B shape: 16 layers, hidden 2048, 32/8 heads, ffn 8192, vocab 128256."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         rope_theta=500000.0)
    config.architectures = ["LlamaForCausalLM"]
    return config


def smollm2_135m_config() -> Any:
    """The SmolLM2-135M shape (the default model's): 30 layers, hidden 576, 9/3 heads of 64, ffn 1536, vocab 49152."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)
    config.architectures = ["LlamaForCausalLM"]
    return config


def qwen3_0_6b_config() -> Any:
    """The Qwen3-0.6B shape (nano-vllm's benchmark model): 28 layers, hidden 1024, 16/8 heads of 128, ffn 3072."""
    from transformers import Qwen3Config

    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0)
    config.architectures = ["Qwen3ForCausalLM"]
    return config


def qwen3_30b_a3b_config(num_hidden_layers: int = 8) -> Any:
    """The Qwen3-30B-A3B shape cut to ``num_hidden_layers`` (48 in the model): hidden 2048, 32/4 heads of 128,
    128 experts of 768 with 8 per token, vocab 151936; 8 layers are ~5.5 B parameters (11 GiB in bf16)."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                            num_hidden_layers=num_hidden_layers, num_attention_heads=32, num_key_value_heads=4,
                            head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                            decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960,
                            rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1000000.0)
    config.architectures = ["Qwen3MoeForCausalLM"]
    return config


def build_random_model(config: Any, dtype: torch.dtype, device: str | torch.device, seed: int = 0,
                       compilation_config: Any = None) -> nn.Module:
    """Our model for ``config`` with small random weights (for benchmarks: no checkpoint needed)."""
    torch.manual_seed(seed)
    model = build_model(config, dtype, device, init=True, compilation_config=compilation_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return model
