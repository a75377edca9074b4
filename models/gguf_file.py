"""GGUF files through transformers' reader: tensors under their HF names, and the file parsed once per load."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

import torch

from models.checkpoint import Checkpoint, CheckpointError


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Inside this block, a GGUF file is parsed once however often transformers opens it.

    AutoConfig, AutoTokenizer and the weight loader each open the file with a new ``gguf.GGUFReader``, and each
    open parses every metadata field: SmolLM2's 49k-token vocabulary and merges take ~4 s per parse on the
    2-core CI machine, 12 s of a 17 s start-up. transformers takes the reader class from the ``gguf`` module
    at every call, so the block hands it a factory that returns the reader already parsed (readers are
    read-only memory maps, safe to share). Nested blocks share the outer block's readers.
    Also: transformers' bar over the GGUF tensors shows on a terminal only (``disable=None``), as ours does: in a
    log its ``\r`` codes are noise.
    """
    try:
        import gguf
        import transformers.modeling_gguf_pytorch_utils as hf_gguf
    except ImportError:  # no GGUF reader installed: nothing reads a GGUF file in this block
        yield
        return
    if getattr(gguf.GGUFReader, "_parsed_once", False):
        yield
        return
    parse = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def open_parsed(path: str | os.PathLike, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    open_parsed._parsed_once = True
    bar = hf_gguf.tqdm
    gguf.GGUFReader, hf_gguf.tqdm = open_parsed, functools.partial(bar, disable=None)
    try:
        yield
    finally:
        gguf.GGUFReader, hf_gguf.tqdm = parse, bar


class _FlatReference:
    """What transformers' GGUF name mapping reads of a model (config, parameter names, submodules), with no
    submodules: it builds gguf's name table once per module it visits and rescans every parameter name each
    time (~400 modules: 4 s for SmolLM2 on the CI machine). For architectures whose HF names gguf's table
    knows from the top (the standard decoders), one visit maps every tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = model.config
        self._names = dict.fromkeys(model.state_dict())

    def state_dict(self) -> dict[str, None]:
        return self._names

    def named_children(self) -> list:
        return []


# model_type of architectures whose every GGUF tensor maps from the top-level parameter names.
_FLAT_NAME_MAP = {"llama", "qwen2", "qwen3", "qwen3_moe"}


def iter_gguf(ckpt: Checkpoint, config: Any) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Dequantized GGUF tensors under their HF names, through transformers' GGUF reader."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = os.path.join(ckpt.directory, ckpt.gguf_file)
    # transformers maps GGUF names to HF names through a model instance; a meta one costs nothing.
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    if getattr(config, "model_type", None) in _FLAT_NAME_MAP:
        reference = _FlatReference(reference)
    try:
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=reference)["tensors"]
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read GGUF ({str(e).splitlines()[0]})") from e
    for name, tensor in tensors.items():
        yield name, tensor, path
