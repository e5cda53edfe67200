"""Files -> tokenized examples: :func:`build_example_store` and the mixture order.

The one path of example data: data files (:mod:`gkd_cli.data.formats` reads them) -> records ->
token ids and per-token target masks (text: every token; prompt/completion: the completion and
its end-of-document token; chat: assistant turns, :mod:`gkd_cli.data.chat`) -> an
:class:`~gkd_cli.data.store.ExampleStore` in the cache folder -> batches (example-aware batching
draws examples with :func:`mixture_order`).

Text documents become one example each, followed by the tokenizer's end-of-document id, so the
concatenated tokens of a text-only store equal :func:`gkd_cli.data.corpus.build_token_stream`'s
stream of the same files exactly.

Cache. The store is named ``examples-<key>`` where ``<key>`` hashes the *contents* of the source
files (SHA-256, streamed), their formats and field names, the build options (length limit and
policy) and the tokenizer (its hash, and the chat template for chat sources). Changing a file's
content rebuilds; renaming or touching it does not; building the same data again reuses the store.
Mixture weights are not part of the key: a changed weight is written into the reused store's
index. Everything is written under temporary names and published by renames, the index last, so
an interrupted or failed build (a malformed record found late) leaves nothing that opens.

Checks before tokenizing (``ValueError`` naming the file and line, or ``file row N`` for
Parquet/Arrow): missing files, encodings, unknown formats, the first records of every source
(fields present and of the right type, chat roles and content, the chat template renders). Later
records are checked as they stream; a bad one aborts the build with the same kind of message.

Scale. Records stream from disk in chunks of about 1 MB of text; with ``workers > 1`` the chunks
are tokenized by a pool of processes (at most ``2 * workers`` chunks in flight, results written in
input order, so the store is byte-identical to a one-worker build). Output is appended to the
store's files as it comes, so a corpus larger than memory never sits in memory.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gkd_cli.data import formats
from gkd_cli.data.documents import check_format, check_utf8
from gkd_cli.data.files import atomic_write
from gkd_cli.data.formats import DataSource, OverlongPolicy, Record
from gkd_cli.data.store import ExampleStore, ExampleStoreWriter, store_paths
from gkd_cli.data.tokenizer import Tokenizer

__all__ = [
    "BUILD_VERSION",
    "DataSource",
    "Progress",
    "build_example_store",
    "check_sources",
    "mixture_counts",
    "mixture_order",
]

BUILD_VERSION = 1
"""Bumped when the same inputs would give different tokens or masks."""

Progress = Callable[[int, int, int], None]
"""``progress(done_bytes, total_bytes, tokens_so_far)``, after each chunk of examples."""

CHUNK_CHARS = 1 << 20
"""Characters of text per chunk handed to a tokenizing worker."""
CHUNK_RECORDS = 4096
"""At most this many records per chunk."""
PRECHECK_RECORDS = 256
"""Records of each source validated (and, for chat, rendered) before any tokenization."""


# -- encoding (runs in the build process or in pool workers) -------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Encoder:
    tokenizer: Tokenizer
    max_length: int | None
    overlong: OverlongPolicy
    chat: Any = None
    """A :class:`gkd_cli.data.chat.ChatRenderer` for chat sources."""

    def encode(self, kind: str, items: list[tuple[str, Any]]) -> _Chunk:
        tok = self.tokenizer
        eos = tok.eos_id
        examples: list[tuple[str, list[int], list[int] | None]] = []
        if kind == "text":
            for (where, _), ids in zip(items, tok.encode_batch([p for _, p in items]), strict=True):
                examples.append((where, [*ids, eos], None))
        elif kind == "prompt_completion":
            prompts = tok.encode_batch_framed([p for _, (p, _) in items])
            completions = tok.encode_batch([c for _, (_, c) in items])
            for (where, _), p, c in zip(items, prompts, completions, strict=True):
                examples.append((where, [*p, *c, eos], [0] * len(p) + [1] * (len(c) + 1)))
        elif kind == "chat":
            for where, messages in items:
                ids, mask = self.chat.encode(messages, where)
                examples.append((where, ids, mask))
        else:  # pragma: no cover - decided by formats.decide_kind
            raise AssertionError(kind)
        return self.collect(examples)

    def collect(self, examples: Sequence[tuple[str, Any, Any]]) -> _Chunk:
        limit = self.max_length
        ids_parts: list[Sequence[int]] = []
        mask_parts: list[Sequence[int]] = []
        lengths: list[int] = []
        truncated = dropped = 0
        any_mask = any(m is not None for _, _, m in examples)
        for where, ids, mask in examples:
            if limit is not None and len(ids) > limit:
                if self.overlong == "refuse":
                    raise ValueError(
                        f"{where}: the example has {len(ids)} tokens, more than the limit of "
                        f"{limit}; shorten or remove it, or set data.overlong: truncate (keeps the "
                        "first tokens, counts the truncated examples)"
                    )
                ids = ids[:limit]
                mask = mask[:limit] if mask is not None else None
                truncated += 1
                if mask is not None and not any(mask[1:]):
                    dropped += 1  # truncation cut every target: nothing left to train on
                    continue
            ids_parts.append(ids)
            lengths.append(len(ids))
            if any_mask:
                mask_parts.append(mask if mask is not None else [1] * len(ids))
        flat = (
            np.concatenate([np.asarray(p, dtype=np.int64) for p in ids_parts])
            if ids_parts
            else np.zeros(0, dtype=np.int64)
        )
        flat_mask = None
        if any_mask:
            flat_mask = (
                np.concatenate([np.asarray(m, dtype=np.uint8) for m in mask_parts])
                if mask_parts
                else np.zeros(0, dtype=np.uint8)
            )
        return _Chunk(flat, np.asarray(lengths, dtype=np.int64), flat_mask, truncated, dropped)


@dataclass(frozen=True)
class _Chunk:
    tokens: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray | None
    truncated: int
    dropped: int


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(encoder: _Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(kind: str, items: list[tuple[str, Any]]) -> _Chunk:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode(kind, items)


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """A checked source: its concrete format and kind, files and content hash."""

    source: DataSource
    fmt: str
    kind: str
    files: list[Path]
    sha256: str
    size: int


def _raw_records(plan_source: DataSource, fmt: str, path: Path) -> Iterator[tuple[str, Any, int]]:
    if fmt == "jsonl":
        yield from formats.iter_jsonl_records(path)
    else:
        rows = formats.iter_table_records(path, fmt)
        next(rows)  # the column names
        yield from rows


def _records(source: DataSource, fmt: str, kind: str, path: Path) -> Iterator[Record]:
    """The examples' payloads of one source, validated, in file order."""
    if fmt == "text":
        yield from formats.iter_text_documents(path, source.doc_split)
        return
    for where, record, size in _raw_records(source, fmt, path):
        if kind == "text":
            text = formats.text_payload(record, source, where)
            if text is None:
                continue
            yield Record(where, text, size)
        elif kind == "prompt_completion":
            yield Record(where, formats.prompt_completion_payload(record, source, where), size)
        else:
            yield Record(where, formats.chat_payload(record, source, where), size)


