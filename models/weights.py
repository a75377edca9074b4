"""Mapping checkpoint tensor names onto our (partly fused) parameters.

Checkpoints store q/k/v and gate/up projections separately and MoE experts one by one; our
models fuse them (one GEMM instead of three) and stack experts. ``StackedWeights`` knows where
each checkpoint tensor lands: a parameter name plus an index into it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# checkpoint projection -> (our fused module, shard number)
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(.*\.mlp)\.experts\.(gate_up_proj|down_proj)$")
# Tensors some checkpoints carry that have no parameter here (recomputed buffers).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|position_ids)")


@dataclass(frozen=True)
class Target:
    param: str
    index: tuple  # applied to the parameter's data: data[index] receives the tensor


class StackedWeights:
    """Resolves checkpoint names for one model instance."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def _module(self, name: str) -> nn.Module:
        return self._model.get_submodule(name)

    def _shard_sizes(self, fused: str) -> list[int]:
        module = self._module(fused)
        parent = self._module(fused.rsplit(".", 1)[0])
        if fused.endswith("qkv_proj"):
            return [parent.q_size, parent.kv_size, parent.kv_size]
        half = module.out_features // 2
        return [half, half]

    def resolve(self, name: str) -> Target | None:
        """Where checkpoint tensor ``name`` goes; None when it is deliberately ignored."""
        if _IGNORED.search(name):
            return None
        if name == "lm_head.weight" and self._tied():
            return None
        match = _EXPERT.match(name)
        if match:
            mlp, expert, proj = match.group(1), int(match.group(2)), match.group(3)
            if proj == "down_proj":
                return Target(f"{mlp}.w2", (expert,))
            inter = self._module(mlp).w2.shape[-1]
            start = 0 if proj == "gate_proj" else inter
            return Target(f"{mlp}.w13", (expert, slice(start, start + inter)))
        match = _FUSED_EXPERTS.match(name)
        if match:
            return Target(f"{match.group(1)}.{'w13' if match.group(2) == 'gate_up_proj' else 'w2'}", ())
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _STACKED:
            fused, shard = _STACKED[parts[-2]]
            fused_name = ".".join(parts[:-2] + [fused])
            try:
                sizes = self._shard_sizes(fused_name)
            except AttributeError:
                return Target(name, ())  # not fused in this model: let the param lookup report it
            start = sum(sizes[:shard])
            return Target(f"{fused_name}.{parts[-1]}", (slice(start, start + sizes[shard]),))
        return Target(name, ())

    def _tied(self) -> bool:
        lm_head = getattr(self._model, "lm_head", None)
        embed = getattr(getattr(self._model, "model", None), "embed_tokens", None)
        return lm_head is not None and embed is not None and lm_head.weight is embed.weight
