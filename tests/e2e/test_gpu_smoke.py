"""GPU smoke test: the real `gkd distill` on CUDA (NCCL, bf16) for a few steps. Skipped without a
GPU (CPU runs cover the same code with gloo and fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.gpu]

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "gkd_cli" / "assets"


def test_distill_on_gpu_bf16(tmp_path):
    from gkd_cli.data import train_bpe

    tokenizer = tmp_path / "tokenizer.json"
    train_bpe([ASSETS / "demo_valid.txt"], 1024, tokenizer)
    nproc = min(torch.cuda.device_count(), 2)
    cfg = {
        "teacher": dict(
            num_layers=4,
            hidden_size=256,
            num_attention_heads=4,
            vocab_size=1024,
            max_seq_len=128,
            init="random",
            normalization="RMSNorm",
            activation="swiglu",
            position_embedding="rope",
            tie_embeddings=False,
            add_bias_linear=False,
        ),
        "student": dict(
            num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=1024, max_seq_len=128
        ),
        "methods": [{"name": "glmd", "temperature": 2.0}, {"name": "lm", "weight": 0.1}],
        "parallel": {"tp": nproc, "pp": 1, "dp": 1},
        "data": {
            "train_files": [str(ASSETS / "demo_valid.txt")],
            "tokenizer": str(tokenizer),
            "seq_length": 128,
        },
        "train": {"steps": 4, "global_batch_size": 8, "micro_batch_size": 2, "precision": "bf16"},
        "output": {"dir": str(tmp_path / "run"), "save_every": 2},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", "distill", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(r["loss"] == r["loss"] for r in lines)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert meta["precision"] == "bf16"
