"""The compile cache: Inductor artefacts saved per piece, keyed by everything that changes the code.

Key = config hash + pass uuids + model source hash + torch version + platform, then per piece the
piece's graph (nodes by position, not by name) and its input shapes/dtypes. Artefacts are torch's own (``CompiledArtifact.save/load``);
a file that does not load (truncated, foreign, other torch) is logged, recompiled and overwritten.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T({tuple(str(d) for d in value.shape)},{tuple(str(s) for s in value.stride())},{value.dtype},{value.device.type})"
    if isinstance(value, torch.SymInt):
        return "SymInt"
    return repr(value)


_SYMBOL = re.compile(r"\bs\d+\b")


def _canonical_symbols(text: str) -> str:
    """Replace shape symbols (s72, s11, ...) by one name. Their numbers, and which of two equal
    symbols Dynamo keeps, differ between processes; every symbol here is the token count anyway."""
    return _SYMBOL.sub("S", text)


def _structure(gm: torch.fx.GraphModule) -> str:
    """The piece's graph with nodes named by position: the code without the names Dynamo gives inputs
    after the module path they came from (``l_self_modules_layers_modules_3_...``), so the middle layers
    of a model, whose pieces differ only by those names, share a key and one compiled artefact."""
    index: dict[torch.fx.Node, str] = {}
    lines = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = f"%{i}"
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: index[n])
        target = "" if node.op == "placeholder" else (
            torch.fx.node._get_qualified_name(node.target) if callable(node.target) else node.target)
        lines.append(f"{node.op} {target} {args}")
    return "\n".join(lines)


class CompileCache:
    def __init__(self, root: str, global_key: str) -> None:
        self.global_key = global_key
        self.directory = os.path.join(root, global_key)
        os.makedirs(self.directory, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.in_memory: dict[str, Any] = {}  # key -> artefact compiled or loaded in this process

    @staticmethod
    def make_global_key(config_hash: str, pass_uuid: str, model_source_hash: str, platform: str) -> str:
        parts = [config_hash, pass_uuid, model_source_hash, torch.__version__, platform]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    def key_for(self, gm: torch.fx.GraphModule, example_inputs: list[Any], size: int | None) -> str:
        text = _structure(gm) + "|" + ";".join(_describe(x) for x in example_inputs) + f"|size={size}"
        return hashlib.sha256(_canonical_symbols(text).encode()).hexdigest()[:24]

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.bin")

    def load(self, key: str) -> Any | None:
        path = self._path(key)
        if not os.path.exists(path):
            self.misses += 1
            return None
        try:
            artifact = torch._inductor.CompiledArtifact.load(path=path, format="binary")
        except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt, never fatal
            logger.warning("compile cache entry %s is unreadable (%s: %s); recompiling", path, type(e).__name__,
                           str(e).splitlines()[0] if str(e) else "")
            self.misses += 1
            return None
        self.hits += 1
        return artifact

    def save(self, key: str, artifact: Any) -> None:
        path = self._path(key)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            artifact.save(path=tmp, format="binary")
            os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half file under the real name
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written only costs the next start
            logger.warning("could not write compile cache entry %s: %s", path, e)
