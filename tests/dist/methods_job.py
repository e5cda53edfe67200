"""A distillation job with method modules, multi-teacher and forward-changing methods, run under
torchrun for the runtime-methods tests:

    torchrun --nproc-per-node N tests/dist/methods_job.py SPEC.json

SPEC keys: tp, pp, dp, steps, out_dir, result, stop_after, save_every, stage, methods (a methods
config list; the name ``shared_fit`` is this file's test method below), teachers (number of
teachers, default 2), teacher_arch ("student": one teacher shaped like the student) and
teacher_checkpoint. The result holds per-step losses and terms, and layout-independent
fingerprints (see ``tests/dist/runtime_job.py``) of the student, the method modules and teacher 0.
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from methods.base import FeatureKind, Role, Stage, Tap  # noqa: E402

TEACHER = dict(num_layers=4, hidden_size=48, num_attention_heads=4, vocab_size=500, max_seq_len=32)
TEACHER_B = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=500, max_seq_len=32)
STUDENT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=500, max_seq_len=32)
SEQ, GLOBAL_BATCH, MICRO = 16, 8, 2


@dataclass(kw_only=True, frozen=True)
class SharedFitParams:
    """No parameters."""


class SharedFit:
    """Test method: ONE projection (student -> teacher width) shared by the embedding and every
    mapped hidden layer, so it is used on every pipeline stage (a replicated module whose
    gradients the runtime sums over pp)."""

    name: ClassVar[str] = "shared_fit"
    stages = frozenset({Stage.PRETRAIN, Stage.TASK})

    def __init__(self) -> None:
        self.fit = None
        self.pairs = [(0, 1), (1, 3)]

    def taps(self, teacher, student):
        self.widths = (student.hidden_size, teacher.hidden_size)
        taps = [Tap(Role.STUDENT, FeatureKind.EMBEDDING), Tap(Role.TEACHER, FeatureKind.EMBEDDING)]
        for s, t in self.pairs:
            taps += [Tap(Role.STUDENT, FeatureKind.HIDDEN, s), Tap(Role.TEACHER, FeatureKind.HIDDEN, t)]
        return taps

    def layer_pairs(self, teacher, student):
        return self.pairs

    def modules(self):
        if self.fit is None:
            self.fit = torch.nn.Linear(*self.widths)
        return {"fit": self.fit}

    def compute(self, features, ctx):
        total = None
        pairs = [(Tap(Role.STUDENT, FeatureKind.EMBEDDING), Tap(Role.TEACHER, FeatureKind.EMBEDDING))]
        pairs += [(Tap(Role.STUDENT, FeatureKind.HIDDEN, s), Tap(Role.TEACHER, FeatureKind.HIDDEN, t)) for s, t in self.pairs]
        for s_tap, t_tap in pairs:
            if s_tap in features:
                value = (self.fit(features[s_tap]) - features[t_tap]).pow(2).mean()
                total = value if total is None else total + value
        return {} if total is None else {"mse": total}


def fingerprint_sharded(sharded: dict) -> dict[str, float]:
    """Layout-independent fingerprint of a flat sharded state dict (main replicas only)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    leaves = []
    for leaf in nested_values(sharded):
        leaves.extend(nested_values(leaf.build()) if isinstance(leaf, ShardedTensorFactory) else [leaf])
    sums: dict[str, float] = {}
    for sh in leaves:
        ids = sh.replica_id if isinstance(getattr(sh, "replica_id", 0), tuple) else (getattr(sh, "replica_id", 0),)
        if not isinstance(sh, ShardedTensor) or any(i != 0 for i in ids):
            continue
        prepend = sh.prepend_axis_num
        key = f"{sh.key}|{tuple(sh.global_offset[:prepend])}"
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        full = torch.randn(tuple(sh.global_shape[prepend:]), generator=gen, dtype=torch.float64)
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[prepend:], sh.local_shape, strict=True))
        sums[key] = sums.get(key, 0.0) + float((full[index] * sh.data.double().reshape(full[index].shape)).sum())
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sums)
    total: dict[str, float] = {}
    for part in gathered:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total


def batches_for(step: int, dp_rank: int, dp: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + step)
    data = torch.randint(1, STUDENT["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=gen)
    data[-1, -3:] = 0  # padding (pad id 0); vocab 500 pads to 512 at tp 1 and 2 alike
    per = GLOBAL_BATCH // dp
    mine = data[dp_rank * per : (dp_rank + 1) * per]
    return [mine[i : i + MICRO] for i in range(0, per, MICRO)]


def build_pipeline(config: list[dict], stage: str, build_ctx):
    from methods.pipeline import MethodPipeline, PipelineEntry

    entries = []
    for item in config:
        if item["name"] == "shared_fit":
            entries.append(PipelineEntry(name="shared_fit", method=SharedFit(), weight=item.get("weight", 1.0)))
        else:
            entries.extend(MethodPipeline.from_config([item], stage=stage, ctx=build_ctx).entries)
    return MethodPipeline(entries, stage=stage)


def main(spec_path: str) -> None:
    from parallel.config import ModelArch, ParallelConfig, TrainConfig
    from parallel.distributed import initialize, shutdown
    from parallel.loop import LoopSettings, train_loop
    from parallel.method_modules import METHODS_PREFIX
    from parallel.runtime import DistillationRuntime, TeacherSpec

    spec = json.loads(Path(spec_path).read_text())
    ctx = initialize(ParallelConfig(tp=spec["tp"], pp=spec["pp"], dp=spec["dp"]), seed=7)
    checkpoint = spec.get("teacher_checkpoint")
    if spec.get("teacher_arch") == "student":
        teachers = [TeacherSpec(ModelArch(**STUDENT), checkpoint=Path(checkpoint) if checkpoint else None)]
    else:
        archs = [TEACHER, TEACHER_B][: spec.get("teachers", 2)]
        teachers = [TeacherSpec(ModelArch(**a), seed=300 + i) for i, a in enumerate(archs)]
    stage = spec.get("stage", "task")
    train = TrainConfig(
        steps=spec["steps"], global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO, lr=5e-3, min_lr=5e-4,
        warmup_steps=1, seed=11, stage=stage,
    )
    from methods.base import BuildContext
    from parallel.model import model_info

    build_ctx = BuildContext(  # the teachers the methods are built for (combiners read them)
        stage=Stage(stage), teachers=tuple(model_info(t.arch, ctx.tp) for t in teachers),
        student=model_info(ModelArch(**STUDENT), ctx.tp), tp=ctx.tp, pp=ctx.pp,
    )  # fmt: skip
    runtime = DistillationRuntime(
        ctx=ctx, student=ModelArch(**STUDENT), teachers=teachers,
        pipeline=build_pipeline(spec["methods"], stage, build_ctx), train=train, seq_length=SEQ, pad_id=0,
    )  # fmt: skip
    records: list[dict] = []
    outcome = train_loop(
        runtime,
        lambda step: batches_for(step, ctx.dp_rank, ctx.dp),
        LoopSettings(
            steps=spec["steps"], save_every=spec.get("save_every", 1000), out_dir=Path(spec["out_dir"]),
            stop_after=spec.get("stop_after"), meta={"test": True}, config_yaml="test: true\n",
        ),
        on_step=records.append,
    )
    modules = runtime.method_modules.sharded_state_dict(METHODS_PREFIX, tp=ctx.tp)
    result = {
        "records": records,
        "status": outcome.status,
        "student": fingerprint_sharded(runtime.student.sharded_state_dict()),
        "modules": fingerprint_sharded(modules),
        "teacher": fingerprint_sharded(runtime.teachers[0].sharded_state_dict()),
    }
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
