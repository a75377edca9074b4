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
# Full graphs' pool estimate over an eager forward's peak at their largest size: the pool rounds its
# allocations into segments it cannot share with the rest of the allocator.
_GRAPH_POOL_MARGIN = 1.25


def plan_kv_blocks(cfg: EngineConfig, runner: ModelRunner) -> int:
    """KV cache blocks this rank can hold (under tensor parallelism the executor takes the minimum)."""
    per_block = runner.bytes_per_block()
    if cfg.num_kv_blocks is not None:
        blocks, how = cfg.num_kv_blocks, "fixed by num_kv_blocks"
    elif cfg.kv_cache_memory_gb is not None:
        blocks, how = int(cfg.kv_cache_memory_gb * GiB) // per_block, "fixed by kv_cache_memory_gb"
    elif current_platform.supports_memory_profiling:
        peak = profile_peak_bytes(runner)
        # Full graphs are captured after the KV cache is allocated (they bake in its addresses), so what
        # they add to the graph pool (captured piecewise graphs are in use already) is estimated and kept free.
        graphs, captured = estimate_full_graph_bytes(runner), runner.graphs.pool_bytes()
        runner.graphs.estimated_pool_bytes = captured + graphs
        info = current_platform.memory_info()
        # Memory in use counts every process on the device, as vLLM's gpu_memory_utilization does; the
        # split says whose it is (a second engine in one process, another process, or the driver's context).
        in_use = info.total_bytes - info.free_bytes
        ours = current_platform.memory_reserved()
        blocks = int(info.total_bytes * cfg.gpu_memory_utilization - in_use - peak - graphs) // per_block
        how = (f"profiled: activation peak {peak / GiB:.2f} GiB, piecewise graphs {captured / GiB:.2f} "
               f"GiB, full graphs (estimated) {graphs / GiB:.2f} GiB, "
               f"{cfg.gpu_memory_utilization:.0%} of "
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


def _peak_bytes_of(runner: ModelRunner, num_tokens: int, sample: bool) -> int:
    current_platform.synchronize()
    current_platform.reset_peak_memory()
    before = current_platform.memory_allocated()
    runner.dummy_run(num_tokens, sample)
    current_platform.synchronize()
    peak = current_platform.peak_memory_bytes() - before
    current_platform.empty_cache()
    return peak


def profile_peak_bytes(runner: ModelRunner) -> int:
    """Peak activation memory of a step: a dummy forward at the full token budget, then as many rows
    sampled as a step may hold."""
    return _peak_bytes_of(runner, runner.max_num_tokens, sample=True)


def estimate_full_graph_bytes(runner: ModelRunner) -> int:
    """Device memory the full graphs will add to the graph pool, before they are captured: an eager
    forward's peak at their largest size (plus a margin for the pool's rounding into segments), per
    pool. An upper bound where piecewise graphs came first: full graphs reuse their pool's free blocks."""
    sizes = runner.graphs.dispatcher
    if not sizes.full_sizes:
        return 0
    estimate = _peak_bytes_of(runner, max(sizes.full_sizes), sample=False)
    if runner.graphs.ubatch_runtimes and sizes.ubatch_full_sizes:
        estimate += len(runner.graphs.ubatch_runtimes) * _peak_bytes_of(runner, max(sizes.ubatch_full_sizes), sample=False)
    return int(estimate * _GRAPH_POOL_MARGIN)
