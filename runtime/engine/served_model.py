"""What an engine front reads of the checkpoint before any worker starts, and the prompt checks it runs.

``EngineCore`` reads it in its own process; the data-parallel client (runtime/engine/dp_client.py) reads
it too, so a bad prompt is refused at once, before it travels to an engine core.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compiler.config import CompilationConfig
from models.checkpoint import Checkpoint, load_config, load_tokenizer, resolve_checkpoint
from models.default import default_model_path, is_embedded_default
from models.generation_defaults import read_generation_defaults
from models.loader import LoadedModel
from models.parallel_layers import check_shardable
from models.qwen2_vl_processing import Qwen2VLInputProcessor
from models.registry import resolve_model_class
from runtime.contracts.config import EngineConfig
from runtime.contracts.sampling_params import SamplingParams
from runtime.distributed.parallel_state import ParallelContext


@dataclass
class ServedModel:
    checkpoint: Checkpoint | None
    model_config: Any
    tokenizer: Any
    model_class: type
    vocab_size: int
    sampling_defaults: dict[str, Any]  # the generation config's, for fields a request leaves out
    max_model_len: int  # before the KV cache is sized (EngineCore lowers a default one to what fits)
    input_processor: Qwen2VLInputProcessor | None  # vision models: images -> patches and placeholder tokens

    @classmethod
    def read(cls, config: EngineConfig, loaded: LoadedModel | None = None) -> "ServedModel":
        """The checkpoint behind ``config`` (or the model already in memory), checked against the config."""
        if loaded is not None:
            if config.tensor_parallel_size > 1 or config.data_parallel_size > 1:
                raise ValueError("tensor_parallel_size or data_parallel_size > 1 loads the model in other processes: "
                                 "pass a checkpoint path, not a model already in memory")
            _check_simulated_collectives(config, loaded.model)
            if loaded.compilation_config is not None:
                _check_enforce_eager(config, loaded.compilation_config)
                config.compilation_config = loaded.compilation_config  # graphs must match how it was compiled
            checkpoint, model_config, tokenizer = loaded.checkpoint, loaded.config, loaded.tokenizer()
        else:
            checkpoint = resolve_checkpoint(config.model or default_model_path())
            config.model = checkpoint.display
            model_config, tokenizer = load_config(checkpoint), load_tokenizer(checkpoint)
        model_class = resolve_model_class(model_config)
        _check_encoder_attention(config, model_class, loaded)
        if config.tensor_parallel_size > 1 or config.experts_over_data_parallel:
            _check_shardable(model_class, model_config, config)  # a clear error before any process starts
        return cls(checkpoint, model_config, tokenizer, model_class, model_config.get_text_config().vocab_size,
                   _sampling_defaults(config, checkpoint), engine_max_model_len(config, model_config),
                   _input_processor(model_class, model_config, checkpoint, config))

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams with the checkpoint's recommended defaults (``generation_config``) under ``overrides``."""
        return SamplingParams(**{**self.sampling_defaults, **overrides})

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids (text is tokenized), refused when empty or outside the vocabulary."""
        if isinstance(prompt, str) and self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as token ids")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if max(ids) >= self.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        return ids

    def check_prompt_length(self, ids: list[int], max_model_len: int) -> None:
        if len(ids) >= max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; this model allows at most {max_model_len - 1} "
                             f"(max_model_len={max_model_len})")

    def check_takes_images(self) -> None:
        if self.input_processor is None:
            raise ValueError(f"this model ({self.model_class.__name__}) does not take images")


def engine_max_model_len(config: EngineConfig, model_config: Any) -> int:
    """The context length the engine serves: the config's, else the model's capped at 4096 (and later at
    what the KV cache holds: ``EngineCore._fit_max_model_len``)."""
    model_max = model_config.get_text_config().max_position_embeddings  # a VLM keeps it with its decoder
    if config.max_model_len is not None and config.max_model_len > model_max:
        raise ValueError(f"max_model_len={config.max_model_len} is beyond this model's maximum context "
                         f"({model_max} positions)")
    max_model_len = config.max_model_len or min(model_max, 4096)
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
        raise ValueError(f"max_num_batched_tokens={config.max_num_batched_tokens} must be >= max_model_len="
                         f"{max_model_len} when chunked prefill is off")
    return max_model_len


def _check_shardable(model_class: type, model_config: Any, config: EngineConfig) -> None:
    if not getattr(model_class, "supports_tensor_parallel", False):
        raise ValueError(f"{model_class.__name__} does not support tensor or expert parallelism yet: "
                         "use tensor_parallel_size=1 and no expert parallelism")
    check_shardable(model_config, config.parallel_config())


def _check_encoder_attention(config: EngineConfig, model_class: type, loaded: LoadedModel | None) -> None:
    backend = config.mm_encoder_attn_backend
    if backend is None:
        return
    if not getattr(model_class, "supports_images", False):
        raise ValueError(f"mm_encoder_attn_backend={backend!r}: {model_class.__name__} has no vision encoder")
    if loaded is not None and loaded.model.encoder_attention != backend:
        raise ValueError(f"mm_encoder_attn_backend={backend!r}, but the model in memory was built with "
                         f"{loaded.model.encoder_attention!r}: pass model_options to load_model instead")


def _sampling_defaults(config: EngineConfig, checkpoint: Checkpoint | None) -> dict[str, Any]:
    """The generation config's sampling defaults, checked once at start-up (not in every request)."""
    defaults = read_generation_defaults(config.generation_config, checkpoint, is_embedded_default(checkpoint))
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"the generation config's sampling defaults are invalid: {e}") from None
    return defaults


def _input_processor(model_class: type, model_config: Any, checkpoint: Checkpoint | None,
                     config: EngineConfig) -> Qwen2VLInputProcessor | None:
    """Vision models: images -> patches and placeholder tokens, before a request is scheduled."""
    if not getattr(model_class, "supports_images", False):
        return None
    return Qwen2VLInputProcessor(model_config, checkpoint.directory if checkpoint else None, config.max_image_patches)


def _check_simulated_collectives(config: EngineConfig, model: Any) -> None:
    """Layers read the parallel context when they are built: a model already in memory simulates the
    collectives it was built to simulate, whatever the engine config says."""
    built = {m.parallel.simulate_collective_us for m in model.modules()
             if isinstance(getattr(m, "parallel", None), ParallelContext)}
    if built and built != {float(config.simulate_collective_us)}:
        raise ValueError(f"simulate_collective_us={config.simulate_collective_us}, but this model was built with "
                         f"{sorted(built)}: build it inside use_parallel(ParallelContext(simulate_collective_us=...)) "
                         "or pass a checkpoint path")


def _check_enforce_eager(config: EngineConfig, built_with: CompilationConfig) -> None:
    """A model already in memory keeps the compilation it was built with: enforce_eager cannot undo it."""
    if config.enforce_eager and not built_with.is_eager:
        raise ValueError(f"enforce_eager=True, but this model was built with compilation (mode={built_with.mode}, "
                         f"graph_mode={built_with.graph_mode}): load it with the default CompilationConfig")
