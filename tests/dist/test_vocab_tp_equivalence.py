"""A compressed-vocabulary student (GLMD) trains the same at TP=2 and at PP=2 as at TP=1.

The mapping is made for tp=2 with the global selection, so the kept tokens crowd into teacher
shard 0 and both student shards carry padding slots; at TP=2 each rank restricts its own teacher
shard with shard-local indices, at TP=1 the worker indexes the whole teacher vocabulary by original
ids with the same tp=2 mapping. The real worker (``python -m gkd_cli.worker``) runs under torchrun
with GLMD's KL plus the student's LM loss; per-step losses and terms agree within 1e-5 relative
(fp32 on CPU; layouts differ only in reduction order, see test_runtime_equivalence.py).

GLMD and the LM loss allow the fused output layer + loss (methods/fused_head.py): the TP=2 and PP=2
runs take it (the restricted teacher head and the padding-slot masks applied per chunk of logits;
at PP=2 on the last stage only), the TP=1 run is forced onto the materialized path
(``GKD_FUSED_HEAD=off``), so their agreement also says the fused path equals the materialized one
with a compressed vocabulary. The student's output layer is untied from its embedding (its own
weight gets the fused path's weight gradient; the tied case is covered by the fused layouts of
test_runtime_equivalence.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tests.dist._torchrun import REPO, torchrun

pytestmark = pytest.mark.dist

RTOL = 1e-5
VOCAB = 1024


def _config(
    tmp: Path, name: str, tp: int, pp: int, corpus: Path, tokenizer: Path, mapping: Path, kept: int
):
    config = {
        "teacher": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        vocab_size=VOCAB, max_seq_len=32, init="random", normalization="RMSNorm",
                        activation="swiglu", position_embedding="rope", tie_embeddings=False,
                        add_bias_linear=False),
        "student": dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=kept,
                        max_seq_len=32, tie_embeddings=False),
        "methods": [{"name": "glmd", "weight": 1.0, "temperature": 1.0},
                    {"name": "lm", "weight": 0.5}],
        "parallel": {"tp": tp, "pp": pp, "dp": 1},
        "data": {"train_files": [str(corpus)], "tokenizer": str(tokenizer), "seq_length": 16,
                 "vocab_mapping": str(mapping), "cache_dir": str(tmp / "cache")},
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "lr": 5e-3,
                  "min_lr": 5e-4, "warmup_steps": 1, "log_every": 1, "seed": 3},
        "output": {"dir": str(tmp / name), "save_every": 1000, "keep_last": 1},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-9)


def test_compressed_student_tp2_equals_tp1(tmp_path):
    from gkd_cli.data import train_bpe
    from gkd_cli.vocab import compress_vocab

    corpus = tmp_path / "corpus.txt"
    text = (REPO / "gkd_cli" / "assets" / "demo_corpus.txt").read_text(encoding="utf-8")
    corpus.write_text(text[:60_000], encoding="utf-8")
    tokenizer = tmp_path / "tokenizer.json"
    train_bpe([corpus], VOCAB, tokenizer)
    result = compress_vocab(
        tokenizer, [corpus], 256, None, tmp_path / "vocab", tp=2, map_to_unk=True,
        selection="global", num_workers=0,
    )  # fmt: skip
    mapping = result.mapping
    assert mapping.compressed_vocab_size > mapping.num_kept  # padding slots on both shards
    width = mapping.compressed_vocab_size // 2
    assert (mapping.comp_to_orig[width - 1] < 0) and (mapping.comp_to_orig[-1] < 0)

    runs, logs = {}, {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        name = f"tp{tp}pp{pp}"
        config = _config(tmp_path, name, tp, pp, corpus, tokenizer, result.mapping_path,
                         mapping.compressed_vocab_size)  # fmt: skip
        env = {"GKD_FUSED_HEAD": "off"} if tp * pp == 1 else {}
        proc = torchrun(REPO / "gkd_cli" / "worker.py", tp * pp, "--config", str(config), env=env)
        logs[name] = proc.stdout + proc.stderr
        runs[name] = _records(tmp_path / name)
    assert "logit losses: materialized path" in logs["tp1pp1"], logs["tp1pp1"][-2000:]
    for name in ("tp2pp1", "tp1pp2"):
        assert "logit losses: fused path" in logs[name], logs[name][-2000:]
        assert [r["step"] for r in runs["tp1pp1"]] == [r["step"] for r in runs[name]] == [1, 2, 3]
        for one, two in zip(runs["tp1pp1"], runs[name], strict=True):
            assert set(one["terms"]) == set(two["terms"]) == {"glmd/kl", "lm/ce"}
            assert _close(one["loss"], two["loss"]), (name, one["step"], one["loss"], two["loss"])
            for term, value in one["terms"].items():
                got = two["terms"][term]
                assert _close(value, got), (name, one["step"], term, value, got)
    reference = runs["tp1pp1"]
    assert reference[0]["loss"] != reference[-1]["loss"]  # the student trained
    # lm/ce is over the V' compressed classes (padding masked): an untrained student is near
    # log(kept), far from log(V') or log(V).
    assert abs(reference[0]["terms"]["lm/ce"] - math.log(mapping.num_kept)) < 0.5
