"""Engine configuration: one dataclass, validated up front with errors that name the field."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

from compiler.config import CompilationConfig
from runtime.attention.encoder_attention import check_backend
from runtime.contracts.kv_transfer import KVTransferConfig
from runtime.distributed.parallel_state import ParallelConfig
from runtime.platforms import current_platform

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DBOThresholds:
    """Minimum step token counts for splitting; decode-only and prefill-containing steps differ
    because a decode step's per-token compute is small, so it pays to split only large batches."""
    decode_tokens: int
    prefill_tokens: int

    def __post_init__(self) -> None:
        for name in ("decode_tokens", "prefill_tokens"):
            if getattr(self, name) < 2:
                raise ValueError(f"DBO {name} threshold must be >= 2 (each micro-batch needs a token), "
                                 f"got {getattr(self, name)}")


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint dir or .gguf; None = the embedded SmolLM2
    dtype: str = "auto"
    device: str | None = None  # None = the platform's device
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = min(model's max positions, 4096)
    block_size: int = 16
    num_kv_blocks: int | None = None  # fixed KV size in blocks; overrides the memory-based sizing
    kv_cache_memory_gb: float | None = None  # fixed KV size in GiB (CPU default: a share of free RAM)
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    # Default sampling for requests that leave a field out: "auto" (the checkpoint's generation_config.json;
    # the embedded SmolLM2's recommended settings), "vllm" (SamplingParams' own defaults) or a directory.
    generation_config: str = "auto"
    # CompilationConfig, or its dict / JSON form (the CLI passes --compilation-config '{...}').
    compilation_config: CompilationConfig | dict | str | None = None
    # vLLM's enforce_eager: no compilation and no static graphs, whatever compilation_config says.
    enforce_eager: bool = False
    # Vision models: the largest image (in encoder patches) a request may carry; the encoder's patch
    # budgets and the start-up memory profile use it. None = the image processor's max_pixels.
    max_image_patches: int | None = None
    # Vision models: the encoder's attention backend (runtime/attention/encoder_attention.py: sdpa, naive);
    # None = the model's default (sdpa).
    mm_encoder_attn_backend: str | None = None
    # Dual-batch overlap: split a step into two micro-batches once it has at least this many tokens
    # (runtime/ubatching.py); decode-only steps and steps with a prefill have separate thresholds.
    enable_dbo: bool = False
    # DBO pays only where a collective (TP all-reduce, MoE combine) can hide behind the other micro-batch's
    # compute: on one device it stays off even when enabled, unless forced (tests; measuring its own cost).
    force_dbo: bool = False
    dbo_decode_token_threshold: int = 32
    dbo_prefill_token_threshold: int = 512

    # Async scheduling: schedule and launch step N+1 while step N runs on the device; step N's sampled
    # tokens feed N+1's inputs there and reach the host after N+1 is launched. None = the platform's
    # default (on for devices with streams, off on CPU); runs synchronously under tensor parallelism.
    async_scheduling: bool | None = None

    # Tensor parallelism: one worker process per rank (runtime/distributed); expert parallelism
    # puts whole MoE experts on each rank instead of slicing every expert.
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # How expert outputs meet under expert parallelism: "all_reduce" (every rank runs its experts on every
    # token; capturable in graphs) or "all_to_all" (tokens travel to their experts' ranks and back).
    expert_parallel_comm: str = "all_reduce"
    # Data parallelism: this many engine cores, each with its own device(s) and KV cache, behind one front-end
    # (runtime/engine/dp_client.py). The launcher sets each core's rank and, for a MoE model whose experts are
    # split over the data-parallel ranks (enable_expert_parallel), where those ranks meet (tcp://host:port).
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    data_parallel_master: str | None = None
    # Prefill/decode disaggregation: this instance's side of a KV transfer (KVTransferConfig, its dict or JSON:
    # {"kv_role": "kv_producer" | "kv_consumer" | "kv_both", "kv_port": ..., "kv_ip": ...}); None: off.
    kv_transfer_config: Any = None
    # One device only: hold the device this many microseconds at every place a tensor-parallel all-reduce
    # would run (graphmode::simulated_collective), so DBO's overlap can be measured on one device. 0: off.
    simulate_collective_us: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.compilation_config, str):
            self.compilation_config = CompilationConfig.from_json(self.compilation_config)
        elif isinstance(self.compilation_config, dict):
            self.compilation_config = CompilationConfig.from_dict(self.compilation_config)
        elif self.compilation_config is None:
            self.compilation_config = CompilationConfig()  # the platform's default: graphs on CUDA, eager on CPU
            if not self.enforce_eager:
                logger.info("compilation: the %s platform's default, mode=%s graph_mode=%s", current_platform.name,
                            self.compilation_config.mode, self.compilation_config.graph_mode)
        if self.enforce_eager:
            given = self.compilation_config
            if not given.is_eager:
                logger.warning("enforce_eager: compilation_config (mode=%s, graph_mode=%s) ignored, the model runs "
                               "eagerly", given.mode, given.graph_mode)
            self.compilation_config = CompilationConfig.eager()
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.max_image_patches is not None and self.max_image_patches < 4:
            raise ValueError(f"max_image_patches must be at least 4, got {self.max_image_patches}")
        if self.mm_encoder_attn_backend is not None:
            check_backend(self.mm_encoder_attn_backend)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        for name in ("dbo_decode_token_threshold", "dbo_prefill_token_threshold"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {getattr(self, name)!r}")
        if self.kv_transfer_config is not None:
            self.kv_transfer_config = KVTransferConfig.parse(self.kv_transfer_config)
            if self.data_parallel_size > 1:
                raise ValueError("kv_transfer_config with data_parallel_size > 1 is not supported")
        if self.enable_dbo and self.enable_expert_parallel and self.data_parallel_size > 1:
            raise ValueError("DBO with expert parallelism over data-parallel ranks is not supported: a rank's dummy "
                             "step would enter fewer collectives than a peer's split one")
        if self.force_dbo and not self.enable_dbo:
            raise ValueError("force_dbo=True needs enable_dbo=True")
        self.parallel_config()  # validates tensor_parallel_size
        if not isinstance(self.data_parallel_size, int) or self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be a positive integer, got {self.data_parallel_size!r}")
        if not isinstance(self.data_parallel_rank, int) or not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_rank must be in [0, {self.data_parallel_size}), got "
                             f"{self.data_parallel_rank!r}")
        if self.enable_expert_parallel and self.tensor_parallel_size < 2 and self.data_parallel_size < 2:
            raise ValueError("enable_expert_parallel needs tensor_parallel_size >= 2 or data_parallel_size >= 2")
        if self.experts_over_data_parallel and self.tensor_parallel_size > 1:
            raise ValueError("expert parallelism over data-parallel ranks runs with tensor_parallel_size=1 (each rank "
                             "one device); tensor parallelism inside each data-parallel rank is not supported with it")
        if self.expert_parallel_comm != "all_reduce" and not self.enable_expert_parallel:
            raise ValueError(f"expert_parallel_comm={self.expert_parallel_comm!r} needs enable_expert_parallel=True")
        if not isinstance(self.simulate_collective_us, (int, float)) or self.simulate_collective_us < 0:
            raise ValueError(f"simulate_collective_us must be >= 0, got {self.simulate_collective_us!r}")
        if self.simulate_collective_us and self.tensor_parallel_size > 1:
            raise ValueError("simulate_collective_us stands in for collectives on one device; with "
                             "tensor_parallel_size > 1 the real ones run")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @property
    def dbo_active(self) -> bool:
        """Steps are split into micro-batches: DBO enabled, and either the forward communicates or DBO is
        forced (with nothing to overlap, two half-size forwards cost more than one)."""
        return self.enable_dbo and (self.communicates or self.force_dbo)

    def dbo_thresholds(self) -> DBOThresholds | None:
        """The DBO split thresholds, or None when dual-batch overlap is off (not enabled, or off by policy)."""
        if not self.dbo_active:
            return None
        return DBOThresholds(self.dbo_decode_token_threshold, self.dbo_prefill_token_threshold)

    @property
    def communicates(self) -> bool:
        """The forward runs collectives: the model is sharded over several ranks (its experts over the
        data-parallel ones included), or simulates them."""
        return self.tensor_parallel_size > 1 or self.simulate_collective_us > 0 or self.experts_over_data_parallel

    @property
    def experts_over_data_parallel(self) -> bool:
        """A MoE model's experts are split over the data-parallel ranks, whose steps must then line up."""
        return self.enable_expert_parallel and self.data_parallel_size > 1

    def model_options(self) -> dict[str, Any]:
        """Constructor options of the model class (models/loader.py: build_model)."""
        return {"encoder_attention": self.mm_encoder_attn_backend} if self.mm_encoder_attn_backend else {}

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.enable_expert_parallel, self.expert_parallel_comm)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)