def _first_record(source: DataSource, fmt: str, path: Path) -> tuple[str, Any] | None:
    for where, record, _ in _raw_records(source, fmt, path):
        return where, record
    return None


def _chunks(records: Iterator[Record]) -> Iterator[tuple[list[tuple[str, Any]], int]]:
    items: list[tuple[str, Any]] = []
    chars = nbytes = 0
    for record in records:
        items.append((record.where, record.payload))
        nbytes += record.size
        chars += record.size
        if chars >= CHUNK_CHARS or len(items) >= CHUNK_RECORDS:
            yield items, nbytes
            items, chars, nbytes = [], 0, 0
    if items:
        yield items, nbytes


def _file_sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        digest.update(b"\0file\0")
    return digest.hexdigest()


def _check_source(source: DataSource, encoder: _Encoder | None, *, digest: bool = True) -> _Plan:
    """Validate one source cheaply (before any tokenization) and hash its contents."""
    fmt = formats.resolve_format(source)
    files = formats.source_files(source)
    if fmt in ("text", "jsonl"):
        check_utf8(files[0])
    if fmt == "text":
        check_format(files[0], "text", source.text_field, limit_bytes=1 << 20)
        if source.kind not in ("auto", "text"):
            raise ValueError(
                f"data source {source.path}: kind {source.kind!r} needs records (jsonl, parquet or "
                "arrow); a plain-text file only holds text documents"
            )
        if source.doc_split not in ("paragraph", "line"):
            raise ValueError(
                f"data source {source.path}: doc_split must be 'paragraph' or 'line', got "
                f"{source.doc_split!r}"
            )
        kind = "text"
    elif fmt == "indexed":
        if source.kind not in ("auto", "text"):
            raise ValueError(
                f"data source {source.path}: a megatron indexed dataset holds tokenized documents "
                f"(kind text), not {source.kind!r}"
            )
        kind = "text"
    else:
        first = _first_record(source, fmt, files[0])
        if first is None:
            raise ValueError(f"data file {files[0]} holds no records")
        kind = formats.decide_kind(source, first[1], first[0])
    if fmt == "indexed":
        from gkd_cli.data.indexed import check_indexed

        if encoder is None:
            raise AssertionError("the vocabulary check needs the tokenizer")
        check_indexed(source.path, encoder.tokenizer.vocab_size)
    else:
        checked = []
        for n, record in enumerate(_records(source, fmt, kind, files[0])):
            checked.append((record.where, record.payload))
            if n + 1 >= PRECHECK_RECORDS:
                break
        if not checked:
            raise ValueError(
                f"data file {files[0]} holds no non-empty {kind} examples (format {fmt})"
            )
        if kind == "chat":
            if encoder is None or encoder.chat is None:
                raise AssertionError("chat sources need a chat renderer")
            for where, messages in checked[:32]:
                encoder.chat.encode(messages, where)
    return _Plan(
        source=source,
        fmt=fmt,
        kind=kind,
        files=files,
        sha256=_file_sha256(files) if digest else "",
        size=sum(f.stat().st_size for f in files),
    )


