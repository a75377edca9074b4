"""Qwen2-VL: the vision encoder (compiled on its own, tag ``encoder``) plus a Qwen2 decoder with M-RoPE.

A step's tokens reach ``forward`` flattened, like every decoder here. Under the engine, the
runner fills persistent ``StepBuffers`` every step (runtime/worker/multimodal.py): the three-stream M-RoPE
positions of every token and which rows take encoder output. Used directly, ``forward`` takes
[3, T] M-RoPE positions (1-D positions serve all three streams, which is what M-RoPE does for
text) and the step's image rows as a ``MultimodalStep`` argument. Either way the
image rows are merged by the named ``graphmode::merge_image_embeddings`` op, which under the
engine runs in every step (decode too), so it is inside every captured graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compiler import support_torch_compile
from compiler.config import current_config
from models.config_utils import head_dim, rope_settings
from models.layers import GatedMLP, RMSNorm
from models.llama import DecoderLayer
from models.mrope import MRotaryEmbedding
from models.qwen2_vl_vision import DEFAULT_ENCODER_ATTENTION, VisionTransformer, encoder_inputs
from models.vision_merge import merge_image_embeddings
from models.weights import StackedWeights, Target

@dataclass
class MultimodalStep:
    """Which of a step's T token rows take image embeddings, and those embeddings (dense, [T, hidden])."""
    is_image: torch.Tensor  # [T] bool
    image_embeds: torch.Tensor  # [T, hidden]; rows where is_image is False are ignored

    @classmethod
    def from_rows(cls, rows: torch.Tensor, embeds: torch.Tensor, num_tokens: int) -> "MultimodalStep":
        is_image = torch.zeros(num_tokens, dtype=torch.bool, device=embeds.device)
        dense = embeds.new_zeros(num_tokens, embeds.shape[-1])
        is_image[rows], dense[rows] = True, embeds
        return cls(is_image, dense)


@dataclass
class StepBuffers:
    """Persistent per-step inputs the runner fills in place (runtime/worker/multimodal.py): static graphs
    read them at fixed addresses, and every step, decode included, runs the same merge."""
    mrope_by_token: torch.Tensor  # [max_tokens, 3] int64, read through mrope_positions(n)
    is_image: torch.Tensor  # [max_tokens] bool
    image_embeds: torch.Tensor  # [max_tokens, hidden]
    inputs_embeds: torch.Tensor  # [max_tokens, hidden]: the decoder's input

    def mrope_positions(self, num_tokens: int) -> torch.Tensor:
        """[3, num_tokens] positions with strides (1, 3) whatever ``num_tokens`` is: token t's three
        positions sit at the same address for every step size, so a graph captured at a padded size
        reads what a step with fewer tokens wrote. (A column slice of a [3, max_tokens] buffer would
        have max_tokens as row stride only when not sliced; Inductor asserts the strides it traced.)"""
        return self.mrope_by_token[:num_tokens].t()


def mrope_section(text_config: Any) -> list[int]:
    params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    section = params.get("mrope_section")
    if not section:
        raise ValueError("Qwen2-VL config has no rope mrope_section")
    return list(section)


