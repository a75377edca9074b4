"""Build one of our models from a checkpoint: config -> class -> weights -> device and dtype."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from compiler import CompilationConfig, use_config
from models.checkpoint import (Checkpoint, CheckpointError, iter_safetensors, load_config, load_tokenizer,
                               resolve_checkpoint)
from models.gguf_file import gguf_parsed_once, iter_gguf
from models.registry import resolve_model_class
from models.weights import StackedWeights
from runtime.distributed.parallel_state import ParallelContext, current_parallel, use_parallel
from runtime.platforms import current_platform

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    config: Any
    checkpoint: Checkpoint | None  # None for a model built in memory (random weights)
    dtype: torch.dtype
    device: torch.device
    compilation_config: CompilationConfig | None = None  # what the model was built with

    @property
    def name(self) -> str:
        return self.checkpoint.display if self.checkpoint else type(self.model).__name__

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer; None for in-memory models (prompts must then be token ids)."""
        return load_tokenizer(self.checkpoint) if self.checkpoint else None


def resolve_dtype(dtype: str | torch.dtype, config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        declared = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
        if isinstance(declared, str):
            declared = _DTYPES.get(declared)
        return current_platform.auto_dtype(declared)
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; choose auto, {', '.join(sorted(_DTYPES))}") from None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: Any, dtype: torch.dtype, device: torch.device | str, init: bool = True,
                compilation_config: CompilationConfig | None = None,
                parallel: ParallelContext | None = None, model_options: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate our class for ``config``; ``init=False`` leaves weights uninitialised (to be loaded).

    ``compilation_config`` reaches every ``@support_torch_compile`` module built inside;
    ``parallel`` (this rank under tensor parallelism) makes the layers hold only their shard;
    ``model_options`` go to the class's constructor (a vision model's ``encoder_attention``).
    """
    cls = resolve_model_class(config)
    with default_dtype(dtype), torch.device("meta" if not init else device), \
            use_config(compilation_config or CompilationConfig()), use_parallel(parallel or current_parallel()):
        model = cls(config, **(model_options or {}))
    if not init:
        model = model.to_empty(device=device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        for module in model.modules():
            if hasattr(module, "rebuild_buffers"):
                module.rebuild_buffers()
    return model.eval()


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor, str]]) -> None:
    """Copy checkpoint tensors into ``model``; any unexpected, mis-shaped or missing tensor is an error."""
    params = dict(model.named_parameters())
    mapper = getattr(model, "weights", None) or StackedWeights(model)
    filled = {name: 0 for name in params}
    loaded_from: dict[str, list[str]] = {name: [] for name in params}  # our parameter -> checkpoint tensors
    sources: set[str] = set()
    for name, tensor, source in weights:
        sources.add(source)
        target = mapper.resolve(name)
        if target is None:
            continue
        param = params.get(target.param)
        if param is None:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (the model has no parameter {target.param!r})")
        if target.take is not None:
            tensor = target.take(tensor)
        dest = param.data[target.index] if target.index else param.data
        if tuple(dest.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        filled[target.param] += tensor.numel()
        loaded_from[target.param].append(name)
    missing = [name for name, count in filled.items() if count < params[name].numel()]
    if missing:
        where = ", ".join(sorted(sources)) or "the checkpoint"
        details = [f"{name} ({_found(loaded_from[name])})" for name in missing[:5]]
        raise CheckpointError(f"{where} is missing tensor(s) for {'; '.join(details)}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def _found(names: list[str]) -> str:
    """What a partly filled parameter did get: a fused q/k/v or gate/up projection names the parts it has."""
    if not names:
        return "no checkpoint tensor maps to it"
    return "has only " + ", ".join(sorted(names))


def load_model(path: str, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
               compilation_config: CompilationConfig | None = None,
               parallel: ParallelContext | None = None, model_config: Any | None = None,
               model_options: dict[str, Any] | None = None) -> LoadedModel:
    """Load a checkpoint directory or GGUF file into our implementation of its architecture
    (this rank's shard of it when ``parallel`` spans several ranks). ``model_config``: the
    checkpoint's config when the caller already read it (reading a GGUF's config parses the file)."""
    ckpt = resolve_checkpoint(path)
    with gguf_parsed_once():
        config = model_config if model_config is not None else load_config(ckpt)
        torch_dtype = resolve_dtype(dtype, config)
        device = torch.device(device) if device is not None else current_platform.device()
        start = time.perf_counter()
        model = build_model(config, torch_dtype, device, init=False, compilation_config=compilation_config,
                            parallel=parallel, model_options=model_options)
        # disable=None: a bar on a terminal only (a log gets the line below, not \r codes).
        weights = iter_gguf(ckpt, config) if ckpt.gguf_file else iter_safetensors(ckpt.directory)
        weights = tqdm(weights, desc="Loading weights", unit="tensor", leave=False, disable=None)
        load_weights(model, weights)
    logger.info("loaded %s (%s) as %s on %s in %.1f s", ckpt.display, type(model).__name__,
                str(torch_dtype).removeprefix("torch."), device, time.perf_counter() - start)
    return LoadedModel(model, config, ckpt, torch_dtype, device, compilation_config)
