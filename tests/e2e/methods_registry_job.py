"""Every method case of a spec, two training steps each, in ONE torchrun job (4 ranks):

    torchrun --nproc-per-node 4 tests/e2e/methods_registry_job.py SPEC.json

SPEC: ``{"result": path, "cases": [{"name", "methods", "stage", "pp", "teachers": [arch...],
"student": arch}, ...]}``. Cases run grouped by pipeline size (the process groups are rebuilt once
between the groups, TP=2 throughout); for each case the runtime is built, stepped twice and torn
down. Rank 0 writes ``{name: {"records": [{"step", "loss", "terms"}...], "error": str | None}}``.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SEQ, GLOBAL_BATCH, MICRO, VOCAB = 16, 4, 2, 256


def batches(step: int, dp_rank: int, dp: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    data = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    per = GLOBAL_BATCH // dp
    mine = data[dp_rank * per : (dp_rank + 1) * per]
    return [mine[i : i + MICRO] for i in range(0, per, MICRO)]


def set_layout(tp: int, pp: int):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from parallel.config import ParallelConfig
    from parallel.distributed import initialize

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    world = dist.get_world_size() if dist.is_initialized() else 4
    # A short collective timeout: a method failing on some ranks only ends the job in minutes.
    ctx = initialize(ParallelConfig(tp=tp, pp=pp, dp=world // (tp * pp), timeout_minutes=3), seed=7)
    model_parallel_cuda_manual_seed(7)
    return ctx


def run_case(case: dict, ctx) -> list[dict]:
    from methods.base import BuildContext, Stage
    from methods.pipeline import build_pipeline, parse_entries
    from parallel.config import ModelArch, TrainConfig
    from parallel.model import model_info
    from parallel.runtime import DistillationRuntime, TeacherSpec

    build_ctx = BuildContext(  # what gkd_cli.build.build_context makes of a config
        stage=Stage(case["stage"]),
        teachers=tuple(model_info(ModelArch(**t), ctx.tp) for t in case["teachers"]),
        student=model_info(ModelArch(**case["student"]), ctx.tp),
        tp=ctx.tp,
        pp=ctx.pp,
    )
    pipeline = build_pipeline(parse_entries(case["methods"]), build_ctx)
    train = TrainConfig(
        steps=2,
        global_batch_size=GLOBAL_BATCH,
        micro_batch_size=MICRO,
        lr=1e-3,
        min_lr=1e-4,
        seed=11,
        stage=case["stage"],
    )
    runtime = DistillationRuntime(
        ctx=ctx,
        student=ModelArch(**case["student"]),
        teachers=[
            TeacherSpec(ModelArch(**t), seed=100 + i) for i, t in enumerate(case["teachers"])
        ],
        pipeline=pipeline,
        train=train,
        seq_length=SEQ,
        pad_id=0,
    )
    records = []
    try:
        for step in range(2):
            result = runtime.train_step(step, batches(step, ctx.dp_rank, ctx.dp))
            records.append(
                {
                    "step": step + 1,
                    "loss": result.loss,
                    "terms": result.terms,
                    "grad_norm": result.grad_norm,
                }
            )
    finally:
        del runtime
        gc.collect()
    return records


def main(spec_path: str) -> None:
    from parallel.distributed import shutdown

    spec = json.loads(Path(spec_path).read_text())
    results: dict[str, dict] = {}
    for pp in sorted({c["pp"] for c in spec["cases"]}, reverse=True):
        ctx = set_layout(2, pp)
        for case in (c for c in spec["cases"] if c["pp"] == pp):
            if case.get("requires_choices"):
                results[case["name"]] = {"skipped": "requires choice data"}
                continue
            if dist.get_rank() == 0:
                print(f"case {case['name']} (pp={pp})", file=sys.stderr, flush=True)
            try:
                results[case["name"]] = {
                    "records": run_case(case, ctx),
                    "error": None,
                    "pp": pp,
                    "dp": ctx.dp,
                }
            except Exception:  # recorded per case; the same on every rank (raised at build time)
                error = traceback.format_exc()
                print(
                    f"rank {dist.get_rank()}: case {case['name']} failed:\n{error}",
                    file=sys.stderr,
                    flush=True,
                )
                results[case["name"]] = {"records": [], "error": error[-3000:], "pp": pp}
            dist.barrier()
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
