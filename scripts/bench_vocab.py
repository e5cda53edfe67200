"""Benchmarks of GLMD vocabulary compression; each part writes its own section of BENCHMARKS.md
(replacing an earlier version of that section, leaving the others alone).

``counting``: token-frequency counting throughput. gkd's byte-level BPE trained on the shipped demo
corpus counts the corpus (repeated ``--repeat`` times into one file, to amortize process start-up)
with 0 (in the calling process), 1, 2, ... worker processes; tokens/s, best of ``--runs``.

``head``: the student's output layer (hidden -> vocabulary projection) plus the GLMD logit loss
(``methods.vocab_parallel.divergence`` with the forward-KL kernel), forward + backward, at
``V' = V/2`` against ``V' = V`` on the same shapes (N tokens, hidden size h). With the compressed vocabulary the teacher's logits
``[N, V]`` (an input in both cases) are restricted to the kept ids as the runtime does it
(``parallel.components.install_vocab_restriction``: ``index_select`` of the kept columns; the
padding mask is skipped because the balanced selection leaves no padding slot). The kept ids are a
real balanced selection (:func:`gkd_cli.vocab.select_kept_balanced`) of Zipf-distributed counts.
Peak memory: each case in a fresh subprocess, the resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs`` just before the step) minus the resident size before it, glibc's
malloc pinned to ``mmap`` for blocks >= 64 KiB so freed tensors leave the resident set (on CUDA:
``torch.cuda.max_memory_allocated``). The inputs (hidden states, teacher logits, the head weight)
exist before; what is measured is what the step adds: logits, the restricted teacher logits, the
loss's gradient buffer and workspace, the weight and input gradients. Time: both cases alternate
in one fresh subprocess, median of ``--repeats`` after a warm-up. Parameter reduction: from
``parallel.config.ModelArch.num_parameters`` (megatron-free), for the benchmark's shapes and for
GLMD's published student (6 x 768, 30,592 tokens, keep 50%).

``coverage``: the balanced against the global selection (:mod:`gkd_cli.vocab.selection`) on the
demo corpus: kept tokens, the student vocabulary ``V'`` it leads to at tp = 2 and 4, and the share
of corpus tokens kept (training corpus and held-out text).

Usage: python scripts/bench_vocab.py [--parts counting head coverage] [--no-write] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
ASSETS = REPO / "gkd_cli" / "assets"
COUNTING = "## Vocabulary compression: counting"
HEAD = "## Vocabulary compression: student head and logit loss at V/2"
COVERAGE = "## Vocabulary compression: balanced vs global selection"
TARGETS = {"time": 0.6, "memory": 0.65}


def write_section(heading: str, section: str, path: Path) -> None:
    """Replace the section starting at ``heading`` (up to the next ``## ``), or append it."""
    existing = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n"
    if pattern.search(existing):
        updated = pattern.sub(lambda _: section + "\n", existing, count=1).rstrip("\n") + "\n"
    else:
        updated = existing.rstrip("\n") + "\n\n" + section
    path.write_text(updated, encoding="utf-8")


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores (torch {torch.__version__}, CPU); load average "
        f"{os.getloadavg()[0]:.1f} at start"
    )


# ----------------------------------------------------------------------------------------------
# counting


def measure_counting(args: argparse.Namespace) -> list[dict]:
    from gkd_cli.data.tokenizer import train_bpe
    from gkd_cli.vocab.counting import count_tokens

    demo = ASSETS / "demo_corpus.txt"
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        text = demo.read_text(encoding="utf-8")
        corpus.write_text("\n\n".join([text] * args.repeat), encoding="utf-8")
        tokenizer = train_bpe([demo], args.count_vocab)
        for workers in args.workers:
            best = None
            for _ in range(args.runs):
                result = count_tokens(tokenizer, [corpus], num_workers=workers)
                if best is None or result.seconds < best.seconds:
                    best = result
            assert best is not None
            rows.append(
                {
                    "workers": workers,
                    "tokens": best.num_tokens,
                    "megabytes": best.num_bytes / 1e6,
                    "seconds": best.seconds,
                    "tokens_per_second": best.tokens_per_second,
                }
            )
            print(
                f"workers={workers}: {best.num_tokens:,} tokens in {best.seconds:.2f} s = "
                f"{best.tokens_per_second:,.0f} tokens/s",
                flush=True,
            )
    return rows


