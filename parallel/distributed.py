"""Process groups for a distillation job: torch.distributed + megatron-core parallel state."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel import cpu_compat, mcore_fixes
from parallel.config import ParallelConfig

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MINUTES = {"gloo": 10.0, "nccl": 30.0}


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the job. Groups are megatron-core's."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    rank: int
    world_size: int
    device: torch.device
    backend: str
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    sequence_parallel: bool = False
    """megatron's sequence parallelism (``parallel.sequence_parallel``; only at tp > 1): the
    activations outside attention and MLP are split along the sequence over the tp ranks."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def check_world_size(parallel: ParallelConfig, world_size: int) -> None:
    if parallel.world_size != world_size:
        raise ValueError(
            f"world size {world_size} != parallel.tp x parallel.pp x parallel.dp = "
            f"{parallel.tp} x {parallel.pp} x {parallel.dp} = {parallel.world_size}; launch "
            f"{parallel.world_size} processes or change parallel.dp"
        )


def initialize(parallel: ParallelConfig, *, seed: int) -> ParallelContext:
    """Initialize torch.distributed (from torchrun's environment) and megatron's parallel state.

    CPU: gloo, and the megatron-core CPU compatibility layer. GPU: NCCL, one device per local rank.
    """
    import threading

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from parallel.loop import install_early_stop

    if (
        threading.current_thread() is threading.main_thread()
    ):  # signal handlers need the main thread
        install_early_stop()
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if not use_cuda:
        cpu_compat.activate()
    mcore_fixes.apply()
    timeout = parallel.timeout_minutes or DEFAULT_TIMEOUT_MINUTES[backend]
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout))
    check_world_size(parallel, dist.get_world_size())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        distributed_timeout_minutes=int(max(1, timeout)),
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return ParallelContext(
        tp=parallel.tp,
        pp=parallel.pp,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
        backend=backend,
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
    )


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
