"""Decorate your own PyTorch module with @support_torch_compile, run it, and inspect what the compiler did.

The decorator traces the module once (every batch size runs the same trace), runs our FX passes,
splits the graph at the splitting ops and compiles each piece; ``dump_dir`` writes it all down and
``python -m compiler.inspect DUMP_DIR`` reads it back.

    python examples/compile_your_model.py [DUMP_DIR]
"""
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from compiler import CompilationConfig, counters, support_torch_compile
from compiler.inspect import main as inspect


@support_torch_compile  # dim 0 of every tensor argument (the token count) is dynamic
class GatedMLP(nn.Module):
    """Plain PyTorch: RMSNorm, then SiLU(gate) * up. The default passes fuse both into custom ops."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + 1e-6)
        normed = self.norm_weight * normed.to(x.dtype)
        gate, up = self.gate_up(normed).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


dump_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="graphmode-dump-")
config = CompilationConfig(mode="compile", backend="eager", passes=["default"], dump_dir=dump_dir)
model = GatedMLP(64, 128, compilation_config=config).eval()

with torch.inference_mode():
    for tokens in (3, 17, 64):  # three batch sizes, one trace
        model(torch.randn(tokens, 64))
fused = {name: n for name, n in counters.pass_matches.items() if n}
print(f"Dynamo traces: {counters.dynamo_traces}; fused: {fused}")
print(f"dump written to {dump_dir}\n")
inspect([dump_dir, "summary"])
