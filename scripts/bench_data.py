"""Benchmark: tokens/s preparing a text corpus with gkd vs Megatron-LM's tools/preprocess_data.py.

    python scripts/bench_data.py --superglue /work/shared/data/superglue --out /tmp/bench \
        --size-mb 200 --workers 2 [--megatron-lm /path/to/Megatron-LM]

1. Corpus: every string of the SuperGLUE jsonl files (passages, questions, ...) is a document;
   documents are repeated in shuffled order (seeded) until the JSON-lines file reaches
   ``--size-mb`` MB (``{"text": ...}`` per line). Not committed.
2. Tokenizer: a byte-level BPE (gkd's ``train_bpe``, ``--vocab`` ids) trained on the first 4 MB,
   saved as ``tokenizer.json`` + ``tokenizer_config.json`` so transformers' AutoTokenizer (which
   Megatron-LM's ``HuggingFaceTokenizer`` uses) loads the same tokenizer.
3. gkd: ``build_example_store`` with ``--workers`` processes (text kind, end-of-document appended).
4. Megatron-LM (when ``--megatron-lm`` names a checkout whose ``megatron/core`` matches the
   installed megatron-core): ``tools/preprocess_data.py --json-keys text --append-eod --workers
   N --tokenizer-type HuggingFaceTokenizer``. Both outputs are compared token for token.

Prints one JSON object: per tool wall seconds, tokens, tokens/s, CPU seconds (user + system, the
tool's worker processes included) and tokens per CPU second, the 1-minute load average sampled
every 10 s while it ran (mean, min, max); the ratios gkd / Megatron of both rates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# megatron.training imports megatron-core's triton GPU kernels at import time; on a machine
# without triton (CPU-only), this stub module stands in for them (preprocessing never calls them).
_STUB = """
import importlib.abc, importlib.machinery, sys
_NAME = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if fullname == _NAME else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        def unavailable(*args, **kwargs):
            raise RuntimeError("batch-invariant kernels need triton")
        module.__getattr__ = lambda name: unavailable
sys.meta_path.insert(0, _Stub())
"""


class LoadSampler:
    """The machine's 1-minute load average, sampled every ``every`` seconds while a tool runs
    (``with LoadSampler() as load: ...``; then ``load.summary()``): on a shared machine the rates
    mean little without it."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        values = self.samples or [os.getloadavg()[0]]
        return {
            "mean": round(sum(values) / len(values), 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
        }


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (a tool's worker
    processes included once they are joined): less sensitive to a shared machine's load than wall
    time."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def strings(value):
    if isinstance(value, str):
        if len(value.split()) >= 3:
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def make_corpus(superglue: Path, out: Path, size_mb: float, seed: int) -> tuple[Path, int]:
    documents = []
    for path in sorted(superglue.rglob("*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                documents.extend(strings(json.loads(line)))
    documents = sorted(set(documents))
    target = int(size_mb * 1e6)
    corpus = out / "corpus.jsonl"
    rng = random.Random(seed)
    written = 0
    with open(corpus, "w", encoding="utf-8") as handle:
        while written < target:
            rng.shuffle(documents)
            for doc in documents:
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                handle.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
    return corpus, written


def make_tokenizer(corpus: Path, out: Path, vocab: int):
    from gkd_cli.data.tokenizer import train_bpe

    sample = out / "sample.jsonl"
    with open(corpus, encoding="utf-8") as src, open(sample, "w", encoding="utf-8") as dst:
        dst.write(src.read(4_000_000).rsplit("\n", 1)[0] + "\n")
    folder = out / "tokenizer"
    tok = train_bpe([sample], vocab, folder / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok, folder


def run_gkd(corpus: Path, tok, out: Path, workers: int) -> dict:
    from gkd_cli.data.build import DataSource, build_example_store

    start, cpu = time.perf_counter(), cpu_seconds()
    store = build_example_store(
        [DataSource(path=str(corpus), kind="text")],
        tok,
        out / f"gkd-cache-{workers}",
        workers=workers,
    )
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": store.num_tokens, "store": store}


def run_megatron(corpus: Path, folder: Path, out: Path, megatron: Path, workers: int) -> dict:
    stub = Path(tempfile.mkdtemp(prefix="bench-stub-"))
    (stub / "sitecustomize.py").write_text(_STUB)
    prefix = out / "megatron"
    command = [
        sys.executable,
        str(megatron / "tools" / "preprocess_data.py"),
        "--input",
        str(corpus),
        "--output-prefix",
        str(prefix),
        "--json-keys",
        "text",
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(folder),
        "--append-eod",
        "--workers",
        str(workers),
        "--log-interval",
        "1000000",
    ]
    env = {**os.environ, "PYTHONPATH": f"{stub}{os.pathsep}{megatron}"}
    start, cpu = time.perf_counter(), cpu_seconds()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if result.returncode:
        raise SystemExit(f"megatron preprocess_data failed:\n{result.stderr[-3000:]}")
    bin_path = Path(f"{prefix}_text_document.bin")
    return {"seconds": seconds, "cpu_seconds": cpu, "bin": bin_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--superglue", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--megatron-lm", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    corpus, size = make_corpus(args.superglue, args.out, args.size_mb, args.seed)
    tok, folder = make_tokenizer(corpus, args.out, args.vocab)
    report: dict = {"corpus_bytes": size, "vocab": tok.vocab_size, "workers": args.workers}
    with LoadSampler() as load:
        gkd = run_gkd(corpus, tok, args.out, args.workers)
    report["gkd"] = {
        "load_average": load.summary(),
        "seconds": round(gkd["seconds"], 1),
        "tokens": gkd["tokens"],
        "tokens_per_s": round(gkd["tokens"] / gkd["seconds"]),
        "mb_per_s": round(size / 1e6 / gkd["seconds"], 2),
        "cpu_seconds": round(gkd["cpu_seconds"], 1),
        "tokens_per_cpu_s": round(gkd["tokens"] / gkd["cpu_seconds"]),
    }
    if args.megatron_lm is not None:
        with LoadSampler() as load:
            meg = run_megatron(corpus, folder, args.out, args.megatron_lm, args.workers)
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(str(meg["bin"])[: -len(".bin")])
        tokens = np.memmap(meg["bin"], dtype=dataset.index.dtype, mode="r")
        same = bool(
            len(tokens) == gkd["tokens"]
            and np.array_equal(np.asarray(tokens), np.asarray(gkd["store"].all_tokens()))
        )
        report["megatron"] = {
            "seconds": round(meg["seconds"], 1),
            "tokens": int(len(tokens)),
            "tokens_per_s": round(len(tokens) / meg["seconds"]),
            "cpu_seconds": round(meg["cpu_seconds"], 1),
            "tokens_per_cpu_s": round(len(tokens) / meg["cpu_seconds"]),
            "identical_tokens": same,
            "load_average": load.summary(),
        }
        report["ratio_gkd_over_megatron"] = round(
            report["gkd"]["tokens_per_s"] / report["megatron"]["tokens_per_s"], 2
        )
        report["cpu_ratio_gkd_over_megatron"] = round(
            report["gkd"]["tokens_per_cpu_s"] / report["megatron"]["tokens_per_cpu_s"], 2
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
