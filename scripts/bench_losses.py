"""Benchmark the vocab-parallel logit loss against a naive implementation (``make bench``).

Measured for the forward KL at N=4096 tokens, V=16384 (logits generated as ``hidden @ W`` with a
student width of 256 and a teacher width of 512, so their values look like real logits):

- **peak extra memory** of forward + backward of the loss alone (logits already computed, leaf
  tensors), each implementation in a fresh subprocess. On CPU: the process's resident-set
  high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before the loss and
  read right after; extra = high-water mark - resident size before. glibc's malloc is pinned to
  ``mmap`` for blocks >= 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors really leave the
  resident set instead of lingering in the heap. On CUDA: ``torch.cuda.max_memory_allocated``.
  The resulting ``.grad`` of the student logits counts in both.
- **time** of forward + backward, both implementations alternating in one fresh subprocess; the
  median of the repeats.
- **tensor-parallel traffic** at TP=2 (gloo, two processes) for V in {8k, 16k, 32k}: the payload
  bytes each rank hands to ``all_reduce``/``all_gather`` per token, counted by wrapping those
  functions, against gathering the fp32 logits and computing the loss on the full vocabulary.

Prints a markdown section and appends it to BENCHMARKS.md (``--output``), under "Logit losses".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = {"memory": 0.15, "time": 1.0, "time_goal": 0.8, "traffic": 32}


# ----------------------------------------------------------------------------------------------
# Workloads (run inside subprocesses)


def _make_logits(tokens, vocab, dtype_name, device, seed=0):
    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        hidden_s = torch.randn(tokens, 256, generator=gen)
        weight_s = torch.randn(256, vocab, generator=gen) / 256**0.5
        hidden_t = torch.randn(tokens, 512, generator=gen)
        weight_t = torch.randn(512, vocab, generator=gen) / 512**0.5
        student = (hidden_s @ weight_s * 2.0).to(device=device, dtype=dtype)
        teacher = (hidden_t @ weight_t * 2.0).to(device=device, dtype=dtype)
        del hidden_s, weight_s, hidden_t, weight_t
    mask = torch.ones(tokens, device=device)
    return student.requires_grad_(), teacher, mask


def naive_forward_kl(student, teacher, mask):
    """What one writes without thinking about memory: materialize both softmaxes in fp32."""
    import torch

    log_p = torch.log_softmax(student.float(), dim=-1)
    log_q = torch.log_softmax(teacher.float(), dim=-1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return (per_token * mask).sum() / mask.sum()


def ours_forward_kl(student, teacher, mask):
    from methods import vocab_kernels, vocab_parallel

    return vocab_parallel.divergence(vocab_kernels.forward_kl_kernel, student, teacher, mask)


IMPLEMENTATIONS = {"naive": naive_forward_kl, "gkd": ours_forward_kl}


def _status_kib(field):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))


def worker_memory(impl, tokens, vocab, dtype_name, device):
    import gc

    import torch

    loss_fn = IMPLEMENTATIONS[impl]
    # warm up on 4 tokens so one-time costs (imports, autograd engine start) are not counted
    small = _make_logits(4, vocab, dtype_name, device, seed=1)
    loss_fn(*small).backward()
    del small
    student, teacher, mask = _make_logits(tokens, vocab, dtype_name, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_fn(student, teacher, mask).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        loss_fn(student, teacher, mask).backward()
        extra = (_status_kib("VmHWM") - before) * 1024
    logits_bytes = student.numel() * student.element_size()
    grad_bytes = student.grad.numel() * student.grad.element_size()
    return {"extra_bytes": extra, "logits_bytes": logits_bytes, "grad_bytes": grad_bytes}


def worker_time(tokens, vocab, dtype_name, device, repeats):
    import torch

    student, teacher, mask = _make_logits(tokens, vocab, dtype_name, device)

    def once(fn):
        student.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(student, teacher, mask).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in IMPLEMENTATIONS}
    for fn in IMPLEMENTATIONS.values():  # warm-up
        once(fn)
    for _ in range(repeats):
        for name, fn in IMPLEMENTATIONS.items():
            times[name].append(once(fn))
    return times


def _traffic_rank(rank, world, port, vocab_sizes, tokens, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counted = {"bytes": 0}
    real = {"all_reduce": dist.all_reduce, "all_gather": dist.all_gather}

    def all_reduce(tensor, *args, **kwargs):
        counted["bytes"] += tensor.numel() * tensor.element_size()
        return real["all_reduce"](tensor, *args, **kwargs)

    def all_gather(outputs, tensor, *args, **kwargs):
        counted["bytes"] += tensor.numel() * tensor.element_size()
        return real["all_gather"](outputs, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    from methods import vocab_kernels, vocab_parallel

    result = {}
    for vocab in vocab_sizes:
        student, teacher, mask = _make_logits(tokens, vocab, "float32", "cpu")
        width = vocab // world
        shard = slice(rank * width, (rank + 1) * width)
        s = student.detach()[:, shard].clone().requires_grad_()
        t = teacher[:, shard].contiguous()
        counted["bytes"] = 0
        shard = vocab_parallel.VocabShard(rank * width, vocab, dist.group.WORLD)
        vocab_parallel.divergence(vocab_kernels.forward_kl_kernel, s, t, mask, shard).backward()
        ours = counted["bytes"] / tokens
        counted["bytes"] = 0
        gathered = []
        for local in (s.detach(), t):  # gather both shards, then the naive loss on full logits
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local)
            gathered.append(torch.cat(parts, dim=1))
        full = gathered[0].requires_grad_()
        naive_forward_kl(full, gathered[1], mask).backward()  # this rank keeps its grad slice
        result[vocab] = {"gkd": ours, "gather": counted["bytes"] / tokens}
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def measure_traffic(vocab_sizes, tokens):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_traffic_rank, args=(r, 2, port, vocab_sizes, tokens, queue))
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    result = queue.get(timeout=600)
    for proc in procs:
        proc.join(timeout=60)
    return result


# ----------------------------------------------------------------------------------------------
# Driver


def _subprocess(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if "memory" in args:  # only for the memory measurement: it slows allocation down
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = model.group(1).strip() if model else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.node()} (torch {torch.__version__}, CPU)"


def _verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "NOT met"


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.0f}"


def _worker_args(args, worker: str, dtype: str, *extra: str) -> list[str]:
    common = ["--worker", worker, "--tokens", str(args.tokens), "--vocab", str(args.vocab)]
    common += ["--dtype", dtype, "--device", args.device, "--threads", str(args.threads)]
    return common + list(extra)


def run(args) -> str:
    load_start = os.getloadavg()[0]
    rows, ratios = [], []
    for dtype in args.dtypes:
        mem = {
            impl: _subprocess(_worker_args(args, "memory", dtype, "--impl", impl))
            for impl in IMPLEMENTATIONS
        }
        times = _subprocess(_worker_args(args, "time", dtype, "--repeats", str(args.repeats)))
        median = {impl: statistics.median(times[impl]) for impl in IMPLEMENTATIONS}
        best = {impl: min(times[impl]) for impl in IMPLEMENTATIONS}
        for impl in IMPLEMENTATIONS:
            extra = mem[impl]["extra_bytes"]
            beyond = extra - mem[impl]["grad_bytes"]
            rows.append(
                f"| {dtype} | {impl} | {_mib(extra)} | {extra / mem[impl]['logits_bytes']:.2f} "
                f"| {_mib(beyond)} | {median[impl] * 1e3:.0f} | {best[impl] * 1e3:.0f} |"
            )
        memory_ratio = mem["gkd"]["extra_bytes"] / mem["naive"]["extra_bytes"]
        beyond_ratio = (mem["gkd"]["extra_bytes"] - mem["gkd"]["grad_bytes"]) / (
            mem["naive"]["extra_bytes"] - mem["naive"]["grad_bytes"]
        )
        time_ratio = median["gkd"] / median["naive"]
        ratios.append(
            f"| {dtype} | {memory_ratio:.3f} ({_verdict(memory_ratio, TARGETS['memory'])}) "
            f"| {beyond_ratio:.3f} | {time_ratio:.2f} ({_verdict(time_ratio, TARGETS['time'])}; "
            f"goal {TARGETS['time_goal']}: {_verdict(time_ratio, TARGETS['time_goal'])}) "
            f"| {best['gkd'] / best['naive']:.2f} |"
        )
    traffic = measure_traffic(args.traffic_vocab, args.traffic_tokens)
    traffic_rows = [
        f"| {vocab} | {traffic[vocab]['gkd']:.0f} | {traffic[vocab]['gather']:.0f} "
        f"| {'met' if traffic[vocab]['gkd'] <= TARGETS['traffic'] else 'NOT met'} |"
        for vocab in args.traffic_vocab
    ]
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    threads = args.threads
    load_end = os.getloadavg()[0]
    busy = max(load_start, load_end) > (os.cpu_count() or 1)
    warning = (
        f"**Warning: the machine was oversubscribed (load average {load_start:.1f} at start, "
        f"{load_end:.1f} at the end, on {os.cpu_count()} cores): times are unreliable. Chunked "
        "code runs many more, smaller parallel regions than the naive one and suffers more when "
        "threads are descheduled; rerun on a quiet machine.**"
        if busy
        else f"Load average {load_start:.1f} at start, {load_end:.1f} at the end."
    )
    return "\n".join(
        [
            "## Logit losses",
            "",
            f"{now}; {_machine(args.device)}; {threads} threads.",
            "",
            warning,
            "",
            f"Forward KL at T=1, N={args.tokens} tokens, V={args.vocab} (logits = hidden @ W, "
            "student width 256, teacher width 512), forward + backward of the loss alone. "
            "`naive`: log_softmax of both in fp32, `q * (log q - log p)`, autograd. `gkd`: "
            "`methods.vocab_parallel.divergence` with the forward-KL kernel (default chunking).",
            "",
            "| dtype | impl | peak extra memory (MiB) | x logits size | of which beyond the "
            "logits' .grad (MiB) | median time (ms) | best time (ms) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"| dtype | memory gkd / naive (target <= {TARGETS['memory']}) | memory beyond the "
            f".grad, gkd / naive | time gkd / naive, medians (target <= {TARGETS['time']}) "
            "| time, best runs |",
            "|---|---|---|---|---|",
            *ratios,
            "",
            "Memory: each implementation in a fresh subprocess; "
            + (
                "`torch.cuda.max_memory_allocated` minus the memory allocated before the loss."
                if args.device == "cuda"
                else "resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs "
                "just before the loss) minus the resident size before it, with glibc's "
                "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the resident set. The "
                "student logits' .grad counts in both."
            )
            + f" Time: median (and best) of {args.repeats} alternating repeats in one fresh "
            "subprocess after a warm-up.",
            "",
            f"TP traffic at TP=2 (gloo), N={args.traffic_tokens}: payload bytes each rank hands to "
            "all_reduce/all_gather per token (wrapped and counted), forward + backward; "
            "`gather` = all-gather the fp32 student and teacher logit shards, then the naive loss.",
            "",
            "| V | gkd forward_kl (B/token) | gather logits (B/token) | <= 32 B/token |",
            "|---|---|---|---|",
            *traffic_rows,
            "",
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--traffic-vocab", nargs="+", type=int, default=[8192, 16384, 32768])
    parser.add_argument("--traffic-tokens", type=int, default=256)
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    # internal: the measurement subprocesses
    parser.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=list(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker == "memory":
        print(
            json.dumps(worker_memory(args.impl, args.tokens, args.vocab, args.dtype, args.device))
        )
        return
    if args.worker == "time":
        print(
            json.dumps(worker_time(args.tokens, args.vocab, args.dtype, args.device, args.repeats))
        )
        return
    section = run(args)
    print(section)
    if not args.no_write:
        output = Path(args.output)
        if not output.exists():
            output.write_text("# Benchmarks\n\nWritten by `make bench`; newest sections last.\n\n")
        with output.open("a") as handle:
            handle.write("\n" + section)
        print(f"appended to {output}", file=sys.stderr)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
