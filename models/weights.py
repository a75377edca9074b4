"""Mapping checkpoint tensor names onto our (partly fused) parameters.

Checkpoints store q/k/v and gate/up projections separately and MoE experts one by one; our
models fuse them (one GEMM instead of three) and stack experts. ``StackedWeights`` knows where
each checkpoint tensor lands: a parameter name plus an index into it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

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
    # Under tensor/expert parallelism: the part of the checkpoint tensor this rank keeps.
    take: Callable[[torch.Tensor], torch.Tensor] | None = None


def _index(*index: object) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[index]


class StackedWeights:
    """Resolves checkpoint names for one model instance (and this rank's shard of each tensor)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def _module(self, name: str) -> nn.Module:
        return self._model.get_submodule(name)

    def resolve(self, name: str) -> Target | None:
        """Where checkpoint tensor ``name`` goes; None when it is deliberately ignored (or, under
        expert parallelism, belongs to an expert another rank holds)."""
        if _IGNORED.search(name):
            return None
        if name == "lm_head.weight" and self._tied():
            return None
        match = _EXPERT.match(name)
        if match:
            return self._expert(self._module(match.group(1)), match.group(1), int(match.group(2)), match.group(3))
        match = _FUSED_EXPERTS.match(name)
        if match:
            return self._fused_experts(self._module(match.group(1)), match.group(1), match.group(2))
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _STACKED:
            fused, shard = _STACKED[parts[-2]]
            fused_name = ".".join(parts[:-2] + [fused])
            try:
                module = self._module(fused_name)
            except AttributeError:
                return Target(name, ())  # not fused in this model: let the param lookup report it
            if hasattr(module, "part_slices"):
                ours, theirs = module.part_slices(shard)
                return Target(f"{fused_name}.{parts[-1]}", (ours,), _index(theirs))
        return self._plain(name)

    def _plain(self, name: str) -> Target:
        owner, _, leaf = name.rpartition(".")
        try:
            module = self._module(owner) if owner else self._model
        except AttributeError:
            return Target(name, ())
        cut = getattr(module, "checkpoint_slice", None)
        return Target(name, (), _index(*cut(leaf))) if cut is not None else Target(name, ())

    @staticmethod
    def _expert(mlp: nn.Module, mlp_name: str, expert: int, proj: str) -> Target | None:
        local = expert - mlp.expert_start
        if not 0 <= local < mlp.num_local_experts:
            return None
        inter = mlp.inter
        if proj == "down_proj":
            return Target(f"{mlp_name}.w2", (local,), _index(slice(None), inter.rows))
        start = 0 if proj == "gate_proj" else inter.count
        return Target(f"{mlp_name}.w13", (local, slice(start, start + inter.count)), _index(inter.rows))

    @staticmethod
    def _fused_experts(mlp: nn.Module, mlp_name: str, proj: str) -> Target:
        """Checkpoints that stack experts: gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I]."""
        experts, inter = slice(mlp.expert_start, mlp.expert_start + mlp.num_local_experts), mlp.inter
        if proj == "down_proj":
            return Target(f"{mlp_name}.w2", (), _index(experts, slice(None), inter.rows))

        def take(t: torch.Tensor) -> torch.Tensor:
            t = t[experts]
            up = slice(inter.full + inter.start, inter.full + inter.start + inter.count)
            return torch.cat([t[:, inter.rows], t[:, up]], dim=1)
        return Target(f"{mlp_name}.w13", (), take)

    def _tied(self) -> bool:
        lm_head = getattr(self._model, "lm_head", None)
        embed = getattr(getattr(self._model, "model", None), "embed_tokens", None)
        return lm_head is not None and embed is not None and lm_head.weight is embed.weight
