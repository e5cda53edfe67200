"""The real `gkd distill` with every metric sink and validation during training, resumed to train
longer, then `gkd report` on its metrics (issue 19). One worker, tiny random models.

Read back with independent readers: TensorBoard's EventAccumulator (and its hparams plugin
protobuf), W&B's `.wandb` files parsed from the LevelDB-log format (tests/unit/test_loop_sinks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.test_loop_sinks import scalar_events, wandb_history

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "gkd_cli" / "assets"


def _gkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        timeout=600,
    )


def test_sinks_validation_resume_and_report_on_a_real_run(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    from gkd_cli.data import train_bpe

    tokenizer = tmp_path / "tokenizer.json"
    train_bpe([ASSETS / "demo_valid.txt"], 512, tokenizer)
    model = dict(
        num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=512, max_seq_len=64
    )
    out = tmp_path / "run"
    cfg = {
        "teacher": {**model, "init": "random"},
        "student": model,
        "methods": [{"name": "glmd", "weight": 1.0}, {"name": "lm", "weight": 0.5}],
        "data": {
            "train_files": [str(ASSETS / "demo_corpus.txt")],
            "valid_files": [str(ASSETS / "demo_valid.txt")],
            "tokenizer": str(tokenizer),
            "seq_length": 32,
        },
        "train": {
            "steps": 6,
            "global_batch_size": 2,
            "micro_batch_size": 1,
            "lr": 3e-3,
            "eval_every": 3,
            "eval_batches": 2,
            "best_metric": "valid/student_ppl",
        },
        "output": {"dir": str(out), "save_every": 0, "log_to": ["jsonl", "tensorboard", "wandb"]},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))

    first = _gkd("distill", str(path))
    assert first.returncode == 0, first.stdout + first.stderr
    # the plain progress lines (what a Slurm output file gets) carry the validation results
    valid_lines = [line for line in first.stdout.splitlines() if "| valid loss" in line]
    assert [line.split()[1] for line in valid_lines] == ["3/6", "6/6"]
    cache = out / "valid_teacher.json"
    cached_at = cache.stat().st_mtime_ns

    second = _gkd("distill", str(path), "train.steps=8")  # resumes from step 6, trains longer
    assert second.returncode == 0, second.stdout + second.stderr
    assert cache.stat().st_mtime_ns == cached_at  # the teacher was not validated again
    log = (out / "logs" / "attempt_2" / "rank0.stderr.log").read_text()
    assert "teacher validation from" in log

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    valid = {r["step"]: r["valid"] for r in records if "valid" in r}
    assert sorted(valid) == [3, 6, 8]
    teacher = {v["teacher_ppl"] for v in valid.values()}
    assert len(teacher) == 1  # computed once, the same value logged at every validation
    assert json.loads((out / "eval.json").read_text())["student_ppl"] == valid[8]["student_ppl"]
    # best checkpoint: the step of the lowest validation perplexity, and it exists
    best_step = min(valid, key=lambda s: valid[s]["student_ppl"])
    best = (out / "checkpoints" / "best").read_text().strip()
    assert best == f"step_{best_step:07d}"
    assert (out / "checkpoints" / best / "manifest.json").is_file()

    # TensorBoard: each step once over both attempts, values as in metrics.jsonl, hparams
    events = scalar_events(out)
    for tag in ("loss/total", "loss/glmd/kl", "loss/lm/ce", "train/lr", "train/grad_norm"):
        assert [s for s, _ in events[tag]] == list(range(1, 9)), tag
    kl = dict(events["loss/glmd/kl"])
    for r in records:
        assert kl[r["step"]] == pytest.approx(r["terms"]["glmd/kl"], rel=1e-6)
    assert [s for s, _ in events["valid/student_ppl"]] == [3, 6, 8]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    hparams = start.session_start_info.hparams
    assert hparams["train.eval_every"].number_value == 3
    assert hparams["methods.0.name"].string_value == "glmd"
    assert hparams["methods.1.weight"].number_value == 0.5

    # W&B offline: one run id, two attempt folders, every step once
    state = json.loads((out / "wandb" / "gkd_wandb.json").read_text())
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(state["run_id"]) for f in folders)
    rows = wandb_history(out)
    assert sorted(row["_step"] for row in rows) == list(range(1, 9))
    by_step = {row["_step"]: row for row in rows}
    assert by_step[8]["valid/student_ppl"] == pytest.approx(valid[8]["student_ppl"])
    assert by_step[2]["loss/lm/ce"] == pytest.approx(records[1]["terms"]["lm/ce"])

    # gkd report on the real metrics
    report = _gkd("report", str(out), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stdout + report.stderr
    png = (tmp_path / "report" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<svg" in page  # self-contained: nothing fetched
    assert not any(x in page for x in ("<script", "<link", '<img src="http', "url(http"))
    for text in ("loss term glmd/kl", "loss term lm/ce", "learning rate", "grad norm"):
        assert text in page, text
    assert "validation perplexity" in page and "tokens/s" in page
    assert "glmd/kl" in report.stdout and "best valid ppl" in report.stdout
