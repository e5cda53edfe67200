"""The real `gkd distill` with example-aware batches: documents in ``data.mode: packed`` train
and evaluate, an overlong one truncated (``data.overlong: truncate``; refusing it is
tests/unit/test_data_batching.py's and the builder's tests')."""

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


def _gkd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip


STUDENT = dict(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=300, max_seq_len=64)


def _tokenizer(tmp_path: Path) -> Path:
    """A 300-token BPE trained on the shipped validation text."""
    from gkd_cli.data import train_bpe

    path = tmp_path / "tokenizer.json"
    train_bpe([ASSETS / "demo_valid.txt"], 300, path)
    return path


def test_packed_run_with_an_overlong_example_truncated(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    words = (ASSETS / "demo_valid.txt").read_text().split()
    paragraphs = [" ".join(words[i * 7 : i * 7 + 3 + i % 5]) for i in range(24)]
    paragraphs[5] = " ".join(words[:80])  # far longer than seq_length
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(paragraphs) + "\n")
    student = dict(STUDENT)
    cfg = {
        "student": student,
        "methods": [{"name": "lm"}],
        "data": {
            "train_files": [str(data)], "valid_files": [str(data)], "tokenizer": str(tokenizer),
            "seq_length": 32, "mode": "packed", "overlong": "truncate",
        },
        "train": {"steps": 3, "global_batch_size": 2, "micro_batch_size": 1, "lr": 1e-3, "warmup_steps": 1},
        "output": {"dir": str(tmp_path / "run"), "save_every": 0},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = _gkd("distill", str(tmp_path / "cfg.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(0 < m["loss"] < 20 for m in metrics)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["student_loss"] > 0


def test_prompt_completion_jsonl_trains_in_padded_mode_through_the_cli(tmp_path):
    """A teacher-free run on prompt/completion lines (loss on the completions only): the launch
    checks accept the records (their first line decides the kind) and the run trains."""
    tokenizer = _tokenizer(tmp_path)
    words = (ASSETS / "demo_valid.txt").read_text().split()
    lines = [
        json.dumps({"prompt": " ".join(words[i : i + 3]) + "\nAnswer:", "completion": " yes" if i % 2 else " no"})
        for i in range(0, 240, 10)
    ]  # fmt: skip
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(lines) + "\n")
    student = dict(STUDENT)
    cfg = {
        "student": student,
        "methods": [{"name": "lm"}],
        "data": {
            "train_files": [str(data)], "tokenizer": str(tokenizer), "format": "jsonl",
            "seq_length": 48, "mode": "padded",
        },
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
        "output": {"dir": str(tmp_path / "run"), "save_every": 0},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = _gkd("distill", str(tmp_path / "cfg.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # the loss is over " yes"/" no" and the end token only: far below a full-vocabulary guess
    assert all(0 < m["loss"] < 20 for m in metrics)


def test_an_overlong_example_is_refused_before_launch(tmp_path):
    """``data.overlong: refuse`` (the default) in padded mode: the launch checks tokenize a small
    corpus and name the file and line of the example that does not fit; nothing is written."""
    tokenizer = _tokenizer(tmp_path)
    words = (ASSETS / "demo_valid.txt").read_text().split()
    lines = [json.dumps({"prompt": "Q:", "completion": " yes"}) for _ in range(3)]
    lines.append(json.dumps({"prompt": " ".join(words[:60]), "completion": " no"}))
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = {
        "student": dict(STUDENT),
        "methods": [{"name": "lm"}],
        "data": {"train_files": [str(data)], "tokenizer": str(tokenizer), "format": "jsonl",
                 "seq_length": 32, "mode": "padded"},
        "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1},
        "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = _gkd("distill", str(tmp_path / "cfg.yaml"))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    text = " ".join((result.stdout + result.stderr).split())
    assert f"{data}:4" in text and "more than the limit of 32" in text, text
    assert "data.overlong: truncate" in text
    assert not (tmp_path / "run").exists()