def render_counting(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        COUNTING,
        "",
        "`python scripts/bench_vocab.py --parts counting`",
        "",
        f"Machine: {_machine()}. Corpus: the shipped demo corpus repeated {args.repeat} times; "
        f"gkd's byte-level BPE with {args.count_vocab} tokens; best of {args.runs} runs; time "
        "includes starting the worker processes (spawn). The text is tokenized by the workers "
        "while the calling process reads and ships it, so with fewer free cores than workers + 1 "
        "more workers do not help (`gkd compress-vocab` uses none on 1-2 cores); on a shared "
        "2-core machine the numbers are noisy.",
        "",
        "| worker processes | tokens | MB of text | seconds | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        label = "0 (in process)" if row["workers"] == 0 else str(row["workers"])
        lines.append(
            f"| {label} | {row['tokens']:,} | {row['megabytes']:.1f} | {row['seconds']:.2f} | "
            f"{row['tokens_per_second']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# head + loss (the workloads run in fresh subprocesses)


def _kept_ids(vocab: int, kept: int, seed: int = 0):
    """A balanced selection (tp=1) of ``kept`` ids from Zipf counts over shuffled ids."""
    import numpy as np

    from gkd_cli.vocab.selection import layout_kept, select_kept_balanced

    rng = np.random.default_rng(seed)
    counts = np.zeros(vocab, dtype=np.int64)
    counts[rng.permutation(vocab)] = (1e7 / np.arange(1, vocab + 1)).astype(np.int64)
    ids = select_kept_balanced(counts, kept, [], teacher_vocab_padded=vocab, tp=1, multiple=128)
    comp_to_orig = layout_kept(ids, teacher_vocab_padded=vocab, tp=1, multiple=128)
    assert len(comp_to_orig) == kept and (comp_to_orig >= 0).all()
    return comp_to_orig


KINDS = {
    "full": "V' = V",
    "compressed": "V' = V/2, runtime (index_select)",
    "teacher-head": "V' = V/2, teacher head restricted (proposed)",
}
"""``full``: no compression. ``compressed``: the teacher's ``[N, V]`` logits restricted by
``index_select`` as ``DistillationRuntime`` does today. ``teacher-head``: the teacher's logits
arrive already restricted ``[N, V']``, as they would if the frozen teacher's output layer were
evaluated on the kept rows of its weight only (not implemented in the runtime; measured to show
what the extra copy costs)."""


def _head_case(kind: str, tokens: int, hidden: int, vocab: int, device: str):
    """Inputs of one case: hidden states, the head weight, teacher logits, the teacher columns."""
    import torch

    gen = torch.Generator().manual_seed(0)
    student_vocab = vocab if kind == "full" else vocab // 2
    index = None if kind == "full" else torch.from_numpy(_kept_ids(vocab, student_vocab))
    with torch.no_grad():
        hidden_states = torch.randn(tokens, hidden, generator=gen).to(device)
        weight = (torch.randn(student_vocab, hidden, generator=gen) / hidden**0.5).to(device)
        teacher_hidden = torch.randn(tokens, 256, generator=gen)
        teacher_weight = torch.randn(256, vocab, generator=gen) / 8
        if kind == "teacher-head":
            teacher_weight = teacher_weight[:, index]
            index = None
        teacher_logits = (teacher_hidden @ teacher_weight).to(device)
        del teacher_hidden, teacher_weight
    index = index.to(device) if index is not None else None
    mask = torch.ones(tokens, device=device)
    return hidden_states.requires_grad_(), weight.requires_grad_(), teacher_logits, index, mask


def head_step(hidden_states, weight, teacher_logits, index, mask) -> None:
    """Student head + GLMD forward KL, forward and backward; the teacher's logits restricted to
    the kept columns as ``DistillationRuntime`` does (no padding slot: no mask)."""
    from methods import vocab_kernels, vocab_parallel

    logits = hidden_states @ weight.t()
    teacher = teacher_logits if index is None else teacher_logits.index_select(-1, index)
    loss = vocab_parallel.divergence(vocab_kernels.forward_kl_kernel, logits, teacher, mask)
    del logits, teacher  # as the runtime drops its feature dict before backward
    loss.backward()


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"{field}:\s+(\d+) kB", text)
    assert found is not None
    return int(found.group(1))


def worker_head_memory(kind: str, tokens: int, hidden: int, vocab: int, device: str) -> dict:
    import gc

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    case = _head_case(kind, tokens, hidden, vocab, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        head_step(*case)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        head_step(*case)
        extra = (_status_kib("VmHWM") - before) * 1024
    return {"extra_bytes": extra}


def worker_head_time(tokens: int, hidden: int, vocab: int, device: str, repeats: int) -> dict:
    """Wall and CPU seconds per case. On CPU one thread: the CPU time of a single-threaded run is
    the work done, whatever else the (shared) machine is running; wall time is reported too."""
    import torch

    torch.set_num_threads(1 if device == "cpu" else (os.cpu_count() or 1))
    cases = {kind: _head_case(kind, tokens, hidden, vocab, device) for kind in KINDS}

    def once(case) -> tuple[float, float]:
        case[0].grad = case[1].grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        head_step(*case)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in cases}
    for case in cases.values():  # warm-up
        once(case)
    for _ in range(repeats):
        for kind, case in cases.items():
            wall, cpu = once(case)
            times[kind]["wall"].append(wall)
            times[kind]["cpu"].append(cpu)
    return times


def _subprocess(args: list[str], *, memory: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if memory:  # only for the memory measurement: it slows allocation down
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parameter_rows(tokens_hidden: int, vocab: int) -> list[dict]:
    """Parameter counts of students at V and V' = V/2 (tied and untied embeddings), from
    ``ModelArch.num_parameters``, against ``(V - V') x hidden`` per vocabulary matrix."""
    from gkd_cli.vocab import keep_size
    from parallel.config import ModelArch

    glmd_vocab = 30592
    glmd_kept = keep_size(0.5, glmd_vocab, tp=1)
    archs = [
        ("benchmark shapes", dict(num_layers=4, hidden_size=tokens_hidden, num_attention_heads=8), vocab, vocab // 2),
        ("GLMD student (6 x 768)", dict(num_layers=6, hidden_size=768, num_attention_heads=12, max_seq_len=512), glmd_vocab, glmd_kept),
    ]  # fmt: skip
    rows = []
    for name, arch, full, kept in archs:
        for tied in (True, False):
            before = ModelArch(**arch, vocab_size=full, tie_embeddings=tied).num_parameters()
            after = ModelArch(**arch, vocab_size=kept, tie_embeddings=tied).num_parameters()
            expected = (full - kept) * arch["hidden_size"] * (1 if tied else 2)
            rows.append(
                {"name": name, "tied": tied, "vocab": full, "kept": kept,
                 "hidden": arch["hidden_size"], "before": before, "after": after,
                 "saved": before - after, "expected": expected}
            )  # fmt: skip
    return rows


def measure_head(args: argparse.Namespace) -> dict:
    shape = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
             "--device", args.device]  # fmt: skip
    memory = {
        kind: _subprocess(["--worker", "head-memory", "--kind", kind, *shape], memory=True)
        for kind in KINDS
    }
    times = _subprocess(
        ["--worker", "head-time", "--repeats", str(args.repeats), *shape], memory=False
    )
    return {"memory": memory, "times": times, "parameters": parameter_rows(args.hidden, args.vocab)}


def _verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "NOT met"


def render_head(result: dict, args: argparse.Namespace) -> str:
    memory, times = result["memory"], result["times"]
    clock = "cpu" if args.device == "cpu" else "wall"
    median = {k: {c: statistics.median(v[c]) for c in ("wall", "cpu")} for k, v in times.items()}
    n, h, v = args.tokens, args.hidden, args.vocab
    logits_mib = n * v * 4 / 2**20
    timing = (
        "CPU time of a single-threaded run (the machine is shared; wall time in brackets)"
        if clock == "cpu"
        else "wall time"
    )
    lines = [
        HEAD,
        "",
        "`python scripts/bench_vocab.py --parts head`",
        "",
        f"Machine: {_machine()}. N={n} tokens, hidden h={h}, V={v:,}, V'={v // 2:,} (a balanced "
        "selection: no padding slot), fp32. Student head `hidden @ W^T` + "
        "`methods.vocab_parallel.divergence` with the forward-KL kernel (T=1, default chunking), forward + backward. "
        "Teacher logits: `[N, V]` in the full case; restricted to the kept columns by "
        "`index_select` as `DistillationRuntime` does (`compressed`); or produced already "
        "restricted by a teacher output layer evaluated on its kept rows only (`teacher head "
        "restricted`, a proposal, not in the runtime). Peak extra memory: each case in a fresh "
        "subprocess (VmHWM reset through /proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_=65536); "
        "it counts the student logits, the restricted teacher logits, the loss's gradient buffer "
        "and workspace, and the gradients of W and of the hidden states (the inputs and W exist "
        f"before). Time: {timing}, median of {args.repeats} alternating repeats in one fresh "
        "subprocess after a warm-up.",
        "",
        "| case | peak extra memory (MiB) | x fp32 [N, V] logits | memory vs V | time (ms) "
        "| time vs V |",
        "|---|---|---|---|---|---|",
    ]
    full_mem = memory["full"]["extra_bytes"]
    for kind, label in KINDS.items():
        extra = memory[kind]["extra_bytes"]
        lines.append(
            f"| {label} | {extra / 2**20:.0f} | {extra / 2**20 / logits_mib:.2f} | "
            f"{extra / full_mem:.2f} | {median[kind][clock] * 1e3:.0f} "
            f"({median[kind]['wall'] * 1e3:.0f}) | "
            f"{median[kind][clock] / median['full'][clock]:.2f} |"
        )
    lines += ["", "| V/2 : V | time | target | memory | target |", "|---|---|---|---|---|"]
    for kind in ("compressed", "teacher-head"):
        time_ratio = median[kind][clock] / median["full"][clock]
        mem_ratio = memory[kind]["extra_bytes"] / full_mem
        lines.append(
            f"| {KINDS[kind]} | {time_ratio:.2f} | <= {TARGETS['time']}: "
            f"{_verdict(time_ratio, TARGETS['time'])} | {mem_ratio:.2f} | <= {TARGETS['memory']}: "
            f"{_verdict(mem_ratio, TARGETS['memory'])} |"
        )
    lines += [
        "",
        "Parameter reduction (`ModelArch.num_parameters`, vocabulary padded to 128 as megatron "
        "does; the V' of GLMD's student is its 50% keep rounded to 128):",
        "",
        "| student | embeddings | V -> V' | parameters at V | at V' | saved | (V - V') x h x "
        "matrices | equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["parameters"]:
        lines.append(
            f"| {row['name']} | {'tied' if row['tied'] else 'untied'} | {row['vocab']:,} -> "
            f"{row['kept']:,} | {row['before']:,} | {row['after']:,} | {row['saved']:,} | "
            f"{row['expected']:,} | {'yes' if row['saved'] == row['expected'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# coverage of the two selections


def measure_coverage(args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from gkd_cli.data.tokenizer import train_bpe
    from gkd_cli.vocab import count_tokens, coverage, keep_size, layout_kept
    from gkd_cli.vocab.selection import select_kept, select_kept_balanced

    rows = []
    for vocab in args.coverage_vocab:
        tokenizer = train_bpe([ASSETS / "demo_corpus.txt"], vocab)
        train = count_tokens(tokenizer, [ASSETS / "demo_corpus.txt"], num_workers=0).counts
        held_out = count_tokens(tokenizer, [ASSETS / "demo_valid.txt"], num_workers=0).counts
        forced = set(tokenizer.special_ids)
        for tp in (2, 4):
            step = 128 * tp
            padded = -(-vocab // step) * step
            for keep in (0.25, 0.5):
                kept_size = keep_size(keep, vocab, tp=tp)
                selections = {
                    "global": select_kept(train, kept_size, forced),
                    "balanced": select_kept_balanced(
                        train, kept_size, forced, teacher_vocab_padded=padded, tp=tp, multiple=128
                    ),
                }
                for name, ids in selections.items():
                    mask = np.zeros(vocab, dtype=bool)
                    mask[ids] = True
                    comp = layout_kept(ids, teacher_vocab_padded=padded, tp=tp, multiple=128)
                    rows.append(
                        {"vocab": vocab, "tp": tp, "keep": keep, "selection": name,
                         "kept": int(mask.sum()), "student_vocab": len(comp),
                         "coverage": coverage(train, mask), "held_out": coverage(held_out, mask)}
                    )  # fmt: skip
                    print(rows[-1], flush=True)
    return rows


def render_coverage(rows: list[dict]) -> str:
    lines = [
        COVERAGE,
        "",
        "`python scripts/bench_vocab.py --parts coverage`",
        "",
        "gkd's byte-level BPE trained on the demo corpus; frequencies counted on it; coverage = "
        "share of corpus tokens whose id is kept (training corpus, and the held-out demo_valid "
        "text). `global` keeps the most frequent tokens overall, and at tp > 1 each student shard "
        "is padded to the fullest teacher shard, so V' grows beyond the keep size (BPE gives the "
        "frequent tokens low ids, in teacher shard 0); `balanced` keeps the most frequent "
        "keep/tp tokens of each teacher shard, so V' = keep size (the default of `gkd "
        "compress-vocab`). At the same keep size the balanced selection covers a few points "
        "less; at the same student size V' (what the parameters and the time scale with) it "
        "covers more (compare a global row with the balanced row of twice its keep).",
        "",
        "| V | tp | keep | selection | kept tokens | student V' | V' / V | coverage | held-out "
        "coverage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']:,} | {r['tp']} | {r['keep']} | {r['selection']} | {r['kept']:,} | "
            f"{r['student_vocab']:,} | {r['student_vocab'] / r['vocab']:.2f} | "
            f"{100 * r['coverage']:.1f}% | {100 * r['held_out']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["counting", "head", "coverage"],
                        choices=["counting", "head", "coverage"])  # fmt: skip
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count-vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--coverage-vocab", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    # internal: the measurement subprocesses
    parser.add_argument("--worker", choices=["head-memory", "head-time"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=list(KINDS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker == "head-memory":
        result = worker_head_memory(args.kind, args.tokens, args.hidden, args.vocab, args.device)
        print(json.dumps(result))
        return
    if args.worker == "head-time":
        result = worker_head_time(args.tokens, args.hidden, args.vocab, args.device, args.repeats)
        print(json.dumps(result))
        return
    sections = []
    if "counting" in args.parts:
        sections.append((COUNTING, render_counting(measure_counting(args), args)))
    if "head" in args.parts:
        sections.append((HEAD, render_head(measure_head(args), args)))
    if "coverage" in args.parts:
        sections.append((COVERAGE, render_coverage(measure_coverage(args))))
    for heading, section in sections:
        print(section)
        if not args.no_write:
            write_section(heading, section, args.output)


if __name__ == "__main__":
    main()
