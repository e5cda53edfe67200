"""GLMD's task-specific stage from config: `data.source: superglue` turns task examples into
prompt-formatted training text for the real `gkd distill` (skipped without ../shared)."""

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
SUPERGLUE = REPO.parent / "shared" / "data" / "superglue"


@pytest.mark.skipif(not SUPERGLUE.is_dir(), reason=f"SuperGLUE data not found at {SUPERGLUE}")
def test_task_stage_runs_on_superglue_examples(tmp_path):
    from gkd_cli.data import train_bpe

    tokenizer = tmp_path / "tokenizer.json"
    train_bpe([REPO / "gkd_cli" / "assets" / "demo_valid.txt"], 512, tokenizer)
    model = dict(
        num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=512, max_seq_len=64
    )
    cfg = {
        "teacher": {**model, "num_layers": 4, "init": "random"},
        "student": model,
        "methods": [{"name": "glmd"}],
        "data": {
            "source": "superglue",
            "superglue_dir": str(SUPERGLUE),
            "superglue_tasks": ["CB", "COPA"],
            "superglue_split": "train",
            "tokenizer": str(tokenizer),
            "seq_length": 64,
        },
        "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1, "stage": "task"},
        "output": {"dir": str(tmp_path / "run"), "save_every": 0},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", "distill", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    texts = list((tmp_path / "run" / "cache").glob("superglue-train-stream-CB-COPA.jsonl"))
    assert texts, "the task texts were not written"
    lines = [json.loads(x)["text"] for x in texts[0].read_text().splitlines()]
    assert len(lines) == 64  # 32 CB + 32 COPA training examples, prompt-formatted
    assert any("True, False, or Neither?" in t or "Question:" in t for t in lines)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and "glmd/kl" in metrics[0]["terms"]


@pytest.mark.skipif(not SUPERGLUE.is_dir(), reason=f"SuperGLUE data not found at {SUPERGLUE}")
def test_teacher_fine_tuning_on_a_task_trains_on_the_answers_only(tmp_path):
    """``data.mode: padded`` with labeled task data: each example is the evaluation prompt and
    its gold answer as a prompt/completion record, so a teacher-free ``lm`` run fine-tunes on the
    answers alone (GLMKD distills from teachers fine-tuned per task)."""
    from gkd_cli.data import train_bpe
    from gkd_cli.superglue import get_task, read_task

    tokenizer = tmp_path / "tokenizer.json"
    train_bpe([REPO / "gkd_cli" / "assets" / "demo_valid.txt"], 512, tokenizer)
    model = dict(
        num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=512, max_seq_len=512
    )
    cfg = {
        "student": model,
        "methods": [{"name": "lm"}],
        "data": {
            "source": "superglue", "superglue_dir": str(SUPERGLUE), "superglue_tasks": ["COPA"],
            "superglue_split": "train", "tokenizer": str(tokenizer), "seq_length": 128,
            "mode": "padded",
        },
        "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1, "stage": "task"},
        "output": {"dir": str(tmp_path / "run"), "save_every": 0},
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", "distill", str(path)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (data,) = (tmp_path / "run" / "cache").glob("superglue-train-padded-COPA.jsonl")
    records = [json.loads(x) for x in data.read_text().splitlines()]
    spec = get_task("COPA")
    examples = list(read_task(SUPERGLUE, "COPA", "train"))
    assert len(records) == len(examples) == 32
    for record, example in zip(records, examples, strict=True):
        prompt = spec.prompt(example)  # the evaluation prompt, independent of the writer
        assert record == {"prompt": prompt.context, "completion": prompt.options[prompt.gold]}
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and "lm/ce" in metrics[0]["terms"]
