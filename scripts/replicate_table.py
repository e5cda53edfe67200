"""The results table of scripts/replicate_glmd.sh (README "Replication: GLMD vs baselines on
SmolLM2-135M"), as Markdown on stdout.

    python scripts/replicate_table.py WORK STUDENT...

Reads WORK/superglue-*.json (``gkd eval superglue``), each student's pre-training run
(``config.yaml``, ``eval.json``: validation perplexity), the teacher's ``meta.json`` and WORK/times.tsv (wall seconds per
stage). Parameters are counted from the config (Llama-style blocks, tied embeddings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

LABELS = {
    "teacher": "teacher SmolLM2-135M-Instruct (Q4_1 dequantized)",
    "teacher-ft": "teacher fine-tuned on the tasks",
    "scratch": "scratch (no teacher)",
    "kd": "KD",
    "tinybert": "TinyBERT",
    "glmd": "GLMD",
    "glmd-vc": "GLMD + vocabulary compression",
}


def params(model: dict[str, Any]) -> int:
    """Parameters of a Llama-style model config (tied embeddings, no biases, RMSNorm)."""
    h, layers, vocab = model["hidden_size"], model["num_layers"], model["vocab_size"]
    heads = model["num_attention_heads"]
    kv = model.get("num_query_groups") or heads
    swiglu = model.get("activation") == "swiglu"
    ffn = model.get("ffn_hidden_size") or (8 * h // 3 if swiglu else 4 * h)
    head_dim = h // heads
    attention = h * (h + 2 * kv * head_dim) + h * h
    mlp = (3 if swiglu else 2) * h * ffn
    block = attention + mlp + 2 * h
    untied = 0 if model.get("tie_embeddings", True) else vocab * h
    return vocab * h + untied + layers * block + h


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    work = Path(argv[1])
    students = argv[2:]
    times: dict[str, int] = {}
    tsv = work / "times.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        name, seconds = line.split("\t")
        times[name] = int(seconds)
    rows = ["teacher"] + (["teacher-ft"] if (work / "superglue-teacher-ft.json").is_file() else [])
    rows += students
    tasks: list[str] = []
    for who in rows:
        result = load(work / f"superglue-{who}.json")
        for task in (result or {}).get("tasks", {}):
            if task not in tasks:
                tasks.append(task)
    head = ["model", "parameters", "val ppl"]
    for task in tasks:
        head.append("CB acc / F1" if task == "CB" else f"{task} acc")
    head += ["mean score", "train wall"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    teacher_arch = json.loads((work / "teacher" / "meta.json").read_text())["arch"]
    for who in rows:
        result = load(work / f"superglue-{who}.json") or {"tasks": {}}
        if who.startswith("teacher"):
            n_params, ppl = params(teacher_arch), "-"
            # the teacher's perplexity on the same windows, from any distilling student's run
            for student in students:
                pre = load(work / student / "pretrain" / "eval.json")
                if who == "teacher" and pre and pre.get("teacher_ppl") is not None:
                    ppl = f"{pre['teacher_ppl']:.1f}"
                    break
        else:
            cfg = yaml.safe_load((work / who / "pretrain" / "config.yaml").read_text())
            n_params = params(cfg["student"])
            pre = load(work / who / "pretrain" / "eval.json")
            ppl = f"{pre['student_ppl']:.0f}" if pre and pre.get("student_ppl") else "-"
        cells = [LABELS.get(who, who), f"{n_params / 1e6:.1f}M", ppl]
        scores = []
        for task in tasks:
            entry = result["tasks"].get(task)
            if entry is None:
                cells.append("-")
                continue
            m = entry["metrics"]
            cells.append(f"{m['acc']:.1f} / {m['f1']:.1f}" if task == "CB" else f"{m['acc']:.1f}")
            scores.append(entry["score"])
        cells.append(f"{sum(scores) / len(scores):.1f}" if scores else "-")
        wall = sum(s for name, s in times.items() if name.split("/")[0] == who)
        cells.append(f"{wall} s" if wall else "-")
        print("| " + " | ".join(cells) + " |")
    n = {
        t: e["n"]
        for t, e in (load(work / "superglue-teacher.json") or {"tasks": {}})["tasks"].items()
    }
    if n:
        print("\ndev examples scored: " + ", ".join(f"{t} {k}" for t, k in n.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