@support_torch_compile(dynamic_arg_dims={"positions": 1, "inputs_embeds": 0})
class Qwen2VLTextModel(nn.Module):
    """The Qwen2 decoder stack over embeddings (the merge happens before it), M-RoPE positions [3, T]."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        theta, _ = rope_settings(config)
        rotary = MRotaryEmbedding(head_dim(config), config.max_position_embeddings, theta, mrope_section(config))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary, GatedMLP(config.hidden_size, config.intermediate_size), qkv_bias=True,
                         qk_norm=False)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        x = inputs_embeds
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class _Parts(nn.Module):
    """Holds ``visual`` and ``language_model`` so parameter names match transformers v5 checkpoints."""

    def __init__(self, config: Any, encoder_attention: str) -> None:
        super().__init__()
        decoder_cfg = current_config()
        encoder_cfg = decoder_cfg.for_encoder() if decoder_cfg is not None else None
        self.visual = VisionTransformer(config.vision_config, encoder_attention, compilation_config=encoder_cfg)
        self.language_model = Qwen2VLTextModel(config.get_text_config())


class Qwen2VLWeights(StackedWeights):
    """transformers v4 names (``visual.*``, ``model.layers.*``) -> v5 layout, then q/k/v stacking."""

    def resolve(self, name: str) -> Target | None:
        if name.startswith("visual."):
            name = "model." + name
        elif name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
            name = "model.language_model." + name[len("model."):]
        model = self._model
        if name == "lm_head.weight" and model.lm_head.weight is model.model.language_model.embed_tokens.weight:
            return None
        return super().resolve(name)


class Qwen2VLForConditionalGeneration(nn.Module):
    supports_images = True

    def __init__(self, config: Any, encoder_attention: str = DEFAULT_ENCODER_ATTENTION) -> None:
        super().__init__()
        self.config = config
        text = config.get_text_config()
        # The engine reads these off the top-level config; v5 keeps them in text_config only.
        for name in ("vocab_size", "max_position_embeddings"):
            if getattr(config, name, None) is None:
                setattr(config, name, getattr(text, name))
        self.image_token_id = config.image_token_id
        self.merge_size = config.vision_config.spatial_merge_size
        self.model = _Parts(config, encoder_attention)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.tie_weights()
        self.weights = Qwen2VLWeights(self)
        self.step_buffers: StepBuffers | None = None

    def allocate_step_buffers(self, max_tokens: int) -> StepBuffers:
        """From now on 1-D-position forwards read M-RoPE positions and image rows from these buffers."""
        device, hidden = self.lm_head.weight.device, self.lm_head.in_features
        dtype = self.model.language_model.embed_tokens.weight.dtype
        self.step_buffers = StepBuffers(
            torch.zeros(max_tokens, 3, dtype=torch.int64, device=device),
            torch.zeros(max_tokens, dtype=torch.bool, device=device),
            torch.zeros(max_tokens, hidden, dtype=dtype, device=device),
            torch.zeros(max_tokens, hidden, dtype=dtype, device=device))
        return self.step_buffers

    def tie_weights(self) -> None:
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def encoder_attention(self) -> str:
        """The vision encoder's attention backend (``mm_encoder_attn_backend``)."""
        return self.model.visual.attention_backend

    @property
    def visual(self) -> VisionTransformer:
        return self.model.visual

    def encode_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Encoder output per image (eager entry point; the engine batches through runtime.worker.encoder_runner)."""
        inputs = encoder_inputs(pixel_values, grids, self.merge_size)
        embeds = self.visual(inputs.pixel_values, inputs.position_ids, inputs.cu_seqlens)
        return list(embeds.split([t * h * w // self.merge_size ** 2 for t, h, w in grids]))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                images: MultimodalStep | None = None) -> torch.Tensor:
        """``images``: the step's image rows when used directly (the engine fills ``step_buffers``)."""
        n = input_ids.shape[0]
        embeds = self.model.language_model.embed_tokens(input_ids)
        buffers = self.step_buffers
        if buffers is not None and positions.dim() == 1:  # under the engine
            embeds = merge_image_embeddings(embeds, buffers.is_image[:n], buffers.image_embeds[:n])
            return self.model.language_model(buffers.mrope_positions(n), buffers.inputs_embeds[:n].copy_(embeds))
        if images is not None:
            embeds = merge_image_embeddings(embeds, images.is_image, images.image_embeds)
        # [3, T] positions are M-RoPE's; 1-D ones (text only) serve all three streams.
        mrope = positions if positions.dim() == 2 else positions.expand(3, -1).contiguous()
        return self.model.language_model(mrope, embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.language_model.layers]
