"""How many KV cache blocks a rank holds: fixed by the config, profiled on a device, or a share of
host memory where the platform cannot profile."""
from __future__ import annotations

import logging

from runtime.contracts.config import EngineConfig
from runtime.platforms import current_platform
from runtime.worker.model_runner import GiB, ModelRunner

logger = logging.getLogger(__name__)

_CPU_KV_SHARE = 0.25  # of available RAM, when no KV size is given on a platform without profiling
# A CPU is compute-bound long before 1 GiB of KV (23k tokens of SmolLM2 in fp32) is full, and the cache is zeroed
# at start-up: 4 GiB took 2.6 s of the 2-core machine (plus page faults), for blocks that were never used.
_CPU_KV_CAP = 1 * GiB


def plan_kv_blocks(cfg: EngineConfig, runner: ModelRunner) -> int:
    """KV cache blocks this rank can hold (under tensor parallelism the executor takes the minimum)."""
    per_block = runner.bytes_per_block()
    if cfg.num_kv_blocks is not None:
        blocks, how = cfg.num_kv_blocks, "fixed by num_kv_blocks"
    elif cfg.kv_cache_memory_gb is not None:
        blocks, how = int(cfg.kv_cache_memory_gb * GiB) // per_block, "fixed by kv_cache_memory_gb"
    elif current_platform.supports_memory_profiling:
        peak = runner.profile_peak_bytes()
        info = current_platform.memory_info()
        # Memory in use counts every process on the device, as vLLM's gpu_memory_utilization does; the
        # split says whose it is (a second engine in one process, another process, or the driver's context).
        in_use = info.total_bytes - info.free_bytes
        ours = current_platform.memory_reserved()
        blocks = int(info.total_bytes * cfg.gpu_memory_utilization - in_use - peak) // per_block
        how = (f"profiled: activation peak {peak / GiB:.2f} GiB, {cfg.gpu_memory_utilization:.0%} of "
               f"{info.total_bytes / GiB:.1f} GiB, {in_use / GiB:.1f} GiB already in use on the device "
               f"({ours / GiB:.1f} GiB held by this process's allocator: weights and anything still cached; "
               f"{(in_use - ours) / GiB:.1f} GiB outside it: other processes and the driver's context)")
    else:
        avail = current_platform.memory_info().free_bytes
        blocks, how = int(min(_CPU_KV_CAP, avail * _CPU_KV_SHARE)) // per_block, "share of free host memory"
        # No point holding more than every sequence at full length.
        blocks = min(blocks, cfg.max_num_seqs * runner.max_blocks_per_seq)
    if blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache ({how}); lower max_num_batched_tokens, raise "
                           "gpu_memory_utilization or fix the size with kv_cache_memory_gb")
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %d tokens), %s", blocks, cfg.block_size,
                blocks * per_block / GiB, blocks * cfg.block_size, how)
    return blocks
