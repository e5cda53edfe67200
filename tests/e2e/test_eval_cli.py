"""The real ``gkd eval superglue`` on a tiny random checkpoint and the real SuperGLUE data
(``../shared/data/superglue``; skipped without it): all eight tasks at TP=2 through torchrun,
the results file, the table, ``--compare``, and a bad input as one red line.

Runs ``gkd eval`` through ``gkd_cli.app`` once the app mounts the eval sub-app, through
``python -m gkd_cli.eval`` until then (the same Typer command).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist.test_eval_scoring import make_checkpoint, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SUPERGLUE = REPO.parent / "shared" / "data" / "superglue"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not SUPERGLUE.is_dir(), reason=f"needs the SuperGLUE data at {SUPERGLUE}"),
]

ARCH = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300, max_seq_len=96)


def _eval_command() -> list[str]:
    from gkd_cli.app import app

    mounted = any(group.name == "eval" for group in app.registered_groups)
    return ["-m", "gkd_cli.app", "eval"] if mounted else ["-m", "gkd_cli.eval"]


def gkd_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "160"}
    env.pop("GKD_SUPERGLUE_DIR", None)
    return subprocess.run(
        [sys.executable, *_eval_command(), "superglue", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-e2e")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    return make_checkpoint(root / "student", ARCH, tokenizer=tokenizer)


def test_eval_all_tasks_at_tp2_writes_results_and_compares(checkpoint, tmp_path):
    out = tmp_path / "student.json"
    start = time.perf_counter()
    result = gkd_eval(
        str(checkpoint),
        "--data",
        str(SUPERGLUE),
        "--tasks",
        "all",
        "--limit",
        "3",
        "--tp",
        "2",
        "--out",
        str(out),
        "--predictions",
        cwd=tmp_path,
    )
    print(f"gkd eval superglue, 8 tasks x 3 examples, tp=2: {time.perf_counter() - start:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(out.read_text())
    tasks = document["tasks"]
    assert list(tasks) == ["BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC"]
    for name, entry in tasks.items():
        # --limit 3 keeps MultiRC's first 3 questions whole: 4 + 5 + 4 answer options.
        expected = 13 if name == "MultiRC" else 3
        assert entry["n"] == expected, name
        assert entry["metrics"] and all(0.0 <= v <= 100.0 for v in entry["metrics"].values()), name
        assert len(entry["predictions"]) == expected and entry["predictions"][0]["prompt"]
        for prediction in entry["predictions"]:
            assert all(lp < 0 for lp in prediction["logprobs"])  # real log-probabilities
    assert document["model"] == "student" and document["average"] is not None
    assert f"SuperGLUE average: {document['average']:.1f}" in result.stdout
    assert "ReCoRD" in result.stdout and (tmp_path / "student.logs" / "rank1.stderr.log").is_file()

    # --compare: the same results against a copy whose CB accuracy is 10 points higher.
    other = json.loads(out.read_text())
    other["model"] = "teacher"
    other["tasks"]["CB"]["metrics"]["acc"] += 10.0
    (tmp_path / "teacher.json").write_text(json.dumps(other))
    compared = gkd_eval("--compare", str(out), str(tmp_path / "teacher.json"), cwd=tmp_path)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    cb_acc = next(line for line in compared.stdout.splitlines() if "CB" in line and "acc" in line)
    assert "+10.0" in cb_acc
    boolq = next(line for line in compared.stdout.splitlines() if "BoolQ" in line)
    assert "+0.0" in boolq


def test_missing_checkpoint_is_one_red_line(tmp_path):
    result = gkd_eval(str(tmp_path / "nope"), "--data", str(SUPERGLUE), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'nope'} does not exist"
    ]