# -- the build -----------------------------------------------------------------------------------


def _key(plans: Sequence[_Plan], tokenizer: Tokenizer, options: dict[str, Any], chat: Any) -> str:
    identity = {
        "version": BUILD_VERSION,
        "sources": [{**p.source.identity(), "sha256": p.sha256} for p in plans],
        "options": options,
        "tokenizer": tokenizer.hash,
        "chat": chat.identity() if chat is not None else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _reuse(
    cache_dir: Path, stem: str, key: str, weights: list[float | None], groups: list[str | None]
) -> ExampleStore | None:
    if not ExampleStore.exists(cache_dir, stem):
        return None
    try:
        store = ExampleStore.open(cache_dir, stem)
    except (ValueError, OSError, KeyError, json.JSONDecodeError):
        return None
    if store.meta.get("key") != key:
        return None
    itemsize = np.dtype(store.index["dtype"]).itemsize
    if store.paths["bin"].stat().st_size != store.num_tokens * itemsize:
        return None
    recorded = [(s.get("weight"), s.get("group")) for s in store.meta.get("sources", [])]
    if recorded != list(zip(weights, groups, strict=True)):
        index = dict(store.index)
        index["meta"] = {
            **store.meta,
            "sources": [
                {**s, "weight": w, "group": g}
                for s, w, g in zip(store.meta["sources"], weights, groups, strict=True)
            ],
        }
        atomic_write(
            store.paths["json"],
            lambda temp: temp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8"),
        )
        store = ExampleStore.open(cache_dir, stem)
    return store


def _check_weights(sources: Sequence[DataSource]) -> list[float | None]:
    weights = [s.weight for s in sources]
    given = [w for w in weights if w is not None]
    if given and len(given) != len(weights):
        raise ValueError(
            "give every data source a weight, or none (none: every example once per epoch)"
        )
    for source in sources:
        w = source.weight
        if w is not None and (
            isinstance(w, bool) or not isinstance(w, int | float) or not np.isfinite(w) or w < 0
        ):
            raise ValueError(f"data source {source.path}: weight must be a number >= 0, got {w!r}")
    if given and not sum(given) > 0:  # type: ignore[arg-type]
        raise ValueError("the data source weights sum to 0: give at least one a positive weight")
    return [float(w) if w is not None else None for w in weights]


def build_example_store(
    sources: Sequence[DataSource],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    *,
    max_length: int | None = None,
    overlong: OverlongPolicy = "truncate",
    workers: int = 1,
    progress: Progress | None = None,
) -> ExampleStore:
    """Tokenize ``sources`` (in order) into one example store in ``cache_dir``, or reuse it.

    ``max_length``: the longest example allowed (tokens, end-of-document included; ``None``: no
    limit); a longer one is cut to its first ``max_length`` tokens (``overlong="truncate"``;
    counted in ``meta["truncated"]``; an example whose targets were all cut is dropped and counted
    in ``meta["dropped"]``) or stops the build with its file and line (``"refuse"``).
    ``workers``: tokenizing processes (the output does not depend on it).

    ``meta`` of the returned store: ``key``, ``tokenizer_hash``, ``eos_id``, ``options``,
    ``truncated``, ``dropped`` and ``sources``, one entry per source in order with ``path``,
    ``format``, ``kind``, ``weight`` (``None`` unless given), ``sha256``, ``first_example``,
    ``num_examples``, ``num_tokens``, ``truncated``, ``dropped``: source ``i``'s examples are
    ``first_example .. first_example + num_examples - 1``.

    Rank coordination is the caller's: build on one rank, then call again (or open) everywhere.
    """
    if not sources:
        raise ValueError("no data sources given: list at least one file")
    if overlong not in ("truncate", "refuse"):
        raise ValueError(f"overlong must be 'truncate' or 'refuse', got {overlong!r}")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
    ):
        raise ValueError(f"max_length must be an integer >= 2 or None, got {max_length!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    weights = _check_weights(sources)
    encoder = _make_encoder(sources, tokenizer, max_length, overlong)
    plans = [_check_source(source, encoder) for source in sources]
    options = {"max_length": max_length, "overlong": overlong}
    key = _key(plans, tokenizer, options, encoder.chat)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"examples-{key}"
    reused = _reuse(cache, stem, key, weights, [s.group for s in sources])
    if reused is not None:
        return reused
    return _build(plans, encoder, cache, stem, key, options, workers, progress)


def check_sources(sources: Sequence[DataSource], tokenizer: Tokenizer) -> list[str]:
    """The checks :func:`build_example_store` runs before tokenizing (files, formats, the first
    records, the chat template, an indexed dataset's vocabulary), without building; returns each
    source's example kind. For launch-time checks."""
    if not sources:
        raise ValueError("no data sources given: list at least one file")
    _check_weights(sources)
    encoder = _make_encoder(sources, tokenizer, None, "truncate")
    return [_check_source(s, encoder, digest=False).kind for s in sources]


def check_lengths(
    sources: Sequence[DataSource], tokenizer: Tokenizer, max_length: int, *, max_bytes: int
) -> bool:
    """Launch-time check of the ``refuse`` policy: tokenize every example of ``sources`` when
    they hold at most ``max_bytes`` in all and raise ``ValueError`` naming the file and line (or
    row) of the first example longer than ``max_length`` tokens; ``False`` (nothing checked) for
    larger data, which the build checks as it streams."""
    encoder = _make_encoder(sources, tokenizer, max_length, "refuse")
    plans = [_check_source(s, encoder, digest=False) for s in sources]
    if sum(p.size for p in plans) > max_bytes:
        return False
    for plan in plans:
        if plan.fmt == "indexed":
            from gkd_cli.data.indexed import iter_indexed_chunks

            for examples, _ in iter_indexed_chunks(plan.source.path):
                encoder.collect(examples)
            continue
        records = _records(plan.source, plan.fmt, plan.kind, plan.files[0])
        for items, _ in _chunks(records):
            encoder.encode(plan.kind, items)
    return True


def _make_encoder(
    sources: Sequence[DataSource],
    tokenizer: Tokenizer,
    max_length: int | None,
    overlong: OverlongPolicy,
) -> _Encoder:
    encoder = _Encoder(tokenizer=tokenizer, max_length=max_length, overlong=overlong)
    kinds = []
    for source in sources:  # chat is decided from first records; build the renderer if needed
        fmt = formats.resolve_format(source)
        if fmt in ("jsonl", "parquet", "arrow"):
            files = formats.source_files(source)
            first = _first_record(source, fmt, files[0]) if source.kind == "auto" else None
            kinds.append(formats.decide_kind(source, first[1], first[0]) if first else source.kind)
    if "chat" in kinds:
        from gkd_cli.data.chat import ChatRenderer

        encoder = _Encoder(
            tokenizer=tokenizer,
            max_length=max_length,
            overlong=overlong,
            chat=ChatRenderer.for_tokenizer(tokenizer),
        )
    return encoder


def _build(
    plans: list[_Plan],
    encoder: _Encoder,
    cache: Path,
    stem: str,
    key: str,
    options: dict[str, Any],
    workers: int,
    progress: Progress | None,
) -> ExampleStore:
    tokenizer = encoder.tokenizer
    total_bytes = sum(p.size for p in plans)
    done_bytes = 0
    writer = ExampleStoreWriter(cache, stem, vocab_size=tokenizer.vocab_size)
    source_meta: list[dict[str, Any]] = []
    pool = None
    try:
        if workers > 1:
            pool = _start_pool(encoder, workers)
        for plan in plans:
            first_example = writer.num_examples
            first_token = writer.num_tokens
            truncated = dropped = 0
            if plan.fmt == "indexed":
                from gkd_cli.data.indexed import iter_indexed_chunks

                chunks: Iterator[tuple[_Chunk, int]] = (
                    (encoder.collect(examples), nbytes)
                    for examples, nbytes in iter_indexed_chunks(plan.source.path)
                )
            else:
                records = _records(plan.source, plan.fmt, plan.kind, plan.files[0])
                chunks = _encoded(encoder, plan.kind, _chunks(records), pool, workers)
            for chunk, nbytes in chunks:
                if len(chunk.lengths):
                    writer.add_batch(chunk.tokens, chunk.lengths, chunk.mask)
                truncated += chunk.truncated
                dropped += chunk.dropped
                done_bytes += nbytes
                if progress is not None:
                    progress(min(done_bytes, total_bytes), total_bytes, writer.num_tokens)
            if writer.num_examples == first_example:
                raise ValueError(
                    f"data source {plan.source.path} gave no examples (format {plan.fmt}, kind "
                    f"{plan.kind}); every example was empty or dropped"
                )
            source_meta.append(
                {
                    "path": str(plan.files[0].resolve()),
                    "format": plan.fmt,
                    "kind": plan.kind,
                    "weight": plan.source.weight,
                    "group": plan.source.group,
                    "sha256": plan.sha256,
                    "first_example": first_example,
                    "num_examples": writer.num_examples - first_example,
                    "num_tokens": writer.num_tokens - first_token,
                    "truncated": truncated,
                    "dropped": dropped,
                }
            )
        meta = {
            "builder": "gkd_cli.data.build",
            "build_version": BUILD_VERSION,
            "key": key,
            "tokenizer_hash": tokenizer.hash,
            "eos_id": tokenizer.eos_id,
            "options": options,
            "truncated": sum(s["truncated"] for s in source_meta),
            "dropped": sum(s["dropped"] for s in source_meta),
            "sources": source_meta,
        }
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        store = writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if progress is not None:
        progress(total_bytes, total_bytes, store.num_tokens)
    return store


def _start_pool(encoder: _Encoder, workers: int) -> Any:
    """A pool of ``workers`` processes holding ``encoder``: forked where the platform allows (no
    ``if __name__ == "__main__"`` needed in the caller's script, as in Megatron-LM's
    preprocessing), each tokenizing single-threaded (``TOKENIZERS_PARALLELISM=false``)."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return context.Pool(workers, initializer=_init_worker, initargs=(encoder,))
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _encoded(
    encoder: _Encoder,
    kind: str,
    chunks: Iterator[tuple[list[tuple[str, Any]], int]],
    pool: Any,
    workers: int,
) -> Iterator[tuple[_Chunk, int]]:
    """Encode chunks in order: in this process, or on the pool with a bounded window."""
    if pool is None:
        for items, nbytes in chunks:
            yield encoder.encode(kind, items), nbytes
        return
    pending: collections.deque = collections.deque()
    for items, nbytes in chunks:
        pending.append((pool.apply_async(_encode_in_worker, (kind, items)), nbytes))
        if len(pending) >= 2 * workers:
            result, n = pending.popleft()
            yield result.get(), n
    while pending:
        result, n = pending.popleft()
        yield result.get(), n


# -- mixtures ------------------------------------------------------------------------------------


def _source_table(store: ExampleStore) -> list[dict[str, Any]]:
    sources = store.meta.get("sources")
    if not sources:
        return [{"first_example": 0, "num_examples": len(store), "weight": None}]
    return sources


def mixture_counts(store: ExampleStore, num_samples: int | None = None) -> np.ndarray:
    """Examples drawn from each source per epoch (``int64 [num_sources]``, summing to
    ``num_samples``, default the store's number of examples).

    No weights: each source's size (every example once per epoch when ``num_samples`` is the
    default). Weights (Megatron-LM's ``--data-path 0.3 a 0.7 b`` semantics): source ``i`` gets
    the share ``w_i / sum(w)`` of the samples, rounded by largest remainder (ties to the earlier
    source), whatever its size; a source smaller than its share repeats examples, a larger one is
    subsampled. Sources of one ``group`` (the files one glob matched) share its weight in
    proportion to their numbers of examples.
    """
    sources = _source_table(store)
    total = len(store) if num_samples is None else int(num_samples)
    if total < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    weights = [s.get("weight") for s in sources]
    if all(w is None for w in weights):
        shares = np.asarray([s["num_examples"] for s in sources], dtype=np.float64)
    else:
        sizes = np.asarray([s["num_examples"] for s in sources], dtype=np.float64)
        groups = [s.get("group") or f"#{i}" for i, s in enumerate(sources)]
        group_size = {g: sizes[[h == g for h in groups]].sum() for g in set(groups)}
        shares = np.asarray(
            [(w or 0.0) * n / group_size[g] for w, n, g in zip(weights, sizes, groups, strict=True)]
        )
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    if remainder:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:remainder]] += 1
    return counts


def mixture_order(
    store: ExampleStore, seed: int, epoch: int, num_samples: int | None = None
) -> np.ndarray:
    """The example indices of ``epoch`` of the mixture (``int64 [num_samples]``), deterministic in
    ``(store sources, seed, epoch, num_samples)``.

    Source ``i`` contributes ``c_i = mixture_counts(...)[i]`` draws. Its examples are walked in
    a sequence of permutations (PCG64 seeded with ``(seed, i, cycle)``), continuing across epochs:
    epoch ``e`` takes positions ``e * c_i .. (e + 1) * c_i - 1`` of that walk, so a subsampled
    source shows new examples each epoch and a repeated one shows every example before any twice.
    The draws of all sources are then shuffled together (PCG64 seeded with ``(seed, epoch,
    2**32)``). Without weights and with the default ``num_samples`` this is a permutation of all
    examples, reshuffled every epoch.
    """
    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    counts = mixture_counts(store, num_samples)
    parts = []
    for i, (source, count) in enumerate(zip(_source_table(store), counts, strict=True)):
        n = int(source["num_examples"])
        if count == 0:
            continue
        start = int(epoch) * int(count)
        positions = np.arange(start, start + int(count), dtype=np.int64)
        cycles = positions // n
        picked = np.empty(int(count), dtype=np.int64)
        for cycle in np.unique(cycles):
            sel = cycles == cycle
            perm = np.random.Generator(np.random.PCG64([int(seed), i, int(cycle)])).permutation(n)
            picked[sel] = perm[positions[sel] % n]
        parts.append(picked + int(source["first_example"]))
    order = np.concatenate(parts)
    rng = np.random.Generator(np.random.PCG64([int(seed), int(epoch), 1 << 32]))
    return order[rng.permutation(len(order))]


def store_files(store: ExampleStore) -> list[Path]:
    """The files of ``store`` that exist (for cleanup and size reports)."""
    return [
        p
        for p in store_paths(store.paths["json"].parent, store.paths["json"].stem).values()
        if p.exists()
    ]
