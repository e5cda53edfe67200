"""Choice records through the real runtime, under torchrun (tests/dist/test_choices_runtime.py).

    torchrun --nproc-per-node N tests/dist/choices_job.py SPEC.json

SPEC keys: tp, pp, steps, out_dir, result. Choice records (``{"prompt", "options", "label"}``)
are tokenized with a small BPE, expanded and stored as the workers do (``prepare_sources``,
``build_example_store``, ``ChoiceRows`` in packed mode: several groups per row), and trained at the
task stage with glmd_soft (GLMD's third step), kd on class scores (soft + hard on the labels) and
glmd at the answer positions. Rank 0 writes the per-step records; at TP1PP1 it also writes the
reference of step 1 computed without the runtime: each option's score ``log p(option | prompt)``
from a forward of the framed prompt + option tokens alone, per model, and GLMD's soft cross entropy
and the class cross entropy from those scores by plain math.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VOCAB = 320
PADDED = 384  # megatron pads the vocabulary to a multiple of 128
TEACHER = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
               vocab_size=VOCAB, max_seq_len=96)  # fmt: skip
STUDENT = dict(
    num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=VOCAB, max_seq_len=96
)
SEQ, GLOBAL_BATCH, MICRO = 96, 2, 2
METHODS = [
    {"name": "glmd_soft"},
    {"name": "kd", "temperature": 2.0, "hard_weight": 0.5},
    {"name": "glmd", "temperature": 2.0, "weight": 0.5},
]
RECORDS = [
    {"prompt": "The cat sat on the", "options": [" mat", " moon", " dog"], "label": 0},
    {"prompt": "Is the sky blue? Answer:", "options": [" no", " yes"], "label": 1},
    {"prompt": "It rained, so", "options": [" we stayed in", " the sun was out"], "label": 0},
    {"prompt": "Two plus two is", "options": [" four", " five"], "label": 0},
    {"prompt": "Paris is in", "options": [" France", " Spain", " Italy"], "label": 0},
    {"prompt": "Fish live in", "options": [" water", " trees"], "label": 0},
    {"prompt": "Snow is", "options": [" cold", " hot", " green"], "label": 0},
    {"prompt": "A week has seven", "options": [" days", " cats"], "label": 0},
]


def build_runtime(ctx, steps):
    from tests.dist.job_setup import task_runtime

    return task_runtime(ctx, TEACHER, STUDENT, METHODS, steps=steps, global_batch=GLOBAL_BATCH,
                        micro=MICRO, seq=SEQ)  # fmt: skip


def prepare(out: Path, rank: int):
    """The tokenizer, the expanded sources and the store (rank 0 writes, the others reuse)."""
    from gkd_cli.data.build import build_example_store
    from gkd_cli.data.choices import prepare_sources
    from gkd_cli.data.formats import DataSource
    from gkd_cli.data.tokenizer import load_tokenizer, train_bpe

    data = out / "choices.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        text = out / "corpus.txt"
        text.write_text("\n\n".join(r["prompt"] + "".join(r["options"]) for r in RECORDS) * 4)
        train_bpe([text], VOCAB - 20).save(out / "tok")
        data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
        sources, groups = prepare_sources([DataSource(path=str(data))], out / "expanded")
        build_example_store(sources, load_tokenizer(out / "tok"), out / "store", max_length=SEQ,
                            overlong="refuse")  # fmt: skip
    dist.barrier()
    tokenizer = load_tokenizer(out / "tok")
    sources, groups = prepare_sources([DataSource(path=str(data))], out / "expanded")
    store = build_example_store(
        sources, tokenizer, out / "store", max_length=SEQ, overlong="refuse"
    )
    return tokenizer, store, groups


def reference(runtime, tokenizer, rows, micro) -> dict:
    """Step 1's glmd_soft and class cross entropy from each option run alone (before any update)."""
    import numpy as np

    groups = sorted({int(rows.group[i]) for i in np.asarray(micro["example_index"]).reshape(-1)
                     if i >= 0})  # fmt: skip
    scores = {}
    runtime.stage.eval()  # a plain forward: the fused output layer is a training-path feature
    with torch.no_grad():
        for who, model in (("teacher", runtime.teachers[0]), ("student", runtime.student)):
            table = []
            for g in groups:
                record = RECORDS[g]
                prompt = tokenizer.encode_batch_framed([record["prompt"]])[0]
                row = []
                for option in record["options"]:
                    ids = tokenizer.encode_batch([option])[0]
                    tokens = torch.tensor([prompt + ids])
                    logits = model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None],
                                   attention_mask=None)  # fmt: skip
                    logits = (logits[0] if logits.shape[0] == 1 else logits[:, 0]).double()
                    assert logits.shape == (tokens.shape[1], PADDED), logits.shape
                    logp = torch.log_softmax(logits[:, :VOCAB], -1)  # padding columns excluded
                    row.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)))
                table.append(row)
            scores[who] = table
    runtime.stage.train()
    soft, hard = [], []
    for g, s, t in zip(groups, scores["student"], scores["teacher"], strict=True):
        s, t = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
        soft.append(float(-(torch.softmax(t, 0) * torch.log_softmax(s, 0)).sum()))
        hard.append(float(-torch.log_softmax(s, 0)[RECORDS[g]["label"]]))
    return {"groups": groups, "scores": scores, "glmd_soft": sum(soft) / len(soft),
            "hard": sum(hard) / len(hard)}  # fmt: skip


def main(spec_path: str) -> None:
    from gkd_cli.data.batching import microbatches
    from gkd_cli.data.choices import ChoiceRows
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize, shutdown
    from parallel.loop import LoopSettings, train_loop

    spec = json.loads(Path(spec_path).read_text())
    world = int(os.environ["WORLD_SIZE"])
    ctx = initialize(ParallelConfig(tp=spec["tp"], pp=spec["pp"], dp=world // (spec["tp"] * spec["pp"])), seed=7)  # fmt: skip
    out = Path(spec["out_dir"])
    tokenizer, store, groups = prepare(out / "data", ctx.rank)
    rows = ChoiceRows(
        store, SEQ, groups, mode="packed", seed=3, shuffle=False, pad_id=tokenizer.eos_id
    )

    def batch_fn(step):
        return microbatches(rows, step, GLOBAL_BATCH, ctx.dp_rank, ctx.dp, MICRO)

    runtime = build_runtime(ctx, spec["steps"])
    result: dict = {}
    if ctx.tp == ctx.pp == 1:
        result["reference"] = reference(runtime, tokenizer, rows, batch_fn(0)[0])
    records: list = []
    settings = LoopSettings(steps=spec["steps"], save_every=1000, out_dir=out / "run",
                            meta={"test": True}, config_yaml="t: 1\n", resume=False)  # fmt: skip
    train_loop(runtime, batch_fn, settings, on_step=records.append)
    result["records"] = [
        {"loss": r["loss"], "terms": r["terms"], "step": r["step"]} for r in records
    ]
    result["head_path"] = getattr(runtime, "head_path", None)
    if ctx.rank == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
