"""`gkd plan`'s CPU estimate against the memory a real `gkd distill` run allocates.

Measured: bytes allocated by malloc (glibc mallinfo2: in-use arena bytes plus mmap-ed blocks)
at the end of each microbatch's forward, minus the bytes allocated before any model was built;
the last step's value (Adam states exist by then). The resident set size is not used: the
allocator keeps freed memory, so RSS drifts to about twice the live bytes on these runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gkd_cli.config import load_config
from gkd_cli.plan import _estimate_stage
from parallel.memory import allocated_bytes

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(allocated_bytes() is None, reason="needs glibc mallinfo2"),
]

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "gkd_cli" / "assets"
TOLERANCE = 0.20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from gkd_cli.data import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([ASSETS / "demo_valid.txt"], 1024, path)
    return path


@pytest.mark.parametrize(
    "parallel,micro",
    [({"tp": 2, "pp": 1, "dp": 1}, 4), ({"tp": 1, "pp": 2, "dp": 1}, 2)],
    ids=["tp2-mbs4", "pp2-mbs2"],
)
def test_estimate_within_20_percent_of_measured(tmp_path, tokenizer, parallel, micro):
    config = {
        "teacher": dict(
            num_layers=4,
            hidden_size=512,
            num_attention_heads=8,
            vocab_size=1024,
            max_seq_len=128,
            init="random",
        ),
        "student": dict(
            num_layers=4, hidden_size=384, num_attention_heads=6, vocab_size=1024, max_seq_len=128
        ),
        "methods": [{"name": "glmd", "temperature": 2.0}, {"name": "lm", "weight": 0.1}],
        "parallel": parallel,
        "data": {
            "train_files": [str(ASSETS / "demo_valid.txt")],
            "tokenizer": str(tokenizer),
            "seq_length": 128,
        },
        "train": {
            "steps": 3,
            "global_batch_size": 8,
            "micro_batch_size": micro,
            "lr": 1e-3,
            "min_lr": 1e-4,
        },
        "output": {"dir": str(tmp_path / "run"), "save_every": 0},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", "distill", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    last = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ][-1]
    measured = last["peak_allocated_bytes"] - last["baseline_allocated_bytes"]
    # metrics come from global rank 0, which holds pipeline stage 0.
    estimated = _estimate_stage(load_config(path, check_paths=False), "cpu", 0, False).total_bytes
    assert abs(estimated - measured) <= TOLERANCE * measured, (estimated / 2**20, measured / 2**20)
