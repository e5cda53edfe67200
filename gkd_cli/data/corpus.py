"""Tokenized corpora as memory-mapped token streams, fixed-length samples, and batch order.

Token stream. :func:`build_token_stream` tokenizes corpus files (see
:mod:`gkd_cli.data.documents` for the formats) into one flat stream in which every document is
followed by the tokenizer's end-of-document id. It is stored as ``tokens-<key>.bin`` (raw
``uint16`` when the vocabulary has at most 65,536 ids, else ``uint32``) plus ``tokens-<key>.json``
(dtype, token and document counts, vocabulary size, tokenizer hash, options, and each source file's
path, size and mtime). ``<key>`` hashes the file paths, the options and the tokenizer, so different
tokenizers never share a cache; a changed source file (size or mtime) makes the cache stale and it
is rebuilt. Both files are written under temporary names and renamed (the index last), so an
interrupted build leaves no cache that looks valid.

Samples. :class:`TokenDataset` cuts the stream into ``len = (num_tokens - 1) // seq_length``
samples; sample ``i`` is ``tokens[i * s : i * s + s + 1]`` (``s + 1`` tokens: the model input is the
first ``s``, the labels the last ``s``). Samples cross document boundaries (the end-of-document
token separates them), as in GPT pre-training.

Batch order. :func:`batch_indices` is a pure function of ``(step, seed)`` and the batch shape, so
resuming needs no sampler state; see its docstring for the rule that makes the data of a step
independent of the data-parallel size.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gkd_cli.data.documents import (
    EXAMPLE_FORMATS,
    CorpusFormat,
    DocSplit,
    check_corpus_files,
    describe_sources,
    ensure_documents,
    iter_batches,
    iter_documents,
)
from gkd_cli.data.files import atomic_write, temp_path
from gkd_cli.data.tokenizer import Tokenizer

INDEX_VERSION = 1

Progress = Callable[[int, int, int], None]
"""``progress(done_bytes, total_bytes, tokens_so_far)``: called after each batch of documents."""


def stream_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True, kw_only=True)
class TokenStream:
    """A built (or reused) token stream on disk."""

    bin_path: Path
    """The raw token file."""
    index_path: Path
    """The JSON index next to it."""
    num_tokens: int
    """Tokens in the stream (end-of-document tokens included)."""
    num_documents: int
    """Documents tokenized."""
    dtype: str
    """``"uint16"`` or ``"uint32"``."""
    rebuilt: bool
    """True when this call tokenized the corpus, False when a valid cache was reused."""


def _cache_key(files: Sequence[Path], tokenizer: Tokenizer, options: dict[str, Any]) -> str:
    identity = {
        "files": [str(f.resolve()) for f in files],
        "options": options,
        "tokenizer": tokenizer.hash,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _read_index(index_path: Path) -> dict[str, Any]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"token stream index {index_path} is unreadable ({error}); delete it and its .bin "
            "file to rebuild"
        ) from None
    required = ("version", "dtype", "num_tokens", "bin_file")
    if not isinstance(index, dict) or any(k not in index for k in required):
        raise ValueError(
            f"token stream index {index_path} lacks one of {required}; delete it and its .bin to "
            "rebuild"
        )
    return index


def _cache_is_fresh(index_path: Path, bin_path: Path, expected: dict[str, Any]) -> bool:
    if not (index_path.is_file() and bin_path.is_file()):
        return False
    try:
        index = _read_index(index_path)
    except ValueError:
        return False
    if any(index.get(k) != v for k, v in expected.items()):
        return False
    return bin_path.stat().st_size == index["num_tokens"] * np.dtype(index["dtype"]).itemsize


def build_token_stream(
    files: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    *,
    fmt: CorpusFormat = "auto",
    text_field: str = "text",
    doc_split: DocSplit = "paragraph",
    progress: Progress | None = None,
) -> TokenStream:
    """Tokenize ``files`` into a cached token stream in ``cache_dir`` (reused when fresh).

    Errors before any tokenization (``ValueError``): no files, a missing file, a file that is not
    UTF-8 (with the byte offset), a corpus without any document. A malformed JSON line is
    reported with its file and line number when reached.

    Rank coordination is the caller's: build on one rank, then open it everywhere.

    ``fmt`` ``parquet``, ``arrow`` or ``indexed``: the files are read by
    :func:`gkd_cli.data.build.build_example_store` (``text_field`` of each row, or each indexed
    document) and the stream is that example store's token file.
    """
    if fmt in EXAMPLE_FORMATS:
        return _stream_of_examples(files, tokenizer, Path(cache_dir), fmt, text_field, progress)
    paths = check_corpus_files(files)
    ensure_documents(paths, fmt=fmt, text_field=text_field, doc_split=doc_split)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    options = {"fmt": fmt, "text_field": text_field, "doc_split": doc_split}
    key = _cache_key(paths, tokenizer, options)
    bin_path = cache_dir / f"tokens-{key}.bin"
    index_path = cache_dir / f"tokens-{key}.json"
    sources = describe_sources(paths)
    expected = {
        "version": INDEX_VERSION,
        "tokenizer_hash": tokenizer.hash,
        "sources": sources,
        "options": options,
    }
    if _cache_is_fresh(index_path, bin_path, expected):
        index = _read_index(index_path)
        return TokenStream(
            bin_path=bin_path,
            index_path=index_path,
            num_tokens=index["num_tokens"],
            num_documents=index["num_documents"],
            dtype=index["dtype"],
            rebuilt=False,
        )

    dtype = stream_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    total_bytes = sum(s["size"] for s in sources)
    done_bytes = num_tokens = num_documents = 0
    temp_bin = temp_path(cache_dir, bin_path.name)
    temp_index = temp_path(cache_dir, index_path.name)
    try:
        with open(temp_bin, "wb") as out:
            for path in paths:
                documents = iter_documents(
                    path, fmt=fmt, text_field=text_field, doc_split=doc_split
                )
                for batch in iter_batches(documents):
                    encoded = tokenizer.encode_batch(batch)
                    chunk = np.fromiter(
                        itertools.chain.from_iterable((*ids, eos) for ids in encoded),
                        dtype=np.int64,
                    )
                    chunk.astype(dtype).tofile(out)
                    num_tokens += len(chunk)
                    num_documents += len(batch)
                    done_bytes += sum(len(d.encode("utf-8")) for d in batch)
                    if progress is not None:
                        progress(min(done_bytes, total_bytes), total_bytes, num_tokens)
        index = {
            **expected,
            "bin_file": bin_path.name,
            "dtype": dtype.name,
            "num_tokens": num_tokens,
            "num_documents": num_documents,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": eos,
        }
        temp_index.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        os.replace(temp_bin, bin_path)
        os.replace(temp_index, index_path)
    finally:
        for temp in (temp_bin, temp_index):
            if temp.exists():
                temp.unlink()
    if progress is not None:
        progress(total_bytes, total_bytes, num_tokens)
    return TokenStream(
        bin_path=bin_path,
        index_path=index_path,
        num_tokens=num_tokens,
        num_documents=num_documents,
        dtype=dtype.name,
        rebuilt=True,
    )


def _stream_of_examples(
    files: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    cache_dir: Path,
    fmt: str,
    text_field: str,
    progress: Progress | None,
) -> TokenStream:
    from gkd_cli.data.build import DataSource, build_example_store

    if not files:
        raise ValueError("no corpus files given: pass at least one file")
    kind = "auto" if fmt == "indexed" else "text"
    sources = [
        DataSource(path=str(f), format=fmt, kind=kind, text_field=text_field)  # type: ignore[arg-type]
        for f in files
    ]
    store = build_example_store(sources, tokenizer, cache_dir, progress=progress)
    index_path = store.paths["json"].with_name(store.paths["json"].stem + ".stream.json")
    index = {
        "version": INDEX_VERSION,
        "tokenizer_hash": tokenizer.hash,
        "bin_file": store.paths["bin"].name,
        "dtype": store.index["dtype"],
        "num_tokens": store.num_tokens,
        "num_documents": len(store),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "example_store": store.paths["json"].name,
    }
    atomic_write(
        index_path,
        lambda temp: temp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8"),
    )
    return TokenStream(
        bin_path=store.paths["bin"],
        index_path=index_path,
        num_tokens=store.num_tokens,
        num_documents=len(store),
        dtype=store.index["dtype"],
        rebuilt=True,
    )


class TokenDataset:
    """Fixed-length samples of ``seq_length + 1`` tokens from a token stream (memory-mapped).

    ``path``: the stream's ``.json`` index or its ``.bin`` file (the index must sit next to it),
    or a :class:`TokenStream`. ``dataset[i]`` is an ``int64`` array ``[seq_length + 1]``: input
    ``x = sample[:-1]``, labels ``y = sample[1:]``.
    """

    def __init__(self, path: str | os.PathLike | TokenStream, seq_length: int) -> None:
        if isinstance(path, TokenStream):
            path = path.index_path
        path = Path(path)
        index_path = path.with_suffix(".json") if path.suffix == ".bin" else path
        if not index_path.is_file():
            raise ValueError(
                f"token stream index {index_path} does not exist; build it with build_token_stream"
            )
        if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
            raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
        index = _read_index(index_path)
        bin_path = index_path.parent / index["bin_file"]
        dtype = np.dtype(index["dtype"])
        num_tokens = int(index["num_tokens"])
        if not bin_path.is_file():
            raise ValueError(f"token file {bin_path} (named by {index_path}) does not exist")
        size = bin_path.stat().st_size
        if size != num_tokens * dtype.itemsize:
            raise ValueError(
                f"token file {bin_path} has {size} bytes but its index promises {num_tokens} "
                f"{dtype.name} tokens ({num_tokens * dtype.itemsize} bytes); it is truncated or "
                "stale: delete both files to rebuild"
            )
        if num_tokens < seq_length + 1:
            raise ValueError(
                f"the corpus in {bin_path} has {num_tokens} tokens, but seq_length={seq_length} "
                f"needs at least {seq_length + 1} for one sample: add text or lower seq_length"
            )
        self.seq_length = seq_length
        """Tokens of model input per sample."""
        self.num_tokens = num_tokens
        """Tokens in the stream."""
        self.vocab_size: int | None = index.get("vocab_size")
        """Vocabulary size of the tokenizer that built the stream."""
        self.tokenizer_hash: str | None = index.get("tokenizer_hash")
        """Hash of that tokenizer (compare with ``Tokenizer.hash``)."""
        self.bin_path = bin_path
        self._tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_length

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside [0, {len(self)})")
        start = index * self.seq_length
        return np.array(self._tokens[start : start + self.seq_length + 1], dtype=np.int64)


def _check_nonnegative_int(name: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@functools.lru_cache(maxsize=4)
def _permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_samples)
    order.flags.writeable = False
    return order


def sample_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of samples in ``epoch``: a permutation of ``range(num_samples)`` (int64) drawn
    from a PCG64 generator seeded with ``(seed, epoch)``. Deterministic; read-only array."""
    _check_nonnegative_int("num_samples", num_samples, 1)
    _check_nonnegative_int("seed", seed)
    _check_nonnegative_int("epoch", epoch)
    return _permutation(int(num_samples), int(seed), int(epoch))


