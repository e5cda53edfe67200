"""The setup the runtime jobs under torchrun share (tests/dist/examples_job.py,
tests/dist/teacher_cache_job.py, tests/dist/choices_job.py): the process group at tp = pp = 1
over every rank (data parallel), the training settings of their short runs, and the task-stage
runtime of a Llama teacher and a GPT-2 student."""

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


def task_runtime(ctx, teacher: dict, student: dict, methods: list, *, steps: int,
                 global_batch: int, micro: int, seq: int):  # fmt: skip
    """A task-stage runtime with attention masks (example-aware rows): a Llama ``teacher`` and a
    GPT-2 ``student`` (``ModelArch`` keyword arguments), ``methods`` as config entries."""
    from methods.base import BuildContext, Stage
    from methods.pipeline import MethodPipeline
    from parallel.config import ModelArch
    from parallel.model import model_info
    from parallel.runtime import DistillationRuntime, TeacherSpec

    teacher_arch, student_arch = ModelArch.llama(**teacher), ModelArch.gpt2(**student)
    build_ctx = BuildContext(
        stage=Stage.TASK,
        teachers=(model_info(teacher_arch, ctx.tp),),
        student=model_info(student_arch, ctx.tp),
        tp=ctx.tp,
        pp=ctx.pp,
    )
    return DistillationRuntime(
        ctx=ctx,
        student=student_arch,
        teachers=[TeacherSpec(teacher_arch, checkpoint=None)],
        pipeline=MethodPipeline.from_config(methods, stage="task", ctx=build_ctx),
        train=train_config(steps, global_batch, micro, stage="task"),
        seq_length=seq,
        attention_masks=True,
    )
