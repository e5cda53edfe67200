"""The GLMD recipe (gkd_cli/configs/glmd/, README "GLMD recipe") run in order on tiny models and
the real SuperGLUE COPA data: task-agnostic distillation -> teacher fine-tuned on the task ->
task-stage word-prediction distillation without labels -> GLMD's third step -> `gkd eval
superglue`; with vocabulary compression the same chain after `gkd compress-vocab`. Every config is
the shipped one with only sizes, paths and steps changed. Skipped without ../shared/data (or
GKD_SUPERGLUE_DIR) and unless GKD_RECIPE_E2E=1: nine CLI runs cost ~160 CPU-s on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "gkd_cli" / "configs" / "glmd"
SUPERGLUE = Path(os.environ.get("GKD_SUPERGLUE_DIR", REPO.parent / "shared" / "data" / "superglue"))
TEACHER = dict(num_layers=2, hidden_size=32, num_attention_heads=2, max_seq_len=128)
STUDENT = dict(num_layers=1, hidden_size=32, num_attention_heads=2, max_seq_len=128)


def _gkd(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", *args],
        capture_output=True, text=True, cwd=REPO, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _step(tmp: Path, name: str, out: str, change) -> Path:
    """Run recipe config ``name`` with ``change(cfg)`` applied; the run directory."""
    cfg = yaml.safe_load((RECIPE / name).read_text())
    cfg["output"] = {"dir": str(tmp / out), "save_every": 0}
    cfg["train"].update(steps=2, global_batch_size=2, micro_batch_size=1, warmup_steps=0)
    cfg["data"].update(seq_length=128, cache_dir=str(tmp / "cache" / out))
    if cfg["data"]["source"] == "superglue":
        cfg["data"]["superglue_dir"] = str(SUPERGLUE)
    change(cfg)
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _gkd("distill", str(path))
    return tmp / out


@pytest.mark.skipif(not SUPERGLUE.is_dir(), reason=f"SuperGLUE data not found at {SUPERGLUE}")
@pytest.mark.skipif(
    not os.environ.get("GKD_RECIPE_E2E"),
    reason="the whole GLMD chain is 9 CLI runs (~160 CPU-s): set GKD_RECIPE_E2E=1 to run it",
)
def test_glmd_recipe_runs_in_order_with_and_without_vocabulary_compression(tmp_path):
    from gkd_cli.data import train_bpe

    tokenizer = tmp_path / "tokenizer.json"
    corpus = REPO / "gkd_cli" / "assets" / "demo_valid.txt"
    train_bpe([corpus], 512, tokenizer)
    vocab = dict(vocab_size=512)

    def common(cfg, student=STUDENT):
        cfg["data"]["tokenizer"] = str(tokenizer)
        cfg["student"] = {**cfg["student"], **student, **vocab}
        if "teacher" in cfg:
            cfg["teacher"] = {**cfg["teacher"], **TEACHER, **vocab}

    def pretrain(cfg):  # (a) a random tiny teacher stands in for the pre-trained one
        common(cfg)
        cfg["teacher"].update(checkpoint=None, init="random")
        cfg["data"]["train_files"] = [str(corpus)]

    a = _step(tmp_path, "1_pretrain.yaml", "pretrain", pretrain)

    def teacher_task(cfg):  # (b) the teacher fine-tuned on COPA with labels (lm on options)
        common(cfg, TEACHER)
        cfg["student"].update(checkpoint=None)

    b = _step(tmp_path, "2_teacher_task.yaml", "teacher", teacher_task)
    (records,) = (tmp_path / "cache" / "teacher").glob("superglue-train-padded-choices-*.jsonl")
    labels = [json.loads(x)["label"] for x in records.read_text().splitlines()]
    from gkd_cli.superglue import get_task, read_task

    gold = [get_task("COPA").prompt(x).gold for x in read_task(SUPERGLUE, "COPA", "train")]
    assert labels == gold  # the teacher's run has the labels

    def task(student_ckpt):
        def change(cfg):
            common(cfg)
            cfg["teacher"]["checkpoint"] = str(b / "checkpoints")
            cfg["student"]["checkpoint"] = str(student_ckpt / "checkpoints")

        return change

    c = _step(tmp_path, "3_task_glmd.yaml", "task", task(a))
    (records,) = (tmp_path / "cache" / "task").glob("superglue-train-padded-choices-*.jsonl")
    assert {json.loads(x)["label"] for x in records.read_text().splitlines()} == {None}
    metrics = [json.loads(x) for x in (c / "metrics.jsonl").read_text().splitlines()]
    assert "glmd/kl" in metrics[0]["terms"]
    d = _step(tmp_path, "4_task_soft.yaml", "task-soft", task(c))
    metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert "glmd_soft/soft" in metrics[0]["terms"]
    out = tmp_path / "copa.json"
    _gkd("eval", "superglue", str(d), "--tasks", "copa", "--data", str(SUPERGLUE),
         "--limit", "8", "--out", str(out))  # fmt: skip
    assert "COPA" in json.loads(out.read_text())["tasks"]

    # with vocabulary compression: the student's vocabulary from the corpus, both stages
    vc = tmp_path / "vc"
    _gkd("compress-vocab", "--tokenizer", str(tokenizer), "--corpus", str(corpus),
         "--keep", "256", "--selection", "global", "--similarity", "dot",
         "--teacher", str(b), "--out", str(vc))  # fmt: skip
    mapping = str(vc / "vocab_mapping.safetensors")
    kept = json.loads((vc / "vocab_report.json").read_text())["compressed_vocab_size"]
    assert kept == 256

    def compressed(change):
        def wrapped(cfg):
            change(cfg)
            cfg["data"]["vocab_mapping"] = mapping
            cfg["student"]["vocab_size"] = kept

        return wrapped

    a_vc = _step(tmp_path, "1_pretrain.yaml", "pretrain-vc", compressed(pretrain))
    c_vc = _step(tmp_path, "3_task_glmd.yaml", "task-vc", compressed(task(a_vc)))
    out = tmp_path / "copa-vc.json"
    _gkd("eval", "superglue", str(c_vc), "--tasks", "copa", "--data", str(SUPERGLUE),
         "--limit", "8", "--tokenizer", str(vc / "tokenizer"), "--out", str(out))  # fmt: skip
    assert "COPA" in json.loads(out.read_text())["tasks"]
