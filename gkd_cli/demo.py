"""``gkd demo``: the whole pipeline on CPU in a few minutes, on real text shipped with gkd.

1. Train a byte-level BPE tokenizer on the shipped corpus (SuperGLUE passages, see
   ``gkd_cli/assets/README.md``).
2. Pre-train a small GPT-2-style teacher with gkd itself (``methods: [lm]``, no teacher), TP=2.
3. Distill it into a smaller student with TP=2 (GLMD's word-prediction KL plus a little LM loss).
4. Train a student of the same size from scratch for the same steps (``lm`` only), TP=2.
5. Print validation perplexity of the three side by side.

Steps 1-2 are cached in the work directory (a rerun reuses the teacher); every run goes through
the same launcher as ``gkd distill``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(kw_only=True)
class DemoSettings:
    workdir: Path
    teacher_steps: int = 300
    student_steps: int = 200
    tp: int = 2
    vocab_size: int = 2048
    seq_length: int = 64
    global_batch_size: int = 32
    micro_batch_size: int = 8
    teacher_lr: float = 3e-3
    student_lr: float = 5e-3
    temperature: float = 1.0
    teacher_width: int = 256
    student_width: int = 128

    def teacher(self) -> dict:
        return dict(
            num_layers=4,
            hidden_size=self.teacher_width,
            num_attention_heads=4,
            vocab_size=self.vocab_size,
            max_seq_len=self.seq_length,
        )

    def student(self) -> dict:
        return dict(
            num_layers=2,
            hidden_size=self.student_width,
            num_attention_heads=4,
            vocab_size=self.vocab_size,
            max_seq_len=self.seq_length,
        )


def _data(settings: DemoSettings, tokenizer: Path) -> dict:
    return {
        "train_files": [str(ASSETS / "demo_corpus.txt")],
        "valid_files": [str(ASSETS / "demo_valid.txt")],
        "tokenizer": str(tokenizer),
        "seq_length": settings.seq_length,
        "cache_dir": str(settings.workdir / "cache"),
    }


def _train(settings: DemoSettings, steps: int, lr: float) -> dict:
    return {
        "steps": steps,
        "global_batch_size": settings.global_batch_size,
        "micro_batch_size": settings.micro_batch_size,
        "lr": lr,
        "min_lr": lr / 10,
        "warmup_steps": max(1, steps // 20),
        "weight_decay": 0.01,
        "seed": 1234,
    }


def configs(settings: DemoSettings, tokenizer: Path) -> dict[str, dict]:
    """The three run configs: ``teacher``, ``distill`` and ``scratch``."""
    work = settings.workdir
    common = {"parallel": {"tp": settings.tp, "pp": 1, "dp": 1}, "data": _data(settings, tokenizer)}
    teacher_ckpt = work / "teacher" / "checkpoints"
    return {
        "teacher": {
            **common,
            "student": settings.teacher(),
            "methods": [{"name": "lm", "weight": 1.0}],
            "train": _train(settings, settings.teacher_steps, settings.teacher_lr),
            "output": {
                "dir": str(work / "teacher"),
                "save_every": settings.teacher_steps,
                "keep_last": 1,
            },
        },
        "distill": {
            **common,
            "teacher": {**settings.teacher(), "checkpoint": str(teacher_ckpt)},
            "student": settings.student(),
            "methods": [
                {"name": "glmd", "weight": 1.0, "temperature": settings.temperature},
                {"name": "lm", "weight": 0.5},
            ],
            "train": _train(settings, settings.student_steps, settings.student_lr),
            "output": {
                "dir": str(work / "distill"),
                "save_every": settings.student_steps,
                "keep_last": 1,
            },
        },
        "scratch": {
            **common,
            "student": settings.student(),
            "methods": [{"name": "lm", "weight": 1.0}],
            "train": _train(settings, settings.student_steps, settings.student_lr),
            "output": {
                "dir": str(work / "scratch"),
                "save_every": settings.student_steps,
                "keep_last": 1,
            },
        },
    }


def ensure_tokenizer(workdir: Path, vocab_size: int) -> Path:
    from gkd_cli.data import train_bpe

    path = workdir / f"tokenizer-{vocab_size}.json"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        train_bpe([ASSETS / "demo_corpus.txt"], vocab_size, path)
    return path


def read_eval(run_dir: Path) -> dict | None:
    path = run_dir / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