def global_batch(step: int, global_batch_size: int, num_samples: int, seed: int) -> np.ndarray:
    """The ``global_batch_size`` sample indices of ``step``, in order.

    Global position ``p = step * global_batch_size + j`` (``j < global_batch_size``) is sample
    ``sample_order(num_samples, seed, p // num_samples)[p % num_samples]``: epochs follow each
    other without gaps, and a batch may straddle two epochs.
    """
    _check_nonnegative_int("step", step)
    _check_nonnegative_int("global_batch_size", global_batch_size, 1)
    positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    epochs = positions // num_samples
    result = np.empty(global_batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        selected = epochs == epoch
        result[selected] = sample_order(num_samples, seed, int(epoch))[
            positions[selected] % num_samples
        ]
    return result


def batch_indices(
    step: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    num_samples: int,
    seed: int,
) -> list[list[int]]:
    """Microbatches (lists of sample indices) of data-parallel rank ``dp_rank`` at ``step``.

    Rule. The global batch ``G`` of the step (:func:`global_batch`) depends only on
    ``(step, global_batch_size, num_samples, seed)``. It is cut into ``global_batch_size /
    micro_batch_size`` global microbatches of consecutive entries, ``M_m = G[m*mbs : (m+1)*mbs]``.
    With ``num_micro = global_batch_size / (micro_batch_size * dp_size)`` microbatches per rank,
    microbatch ``k`` of rank ``r`` is global microbatch ``r * num_micro + k``; rank ``r`` thus
    sees the contiguous slice ``G[r * gbs/dp : (r+1) * gbs/dp]``. The union over ranks is ``G``
    whatever ``dp_size`` is, so runs at DP=1 and DP=2 see the same samples per step, and the
    result is a pure function of its arguments (resume needs no sampler state).
    """
    for name, value, minimum in (
        ("global_batch_size", global_batch_size, 1),
        ("dp_size", dp_size, 1),
        ("micro_batch_size", micro_batch_size, 1),
        ("num_samples", num_samples, 1),
        ("dp_rank", dp_rank, 0),
    ):
        _check_nonnegative_int(name, value, minimum)
    if dp_rank >= dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be < dp_size={dp_size}")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by micro_batch_size x "
            f"dp_size = {micro_batch_size} x {dp_size}"
        )
    num_micro = global_batch_size // (micro_batch_size * dp_size)
    batch = global_batch(step, global_batch_size, num_samples, seed)
    per_rank = num_micro * micro_batch_size
    mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [
        mine[k * micro_batch_size : (k + 1) * micro_batch_size].tolist() for k in range(num_micro)
    ]
