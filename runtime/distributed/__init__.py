"""Tensor and expert parallelism over ``torch.distributed``: process groups, collectives, executor.

``parallel_state`` holds the one piece of parallel state layers read while they are built;
``collectives`` registers the communication custom ops (every one goes through
``runtime.ubatching.run_collective``); ``executor`` and ``worker`` run one process per rank.
"""
from runtime.distributed.parallel_state import (ParallelConfig, ParallelContext, current_parallel,
                                                use_parallel)

__all__ = ["ParallelConfig", "ParallelContext", "current_parallel", "use_parallel"]
