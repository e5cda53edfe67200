"""Example-aware batches through the real runtime, under torchrun (tests/dist/test_example_batches.py).

    torchrun --nproc-per-node N tests/dist/examples_job.py SPEC.json

SPEC keys: modes (list of data.mode), steps, out_dir, result, runs (optional, default ["full"]:
"full" runs every step uninterrupted; "resumed" stops after stop_after steps, then builds a fresh
runtime in this process and resumes from the checkpoint; each run has its own output folder),
stop_after, isolation (optional: also run each packed example alone through the teacher (Llama:
rotary) and the student (GPT-2: learned absolute positions) and compare with the packed rows).
The result holds, per mode and run, the losses, terms, steps and the store indices each step read.

A store of prompt/completion examples of varying lengths is written with ExampleStoreWriter; the
methods are real ones (glmd, pkd with per-example pooling, lm) at the task stage. Rank 0 writes the
per-step records and the store indices each step read (all ranks, in rank order).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist.job_setup import start, task_runtime  # noqa: E402

TEACHER = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=120,
    max_seq_len=32,
)
STUDENT = dict(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=120, max_seq_len=32)
SEQ, GLOBAL_BATCH, MICRO, NUM_EXAMPLES = 16, 4, 1, 10
METHODS = [
    {"name": "glmd", "temperature": 2.0},
    {"name": "pkd", "pooling": "last"},
    {"name": "lm", "weight": 0.5},
]


def write_store(folder: Path):
    from gkd_cli.data.store import ExampleStoreWriter

    rng = np.random.default_rng(0)
    writer = ExampleStoreWriter(folder, "examples", vocab_size=TEACHER["vocab_size"])
    for _ in range(NUM_EXAMPLES):
        length = int(rng.integers(3, 11))
        prompt = int(rng.integers(1, length))
        writer.add(rng.integers(1, 120, length), [0] * prompt + [1] * (length - prompt))
    return writer.finish()


def build_runtime(ctx, steps):
    return task_runtime(ctx, TEACHER, STUDENT, METHODS, steps=steps, global_batch=GLOBAL_BATCH,
                        micro=MICRO, seq=SEQ)  # fmt: skip


def isolation(runtime, rows) -> dict:
    """Max |difference| between each example's logits in its packed row and run alone."""
    from gkd_cli.data.batching import collate

    worst = {"teacher": 0.0, "student": 0.0}
    micro = collate([rows.row(0, r) for r in range(3)], packed=True)
    batch = runtime._make_batch(micro)
    ctx = runtime._loss_context(batch)
    pooled = {}
    with torch.no_grad():
        for who, model in (("teacher", runtime.teachers[0]), ("student", runtime.student)):
            model.eval()
            packed = model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"],
            )  # [b, s, V]
            pooled[who] = ctx.pool_examples(packed.transpose(0, 1), "mean")[0]
            ids = micro["example_ids"]
            for e in range(int(ids.max()) + 1):
                r, where = (ids == e).nonzero(as_tuple=True)
                r = int(r[0])
                tokens = batch["input_ids"][r, where].unsqueeze(0)
                alone = model(
                    input_ids=tokens,
                    position_ids=torch.arange(tokens.shape[1]).unsqueeze(0),
                    attention_mask=None,
                )[0]
                worst[who] = max(worst[who], float((packed[r, where] - alone).abs().max()))
                # per-example pooling of the packed batch = pooling of the example run alone
                pool_gap = float((pooled[who][e] - alone.mean(0)).abs().max())
                worst[who + "_pool"] = max(worst.get(who + "_pool", 0.0), pool_gap)
            # the same rows with the default causal mask (attention across examples) differ
            crossed = model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                attention_mask=None,
            )
            worst[who + "_without_mask"] = float((crossed - packed).abs().max())
            model.train()
    return worst


def train(ctx, rows, spec: dict, out_dir: Path, *, resumed: bool) -> dict:
    """Train ``spec["steps"]`` steps on ``rows`` (in two runtimes when ``resumed``: the second, fresh
    one resumes from the checkpoint the first wrote at ``spec["stop_after"]``)."""
    from gkd_cli.data.batching import microbatches
    from parallel.loop import LoopSettings, train_loop

    seen: list = []

    def batch_fn(step):
        micro = microbatches(rows, step, GLOBAL_BATCH, ctx.dp_rank, ctx.dp, MICRO)
        mine = [m["example_index"].tolist() for m in micro]
        everyone: list = [None] * ctx.dp
        dist.all_gather_object(everyone, mine, group=ctx.dp_group)
        seen.append([row for part in everyone for m in part for row in m])
        return micro

    records: list = []
    settings = dict(
        steps=spec["steps"],
        save_every=1000,
        out_dir=out_dir,
        meta={"test": True},
        config_yaml="t: 1\n",
        resume=True,
    )
    stop = spec["stop_after"] if resumed else None
    runtime = build_runtime(ctx, spec["steps"])
    train_loop(runtime, batch_fn, LoopSettings(**settings, stop_after=stop), on_step=records.append)
    if resumed:
        runtime = build_runtime(ctx, spec["steps"])  # a fresh runtime: what a relaunch builds
        train_loop(runtime, batch_fn, LoopSettings(**settings), on_step=records.append)
    return {
        "losses": [r["loss"] for r in records],
        "terms": [r["terms"] for r in records],
        "steps": [r["step"] for r in records],
        "seen": seen,
    }


def main(spec_path: str) -> None:
    from gkd_cli.data.batching import make_rows
    from gkd_cli.data.store import ExampleStore
    from parallel.distributed import shutdown

    spec = json.loads(Path(spec_path).read_text())
    ctx = start()
    out = Path(spec["out_dir"])
    if ctx.rank == 0:
        write_store(out / "store")
    dist.barrier()
    store = ExampleStore.open(out / "store", "examples")
    result: dict = {}
    for mode in spec["modes"]:
        rows = make_rows(store, mode, SEQ, seed=3)
        if spec.get("isolation") and mode == "packed":
            result["isolation"] = isolation(build_runtime(ctx, spec["steps"]), rows)
        result[mode] = {}
        for run in spec.get("runs", ["full"]):
            result[mode][run] = train(ctx, rows, spec, out / mode / run, resumed=run == "resumed")
    if ctx.rank == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
