"""Resume-matrix job (tests/dist/test_resume_matrix.py), run under torchrun:

    torchrun --nproc-per-node N tests/dist/resume_job.py SPEC.json

Methods: ``glmd`` (logits), ``tinybert`` with ``layer_map: [1, 3]`` (intermediate layers and a
learned projection used on both pipeline stages), ``lm``; the models and data of
``tests/dist/methods_job.py``.

SPEC keys: tp, pp, dp, steps, out_dir, result, and
  * ``full`` (bool): run ``steps`` steps uninterrupted, saving at every ``save_every`` steps (all
    kept), logging ``metrics.jsonl``;
  * ``resume_from`` (list of ``[name, checkpoint step folder, metrics.jsonl or null]``): for each,
    in this same process group, copy the folder into ``<out_dir>/<name>/checkpoints`` (and the
    metrics file beside it), build a fresh runtime and continue to ``steps``.
The result maps ``"full"`` and each name to its per-step records, and each resumed name also to
the steps and losses found in its ``metrics.jsonl`` afterwards.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist import methods_job  # noqa: E402

METHODS = [
    {"name": "glmd", "weight": 1.0, "temperature": 2.0},
    {"name": "tinybert", "weight": 1.0, "layer_map": [1, 3]},
    {"name": "lm", "weight": 0.5},
]


def _train(ctx, spec: dict, out_dir: Path, *, save_every: int) -> list[dict]:
    from parallel.config import ModelArch, TrainConfig
    from parallel.loop import LoopSettings, train_loop
    from parallel.runtime import DistillationRuntime, TeacherSpec

    train = TrainConfig(
        steps=spec["steps"], global_batch_size=methods_job.GLOBAL_BATCH, micro_batch_size=methods_job.MICRO,
        lr=5e-3, min_lr=5e-4, warmup_steps=1, seed=11, stage="task",
    )  # fmt: skip
    from methods.base import BuildContext, Stage
    from parallel.model import model_info

    student, teacher = ModelArch(**methods_job.STUDENT), ModelArch(**methods_job.TEACHER)
    build_ctx = BuildContext(
        stage=Stage.TASK, teachers=(model_info(teacher, ctx.tp),), student=model_info(student, ctx.tp),
        tp=ctx.tp, pp=ctx.pp,
    )  # fmt: skip
    runtime = DistillationRuntime(
        ctx=ctx, student=student, teachers=[TeacherSpec(teacher, seed=300)],
        pipeline=methods_job.build_pipeline(METHODS, "task", build_ctx), train=train, seq_length=methods_job.SEQ,
        pad_id=0,
    )  # fmt: skip
    records: list[dict] = []
    train_loop(
        runtime,
        lambda step: methods_job.batches_for(step, ctx.dp_rank, ctx.dp),
        LoopSettings(
            steps=spec["steps"],
            save_every=save_every,
            keep_last=0,
            out_dir=out_dir,
            meta={"test": True},
            config_yaml="test: true\n",
        ),
        on_step=records.append,
    )
    return [{"step": r["step"], "loss": r["loss"], "terms": r["terms"]} for r in records]


def main(spec_path: str) -> None:
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize, shutdown

    spec = json.loads(Path(spec_path).read_text())
    ctx = initialize(ParallelConfig(tp=spec["tp"], pp=spec["pp"], dp=spec["dp"]), seed=7)
    out = Path(spec["out_dir"])
    result: dict = {}
    if spec.get("full"):
        result["full"] = _train(ctx, spec, out / "full", save_every=spec["save_every"])
    for name, folder, metrics in spec.get("resume_from", []):
        run = out / name
        if dist.get_rank() == 0:
            shutil.rmtree(run, ignore_errors=True)
            (run / "checkpoints").mkdir(parents=True)
            shutil.copytree(folder, run / "checkpoints" / Path(folder).name)
            (run / "checkpoints" / "latest").write_text(Path(folder).name)
            if metrics:
                shutil.copyfile(metrics, run / "metrics.jsonl")
        dist.barrier()
        records = _train(ctx, spec, run, save_every=0)
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        result[name] = {"records": records, "logged": [[r["step"], r["loss"]] for r in logged]}
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
