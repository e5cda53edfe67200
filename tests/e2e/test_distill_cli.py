"""The real `gkd distill` on tiny models at TP=2 x PP=2 on CPU: metrics, checkpoints, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "gkd_cli" / "assets"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from gkd_cli.data import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([ASSETS / "demo_corpus.txt"], 1024, path)
    return path


TEACHER = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=1024,
    max_seq_len=64,
    normalization="RMSNorm",
    activation="swiglu",
    position_embedding="rope",
    tie_embeddings=False,
    add_bias_linear=False,
)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer) -> Path:
    """A Llama-style teacher pre-trained by gkd itself (no teacher section: lm only) at TP=2."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = {
        "student": TEACHER,
        "methods": [{"name": "lm"}],
        "parallel": {"tp": 2, "pp": 1, "dp": 1},
        "data": {
            "train_files": [str(ASSETS / "demo_corpus.txt")],
            "tokenizer": str(tokenizer),
            "seq_length": 32,
        },
        "train": {
            "steps": 40,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "lr": 5e-3,
            "min_lr": 5e-4,
            "warmup_steps": 2,
        },
        "output": {"dir": str(out / "run"), "save_every": 0},
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = _gkd("distill", str(out / "cfg.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "run"


def _config(tmp_path: Path, tokenizer: Path, teacher: Path, **train) -> Path:
    cfg = {
        "teacher": {**TEACHER, "checkpoint": str(teacher)},
        "student": dict(
            num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=1024, max_seq_len=64
        ),
        "methods": [
            {"name": "glmd", "weight": 1.0, "temperature": 2.0},
            {"name": "lm", "weight": 0.1},
        ],
        "parallel": {"tp": 2, "pp": 2, "dp": 1},
        "data": {
            "train_files": [str(ASSETS / "demo_corpus.txt")],
            "valid_files": [str(ASSETS / "demo_valid.txt")],
            "tokenizer": str(tokenizer),
            "seq_length": 32,
        },
        "train": {
            "steps": 24,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            **train,
        },
        "output": {"dir": str(tmp_path / "run"), "save_every": 12, "keep_last": 2},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _gkd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )


def test_distill_tp2pp2_writes_metrics_checkpoints_and_resumes(tmp_path, tokenizer, teacher):
    """glmd + lm through the runtime at TP=2 x PP=2 on real text, from a teacher saved at TP=2 x
    PP=1: both terms logged, both fall over a couple of dozen steps, checkpoints are written, a
    rerun continues."""
    config = _config(tmp_path, tokenizer, teacher)
    first = _gkd("distill", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 25))
    for record in lines:
        assert set(record["terms"]) == {"glmd/kl", "lm/ce"}
        assert record["loss"] > 0 and record["tokens_per_s"] > 0 and record["peak_mem_bytes"] > 0

    def mean(rows, key):
        return sum(key(r) for r in rows) / len(rows)

    for key in (
        lambda r: r["loss"],
        lambda r: r["terms"]["glmd/kl"],
        lambda r: r["terms"]["lm/ce"],
    ):
        early, late = mean(lines[:4], key), mean(lines[-4:], key)
        assert late < 0.95 * early, (early, late)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000024"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000012", "step_0000024"]
    meta = json.loads((ckpts / "step_0000024" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 2, "pp": 2, "dp": 1} and meta["step"] == 24
    assert (run / "config.yaml").exists() and (ckpts / "step_0000024" / "manifest.json").exists()
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["student_ppl"] > 1 and evaluation["teacher_ppl"] > 1

    # The same config with more steps continues from step 24 instead of starting over.
    second = _gkd("distill", str(config), "train.steps=26")
    assert second.returncode == 0, second.stdout + second.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 27))
    assert (ckpts / "latest").read_text() == "step_0000026"


def test_distill_refuses_bad_config_before_launch(tmp_path, tokenizer, teacher):
    config = _config(tmp_path, tokenizer, teacher)
    result = _gkd("distill", str(config), "parallel.tp=3")
    assert result.returncode == 2
    assert "num_attention_heads=4 is not divisible by parallel.tp=3" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cache_teacher_then_distill_from_the_cache(tmp_path, tokenizer, teacher):
    """gkd cache-teacher at PP=2 (k = V at the methods' temperature), a rerun at PP=1 resumes
    (writes nothing new), another spec is refused before launch, and gkd distill reads the cache at DP=2
    with a cache-only teacher section."""
    small = tmp_path / "small.txt"  # ~40 windows of 32 tokens: the cache covers a whole epoch
    small.write_text((ASSETS / "demo_corpus.txt").read_text()[:5000])
    config = _config(tmp_path, tokenizer, teacher)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["train_files"] = [str(small)]
    config.write_text(yaml.safe_dump(cfg))
    cache = tmp_path / "cache"
    args = ("cache-teacher", str(config), "--out", str(cache), "--k", "1024")
    layout = ("parallel.tp=1", "parallel.pp=2")
    first = _gkd(*args, *layout)
    assert first.returncode == 0, first.stdout + first.stderr
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["spec"]["kind"] == "topk" and meta["spec"]["k"] == 1024
    assert meta["spec"]["temperature"] == 2.0  # glmd's
    shard = cache / "shard-00000.bin"
    size = shard.stat().st_size
    again = _gkd(*args, "parallel.tp=1", "parallel.pp=1")  # resumes (one rank): nothing left
    assert again.returncode == 0, again.stdout + again.stderr
    assert shard.stat().st_size == size
    assert json.loads((cache / "meta.json").read_text())["samples"] == meta["samples"]
    other = _gkd("cache-teacher", str(config), "--out", str(cache), "--k", "16", *layout)
    assert other.returncode == 2 and "another spec (k)" in other.stderr

    cfg = yaml.safe_load(config.read_text())
    cfg["teacher"] = {"cache": str(cache)}
    cfg["methods"] = [{"name": "forward_kl", "temperature": 2.0}, {"name": "lm", "weight": 0.1}]
    cfg["parallel"] = {"tp": 1, "pp": 1, "dp": 2}
    cfg["train"].update(steps=3)
    cfg["output"] = {"dir": str(tmp_path / "from_cache"), "save_every": 0}
    path = tmp_path / "from_cache.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = _gkd("distill", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [
        json.loads(line)
        for line in (tmp_path / "from_cache/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["terms"]["forward_kl/kl"] > 0 for r in lines)
