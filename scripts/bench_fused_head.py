"""Benchmark the fused output layer + loss (methods/fused_head.py) against the naive head + loss
and against gkd's materialized path (issue 18).

Workload: the student's and the teacher's output layers (``hidden @ W^T``, hidden width
``--hidden``, vocabulary ``--vocab``) and the forward KL between them over ``--tokens`` tokens,
forward + backward (gradients of the student's hidden states and output weight; the teacher's head
under ``no_grad``). Three implementations, each in a fresh subprocess per measurement:

- ``naive``: ``F.linear`` for both heads, ``log_softmax`` of both in fp32, the KL, autograd.
- ``materialized``: gkd's path before the fused head: the logits from ``F.linear``, then
  ``methods.vocab_parallel.divergence`` (chunked, gradient computed in the forward).
- ``fused``: ``methods.vocab_parallel.divergence`` on ``HeadInput`` values: the logits are never
  built.

Peak extra memory: the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` just before, with glibc's malloc pinned to ``mmap`` for blocks >= 64 KiB)
minus the resident size before the head; it counts the gradients of the hidden states and the output
weight (the latter is the parameter's gradient, which every implementation produces). Time: one
forward + backward after a warm-up on 4 tokens (the machine is shared: one repeat).

Also derived: the largest number of tokens whose head + loss fits a memory budget (``--budget-gib``),
from the peak measured at ``--tokens`` and at a quarter of it (peak is affine in the token count).

Usage: ``python scripts/bench_fused_head.py --vocab 32768 131072 --dtype float32 bfloat16``.
Prints a markdown section (and appends it to ``--output``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = {"memory": 0.05, "time": 1.0}
IMPLS = ("naive", "materialized", "fused")


def _make(tokens, hidden, vocab, dtype_name, seed=0):
    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    scale = 2.0 / hidden**0.5
    hs = torch.randn(tokens, hidden, generator=gen).to(dtype).requires_grad_()
    ws = (torch.randn(vocab, hidden, generator=gen) * scale).to(dtype).requires_grad_()
    ht = torch.randn(tokens, hidden, generator=gen).to(dtype)
    wt = (torch.randn(vocab, hidden, generator=gen) * scale).to(dtype)
    mask = torch.ones(tokens)
    return hs, ws, ht, wt, mask


def naive(hs, ws, ht, wt, mask):
    import torch

    s = torch.nn.functional.linear(hs, ws)
    with torch.no_grad():
        t = torch.nn.functional.linear(ht, wt)
    log_p = torch.log_softmax(s.float(), dim=-1)
    log_q = torch.log_softmax(t.float(), dim=-1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return (per_token * mask).sum() / mask.sum()


def materialized(hs, ws, ht, wt, mask):
    import torch

    from methods import vocab_kernels as vk
    from methods import vocab_parallel as vp

    s = torch.nn.functional.linear(hs, ws)
    with torch.no_grad():
        t = torch.nn.functional.linear(ht, wt)
    return vp.divergence(vk.forward_kl_kernel, s, t, mask)


CHUNK: list[int | None] = [None]
"""Tokens per chunk of the fused path (``--chunk``; ``None``: its default)."""


def fused(hs, ws, ht, wt, mask):
    from methods import vocab_kernels as vk
    from methods import vocab_parallel as vp
    from methods.fused_head import HeadInput

    shard = vp.VocabShard(chunk_size=CHUNK[0])
    return vp.divergence(vk.forward_kl_kernel, HeadInput(hs, ws), HeadInput(ht, wt), mask, shard)


def _kd_labels(hs):
    import torch

    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 1000, (hs.shape[0],), generator=gen)


KD_T, KD_HARD = 2.0, 0.5


def kd_one_pass(hs, ws, ht, wt, mask):
    """``kd`` (soft KL x T^2 + 0.5 x hard CE) as the method computes it on the fused path: both
    terms in one pass over the student head (``fused_head.soft_and_hard``)."""
    from methods import fused_head as fh
    from methods import vocab_parallel as vp

    soft, hard = fh.soft_and_hard(
        "kl",
        fh.HeadInput(hs, ws),
        fh.HeadInput(ht, wt),
        _kd_labels(hs),
        mask,
        vp.VocabShard(chunk_size=CHUNK[0]),
        temperature=KD_T,
        soft_weight=1.0,
        hard_weight=KD_HARD,
    )
    return soft + KD_HARD * hard


def kd_two_passes(hs, ws, ht, wt, mask):
    """The same loss with one fused pass per term (before the two-term pass)."""
    from methods import vocab_kernels as vk
    from methods import vocab_parallel as vp
    from methods.fused_head import HeadInput

    shard = vp.VocabShard(chunk_size=CHUNK[0])
    student = HeadInput(hs, ws)
    soft = vp.divergence(
        vk.forward_kl_kernel, student, HeadInput(ht, wt), mask, shard, temperature=KD_T
    )
    hard = vp.cross_entropy(student, _kd_labels(hs), mask, shard)  # type: ignore[arg-type]
    return soft * KD_T**2 + KD_HARD * hard


def _status_kib(field):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))


def worker(impl, tokens, hidden, vocab, dtype_name):
    import gc

    fn = {
        "naive": naive,
        "materialized": materialized,
        "fused": fused,
        "kd_one_pass": kd_one_pass,
        "kd_two_passes": kd_two_passes,
    }[impl]
    fn(*_make(4, hidden, vocab, dtype_name, seed=1)).backward()  # warm-up
    inputs = _make(tokens, hidden, vocab, dtype_name)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = fn(*inputs)
    loss.backward()
    seconds = time.perf_counter() - start
    extra = (_status_kib("VmHWM") - before) * 1024
    return {"extra_bytes": extra, "seconds": seconds, "loss": float(loss)}


STEP_STUDENT = dict(num_layers=2, hidden_size=256, num_attention_heads=4, max_seq_len=8192)
STEP_TEACHER = dict(num_layers=2, hidden_size=512, num_attention_heads=8, max_seq_len=8192)


def worker_step(seq, vocab, out: Path) -> None:
    """One gkd distillation step (glmd + lm, tp1pp1, one sequence of ``seq`` tokens) in this
    process; the path follows ``GKD_FUSED_HEAD``."""
    import gc

    import torch

    from methods.pipeline import MethodPipeline
    from parallel.config import ModelArch, ParallelConfig, TrainConfig
    from parallel.distributed import initialize
    from parallel.runtime import DistillationRuntime, TeacherSpec

    ctx = initialize(ParallelConfig(tp=1, pp=1, dp=1), seed=1)
    runtime = DistillationRuntime(
        ctx=ctx,
        student=ModelArch.gpt2(**STEP_STUDENT, vocab_size=vocab),
        teachers=[TeacherSpec(ModelArch.gpt2(**STEP_TEACHER, vocab_size=vocab))],
        pipeline=MethodPipeline.from_config(
            [{"name": "glmd", "temperature": 2.0}, {"name": "lm", "weight": 0.1}]
        ),
        train=TrainConfig(
            steps=4,
            global_batch_size=1,
            micro_batch_size=1,
            warmup_steps=0,
            logit_chunk_tokens=CHUNK[0],
        ),
        seq_length=seq,
    )
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (1, seq + 1), generator=gen)]
    runtime.train_step(0, batches)  # warm-up: optimizer state, allocator
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    result = runtime.train_step(1, batches)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = (_status_kib("VmHWM") - before) * 1024
    out.write_text(
        json.dumps(
            {
                "extra_bytes": extra,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "loss": result.loss,
                "path": runtime.stage.head_path,
            }
        )
    )


def _run_step(seq, vocab, path, threads) -> dict:
    import tempfile

    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536")
    env.update(OMP_NUM_THREADS=str(threads), GKD_FUSED_HEAD="auto" if path == "fused" else "off")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"]
        args += ["--master-port", str(29700 + os.getpid() % 200), __file__, "--worker", "step"]
        args += ["--tokens", str(seq), "--vocab", str(vocab), "--out", str(out)]
        if CHUNK[0] is not None:
            args += ["--chunk", str(CHUNK[0])]
        proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"step worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def step_section(args) -> list[str]:
    budget = args.budget_gib * 2**30
    lines = [
        "",
        f"A whole distillation step (gkd runtime, tp1pp1, `glmd` + `lm`, student gpt2 2 layers "
        f"x 256, teacher gpt2 2 layers x 512, V={args.step_vocab}, one sequence, fp32 CPU): "
        "peak extra resident memory of `train_step` after a warm-up step, and its time (wall, "
        f"and the process's CPU seconds with OMP_NUM_THREADS={args.threads}).",
        "",
        "| seq | path | peak extra (MiB) | x materialized | time (s) | CPU s | CPU x materialized "
        "| loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fit = {}
    for seq in args.step_seq:
        results = {
            p: _run_step(seq, args.step_vocab, p, args.threads) for p in ("materialized", "fused")
        }
        print("step", seq, results, file=sys.stderr, flush=True)
        for path, r in results.items():
            assert r["path"] == path, r
            ratio = r["extra_bytes"] / results["materialized"]["extra_bytes"]
            cpu_ratio = r["cpu_seconds"] / results["materialized"]["cpu_seconds"]
            lines.append(
                f"| {seq} | {path} | {_mib(r['extra_bytes'])} | {ratio:.3f} | {r['seconds']:.1f} "
                f"| {r['cpu_seconds']:.1f} | {cpu_ratio:.2f} | {r['loss']:.5f} |"
            )
            fit.setdefault(path, []).append((seq, r["extra_bytes"]))
    if len(args.step_seq) >= 2:
        lines += [
            "",
            f"Largest sequence length whose step fits {args.budget_gib} GiB (peak affine "
            f"in the sequence length, fitted from the two shortest above):",
            "",
        ]
        for path, points in fit.items():
            (s0, m0), (s1, m1) = points[0], points[1]
            slope = (m1 - m0) / (s1 - s0)
            fixed = m0 - slope * s0
            if slope <= 0:
                lines.append(f"- {path}: no growth measured between the two lengths")
                continue
            lines.append(
                f"- {path}: {int((budget - fixed) / slope)} tokens ({slope:.0f} bytes/token)"
            )
    return lines


def bisect_section(args) -> list[str]:
    """The largest sequence length (a multiple of ``--bisect-step`` tokens) whose distillation
    step's peak extra memory stays within ``--bisect-gib``, found by running the step (doubling
    from ``--bisect-start``, then bisecting), for each path; then both paths at the found lengths."""
    budget = args.bisect_gib * 2**30
    quantum = args.bisect_step
    lines = [
        "",
        f"Largest sequence length whose step fits {args.bisect_gib} GiB of peak extra memory "
        f"(run, not extrapolated: doubling from {args.bisect_start}, then bisection to "
        f"{quantum} tokens; every probe a fresh process):",
        "",
        "| path | max seq | peak extra there (MiB) | first seq over budget | probes |",
        "|---|---|---|---|---|",
    ]
    found = {}
    for path in args.bisect_paths:
        probes = []

        def fits(seq: int, path: str = path, probes: list = probes) -> bool:
            r = _run_step(seq, args.step_vocab, path, args.threads)
            probes.append((seq, r["extra_bytes"], r["seconds"]))
            print("bisect", path, seq, r, file=sys.stderr, flush=True)
            return r["extra_bytes"] <= budget

        lo, hi = 0, None
        seq = args.bisect_start
        while hi is None:
            if fits(seq):
                lo, seq = seq, seq * 2
            else:
                hi = seq
        while hi - lo > quantum:
            mid = (lo + hi) // 2 // quantum * quantum
            if mid <= lo:
                break
            if fits(mid):
                lo = mid
            else:
                hi = mid
        peak = next((b for q, b, _ in probes if q == lo), None)
        found[path] = lo
        lines.append(
            f"| {path} | {lo} | {_mib(peak) if peak else '-'} | {hi} | "
            + ", ".join(f"{q}: {_mib(b)} MiB" for q, b, _ in probes)
            + " |"
        )
    if found.get("materialized"):
        ratio = found["fused"] / found["materialized"]
        lines += ["", f"Fused / materialized longest sequence: {ratio:.2f}x."]
    return lines


def _run_worker(impl, tokens, hidden, vocab, dtype, threads) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536")
    env["OMP_NUM_THREADS"] = str(threads)
    args = [sys.executable, __file__, "--worker", impl, "--tokens", str(tokens)]
    args += ["--hidden", str(hidden), "--vocab", str(vocab), "--dtype", dtype]
    if CHUNK[0] is not None:
        args += ["--chunk", str(CHUNK[0])]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {impl} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def run(args) -> str:
    import platform

    import torch

    lines = [
        "## Fused output layer + loss (issue 18)",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, CPU (OMP_NUM_THREADS={args.threads}), "
        f"`python scripts/bench_fused_head.py`. Forward KL between a student and a teacher head, "
        f"N={args.tokens} tokens, hidden {args.hidden}; forward + backward (gradients of the "
        "student's hidden states and output weight). Peak extra memory from the resident-set "
        "high-water mark (each measurement in a fresh process; it includes the output weight's "
        "gradient, V x hidden, which every implementation produces); time of one forward + "
        "backward on a shared machine (one repeat). Ratios from one run of this script. "
        f"Targets: memory <= {TARGETS['memory']}x naive, time <= {TARGETS['time']}x naive.",
        "",
        "| V | dtype | impl | peak extra (MiB) | x naive | beyond W grad, x naive | time (s) "
        "| x naive | loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    budget = args.budget_gib * 2**30
    fits = []
    for vocab in [] if args.skip_head else args.vocab:
        for dtype in args.dtype:
            results = {}
            for impl in IMPLS:
                results[impl] = _run_worker(
                    impl, args.tokens, args.hidden, vocab, dtype, args.threads
                )
                print(impl, vocab, dtype, results[impl], file=sys.stderr, flush=True)
            base = results["naive"]
            # The output weight's gradient (V x hidden in the weight dtype) is the parameter's
            # gradient, which every implementation produces and the optimizer holds anyway.
            w_grad = vocab * args.hidden * getattr(torch, dtype).itemsize
            for impl in IMPLS:
                r = results[impl]
                mem_ratio = r["extra_bytes"] / base["extra_bytes"]
                beyond = (r["extra_bytes"] - w_grad) / (base["extra_bytes"] - w_grad)
                time_ratio = r["seconds"] / base["seconds"]
                lines.append(
                    f"| {vocab} | {dtype} | {impl} | {_mib(r['extra_bytes'])} | {mem_ratio:.3f} "
                    f"| {beyond:.3f} | {r['seconds']:.1f} | {time_ratio:.2f} | {r['loss']:.5f} |"
                )
            if args.fit and dtype == args.dtype[0]:
                quarter = args.tokens // 4
                row = [vocab, dtype]
                for impl in ("materialized", "fused"):
                    small = _run_worker(impl, quarter, args.hidden, vocab, dtype, args.threads)
                    slope = (results[impl]["extra_bytes"] - small["extra_bytes"]) / (
                        args.tokens - quarter
                    )
                    fixed = results[impl]["extra_bytes"] - slope * args.tokens
                    row.append(int((budget - fixed) / slope) if slope > 0 else None)
                    row.append(slope)
                fits.append(row)
    if fits:
        lines += [
            "",
            f"Largest token count whose head + loss fits {args.budget_gib} GiB (peak affine in "
            f"N, fitted from N={args.tokens} and N={args.tokens // 4}; head + loss only, not a whole "
            "distillation step):",
            "",
            "| V | dtype | materialized: max N | bytes/token | fused: max N | bytes/token |",
            "|---|---|---|---|---|---|",
        ]
        for vocab, dtype, m_n, m_s, f_n, f_s in fits:
            lines.append(f"| {vocab} | {dtype} | {m_n} | {m_s:.0f} | {f_n} | {f_s:.0f} |")
    if args.step_seq:
        lines += step_section(args)
    if args.bisect_gib:
        lines += bisect_section(args)
    return "\n".join(lines) + "\n"


def cpu_time_section(args) -> list[str]:
    """Time vs the naive head as CPU seconds of one thread, all implementations in ONE process,
    interleaved (the order rotates every round), so a shared machine's load falls on all of them
    alike: ``time.process_time`` counts this process's own CPU time (not the time other jobs
    hold the cores), and one thread keeps the BLAS the same for every implementation."""
    import statistics

    import torch

    torch.set_num_threads(1)
    impls = [("naive", None), ("materialized", None)]
    impls += [("fused", c or None) for c in (args.cpu_time_chunks or [0])]  # 0: the default
    names = [i if c is None else f"{i} (chunk {c})" for i, c in impls]
    fns = {"naive": naive, "materialized": materialized, "fused": fused}
    samples: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, float] = {}
    loads = [os.getloadavg()[0]]
    for impl, chunk in impls:  # warm-up: allocator, BLAS, kernels
        CHUNK[0] = chunk
        fns[impl](*_make(64, args.hidden, args.vocab[0], args.dtype[0], seed=1)).backward()
    for rnd in range(args.cpu_time):
        order = list(range(len(impls)))
        order = order[rnd % len(order) :] + order[: rnd % len(order)]
        for k in order:
            (impl, chunk), name = impls[k], names[k]
            CHUNK[0] = chunk
            inputs = _make(args.tokens, args.hidden, args.vocab[0], args.dtype[0])
            start = time.process_time()
            loss = fns[impl](*inputs)
            loss.backward()
            samples[name].append(time.process_time() - start)
            losses[name] = float(loss)
            del inputs, loss
            print(name, rnd, f"{samples[name][-1]:.2f}", file=sys.stderr, flush=True)
        loads.append(os.getloadavg()[0])
    base = statistics.median(samples["naive"])
    lines = [
        "",
        f"Time vs the naive head, CPU seconds of one thread (`--cpu-time {args.cpu_time}`: every "
        f"implementation {args.cpu_time} times in one process, interleaved, order rotating per "
        f"round), N={args.tokens}, hidden {args.hidden}, V={args.vocab[0]}, {args.dtype[0]}, "
        f"forward KL, forward + backward; load average {min(loads):.1f} to {max(loads):.1f}:",
        "",
        "| impl | CPU s (median) | min | max | x naive (median) | loss |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        xs = samples[name]
        med = statistics.median(xs)
        lines.append(
            f"| {name} | {med:.2f} | {min(xs):.2f} | {max(xs):.2f} | {med / base:.3f} "
            f"| {losses[name]:.5f} |"
        )
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=[*IMPLS, "kd_one_pass", "kd_two_passes", "step"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--chunk", type=int, default=None, help="fused path: tokens per chunk")
    parser.add_argument("--step-seq", type=int, nargs="*", default=[])
    parser.add_argument("--step-vocab", type=int, default=32768)
    parser.add_argument("--skip-head", action="store_true", help="only the distillation step")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--bisect-gib", type=float, default=None, help="step: run a bisection")
    parser.add_argument("--bisect-start", type=int, default=1024)
    parser.add_argument("--bisect-step", type=int, default=256)
    parser.add_argument(
        "--bisect-paths",
        nargs="+",
        default=["materialized", "fused"],
        choices=["materialized", "fused"],
    )
    parser.add_argument("--fit", action="store_true", help="also the largest N within the budget")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--cpu-time", type=int, default=0, metavar="ROUNDS",
        help="time vs naive in CPU seconds, one process, interleaved (instead of the head table)",
    )  # fmt: skip
    parser.add_argument("--cpu-time-chunks", type=int, nargs="*", default=[])
    args = parser.parse_args(argv)
    CHUNK[0] = args.chunk
    if args.worker == "step":
        worker_step(args.tokens, args.vocab[0], args.out)
        return
    if args.worker:
        vocab = args.vocab[0]
        print(json.dumps(worker(args.worker, args.tokens, args.hidden, vocab, args.dtype[0])))
        return
    if args.cpu_time:
        text = "\n".join(cpu_time_section(args)) + "\n"
    else:
        text = run(args)
    print(text)
    if args.output is not None:
        with args.output.open("a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
