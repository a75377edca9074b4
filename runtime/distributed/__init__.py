"""Tensor and expert parallelism over ``torch.distributed``: process groups and collectives.

``parallel_state`` holds the one piece of parallel state layers read while they are built;
``collectives`` registers the communication custom ops (every one goes through
``runtime.ubatching.run_collective``). The processes per rank live in the worker and engine layers
(runtime/worker/worker_process.py, runtime/engine/multiproc_executor.py).
"""
from runtime.distributed.parallel_state import (ParallelConfig, ParallelContext, current_parallel,
                                                use_parallel)

__all__ = ["ParallelConfig", "ParallelContext", "current_parallel", "use_parallel"]
