"""The setup the runtime jobs under torchrun share (tests/dist/examples_job.py,
tests/dist/teacher_cache_job.py): the process group at tp = pp = 1 over every rank (data
parallel) and the training settings of their short runs."""

from __future__ import annotations

import os
from typing import Any

PARALLEL_SEED = 7
TRAIN_SEED = 11


def start(dp: int | None = None):
    """``initialize`` at tp = pp = 1, dp = ``dp`` (default: the world size)."""
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize

    dp = int(os.environ["WORLD_SIZE"]) if dp is None else dp
    return initialize(ParallelConfig(tp=1, pp=1, dp=dp), seed=PARALLEL_SEED)


def train_config(steps: int, global_batch: int, micro: int, **extra: Any):
    """Short runs: lr 5e-3 down to 5e-4 after one warm-up step, seed 11."""
    from parallel.config import TrainConfig

    return TrainConfig(
        steps=steps,
        global_batch_size=global_batch,
        micro_batch_size=micro,
        lr=5e-3,
        min_lr=5e-4,
        warmup_steps=1,
        seed=TRAIN_SEED,
        **extra,
    )
