"""Dense decoder family: Llama, Qwen2 (QKV bias) and Qwen3 (q/k RMSNorm), in one readable file.

Tokens are flattened (no batch dimension, no padding mask): the attention op reads each
request's boundaries and KV cache from the forward context.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compiler import support_torch_compile
from models.config_utils import head_dim, layer_sliding_window, rope_settings
from models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding
from models.parallel_layers import ParallelLMHead, VocabParallelEmbedding
from models.weights import StackedWeights


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary: RotaryEmbedding, mlp: nn.Module, qkv_bias: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = Attention(
            layer_name=f"layers.{layer_idx}",
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim(config),
            rotary=rotary,
            qkv_bias=qkv_bias,
            qk_norm_eps=config.rms_norm_eps if qk_norm else None,
            sliding_window=layer_sliding_window(config, layer_idx),
        )
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(positions, self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class DecoderModel(nn.Module):
    def __init__(self, config: Any, make_mlp, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        theta, scaling = rope_settings(config)
        rotary = RotaryEmbedding(head_dim(config), config.max_position_embeddings, theta, scaling)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary, make_mlp(config, i), qkv_bias, qk_norm)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


def _dense_mlp(config: Any, layer_idx: int) -> nn.Module:
    return GatedMLP(config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False))


class LlamaForCausalLM(nn.Module):
    """Llama / Qwen2 / Qwen3 dense decoders; the flavour comes from the class attributes."""

    qkv_bias_default = False
    qk_norm = False
    supports_tensor_parallel = True  # every layer is built from models/parallel_layers

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        qkv_bias = getattr(config, "attention_bias", self.qkv_bias_default)
        self.model = DecoderModel(config, self.make_mlp, qkv_bias, self.qk_norm)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        self.tie_weights()
        self.weights = StackedWeights(self)

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (again after ``to_empty``)."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    make_mlp = staticmethod(_dense_mlp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True

    def __init__(self, config: Any) -> None:
        # Qwen2 configs carry no attention_bias field: the bias is part of the architecture.
        if not hasattr(config, "attention_bias"):
            config.attention_bias = True
        super().__init__(config)


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
