"""Who am I in the tensor-parallel group: the state layers read while the model is built.

Layers read :func:`current_parallel` in their constructors (like ``compiler.use_config``) and keep
the :class:`ParallelContext` they got; nothing reads it at run time, so one process could hold a
sharded model and an unsharded one side by side. Outside :func:`use_parallel` the context is the
single-rank one, and every parallel layer behaves exactly like its plain ``nn`` counterpart.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
from dataclasses import dataclass
from typing import Iterator

import torch.distributed as dist

from runtime.platforms import current_platform

logger = logging.getLogger(__name__)


# all_reduce: every rank runs its experts on every token, one all-reduce sums them (capturable in graphs);
# all_to_all: each token goes to its experts' ranks and back (runtime/distributed/moe_all_to_all.py).
EXPERT_PARALLEL_COMMS = ("all_reduce", "all_to_all")


@dataclass(frozen=True)
class ParallelConfig:
    """What the user asked for (``--tensor-parallel-size``, ``--enable-expert-parallel``)."""
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_parallel_comm: str = "all_reduce"  # how expert outputs meet: EXPERT_PARALLEL_COMMS

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.expert_parallel_comm not in EXPERT_PARALLEL_COMMS:
            raise ValueError(f"expert_parallel_comm must be one of {', '.join(EXPERT_PARALLEL_COMMS)}, got "
                             f"{self.expert_parallel_comm!r}")


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the tensor-parallel group, and in the data-parallel one where the MoE experts
    are split over data-parallel ranks. ``group_name`` names the process group for the collective custom ops."""
    rank: int = 0
    world_size: int = 1
    group_name: str = ""
    expert_parallel: bool = False
    expert_comm: str = "all_reduce"  # under expert_parallel: one of EXPERT_PARALLEL_COMMS
    # One rank only: hold the device this long where a tensor-parallel all-reduce would run
    # (graphmode::simulated_collective), so DBO's overlap can be measured without a second device.
    simulate_collective_us: float = 0.0
    # Data parallelism with expert parallelism: every data-parallel rank runs the dense layers whole on
    # its own tokens, and the experts are split over the data-parallel ranks (tokens travel all-to-all).
    data_parallel_rank: int = 0
    data_parallel_size: int = 1
    data_parallel_group_name: str = ""

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    @property
    def communicates(self) -> bool:
        """The forward runs a collective: row-parallel layers' (real or simulated), or the MoE all-to-all
        between data-parallel ranks."""
        return self.is_parallel or self.simulate_collective_us > 0 or self.data_parallel_size > 1

    @property
    def expert_group(self) -> tuple[int, int, str]:
        """(rank, size, process group name) of the ranks the experts are split over under expert parallelism:
        the data-parallel ranks when there are several, else the tensor-parallel ones."""
        if self.data_parallel_size > 1:
            return self.data_parallel_rank, self.data_parallel_size, self.data_parallel_group_name
        return self.rank, self.world_size, self.group_name

    @property
    def tokens_shared(self) -> bool:
        """Every rank of the expert group holds the same tokens (tensor parallelism), not its own (data)."""
        return self.data_parallel_size == 1


_SINGLE = ParallelContext()
_current: ParallelContext = _SINGLE


def current_parallel() -> ParallelContext:
    return _current


@contextlib.contextmanager
def use_parallel(context: ParallelContext) -> Iterator[ParallelContext]:
    """Layers built inside the block shard themselves for ``context``."""
    global _current
    previous, _current = _current, context
    try:
        yield context
    finally:
        _current = previous


def init_distributed(rank: int, world_size: int, init_method: str, expert_parallel: bool,
                     timeout_s: float = 600.0, expert_comm: str = "all_reduce") -> ParallelContext:
    """Join the process group through the platform's backend (gloo on CPU, nccl on CUDA)."""
    current_platform.set_device(rank)
    dist.init_process_group(backend=current_platform.dist_backend, init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    group = dist.group.WORLD
    logger.info("rank %d/%d joined the %s process group", rank, world_size, current_platform.dist_backend)
    return ParallelContext(rank, world_size, group.group_name, expert_parallel, expert_comm)


def init_data_parallel(rank: int, size: int, init_method: str, timeout_s: float = 600.0) -> ParallelContext:
    """Join the data-parallel ranks' process group (each rank one engine core, one device): the expert
    group of a MoE model whose experts are split over them."""
    dist.init_process_group(backend=current_platform.dist_backend, init_method=init_method, rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("data-parallel rank %d/%d joined the %s process group", rank, size, current_platform.dist_backend)
    return ParallelContext(expert_parallel=True, expert_comm="all_to_all", data_parallel_rank=rank,
                           data_parallel_size=size, data_parallel_group_name=dist.group.WORLD.group_name)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
