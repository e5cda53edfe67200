"""Megatron indexed datasets (``prefix.bin`` + ``prefix.idx``) as examples.

Read with megatron-core's own :class:`megatron.core.datasets.indexed_dataset.IndexedDataset`, so
the files written by Megatron-LM's ``tools/preprocess_data.py`` (or
``IndexedDatasetBuilder``) are read exactly as Megatron reads them. Each *document* (its
sequences, e.g. sentences with ``--split-sentences``, concatenated) becomes one example with every
token a target; the tokens are taken as they are (no end-of-document id is added: Megatron-LM's
``--append-eod`` is where that is decided). The ids must come from the run's tokenizer: gkd checks
that they fit its vocabulary, the rest is the user's to ensure.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from gkd_cli.data.formats import indexed_prefix

CHUNK_TOKENS = 1 << 22
"""Tokens per chunk handed to the writer."""


def open_indexed(path: str):
    """megatron-core's ``IndexedDataset`` for ``path`` (``prefix``, ``prefix.bin`` or
    ``prefix.idx``); ``ValueError`` naming the files when they cannot be read."""
    prefix = indexed_prefix(path)
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError as error:  # pragma: no cover - megatron-core is a dependency
        raise ValueError(f"reading {prefix}.bin/.idx needs megatron-core: {error}") from None
    try:
        return IndexedDataset(prefix, multimodal=False, mmap=True)
    except Exception as error:  # megatron asserts on malformed index files
        raise ValueError(
            f"{prefix}.idx / {prefix}.bin is not a readable megatron indexed dataset "
            f"({type(error).__name__}: {error}); rebuild it with Megatron-LM's "
            "tools/preprocess_data.py"
        ) from None


def check_indexed(path: str, vocab_size: int | None = None) -> None:
    """Open the dataset; with ``vocab_size``, stream its tokens once and raise ``ValueError``
    naming the file, the largest id and the vocabulary when an id does not fit."""
    dataset = open_indexed(path)
    prefix = indexed_prefix(path)
    if len(dataset.document_indices) < 2:
        raise ValueError(f"{prefix}.idx holds no documents")
    if vocab_size is None:
        return
    tokens = np.memmap(f"{prefix}.bin", dtype=dataset.index.dtype, mode="r")
    largest = -1
    smallest = 0
    for start in range(0, len(tokens), CHUNK_TOKENS):
        block = tokens[start : start + CHUNK_TOKENS]
        largest = max(largest, int(block.max()))
        smallest = min(smallest, int(block.min()))
    if largest >= vocab_size or smallest < 0:
        bad = largest if largest >= vocab_size else smallest
        raise ValueError(
            f"{prefix}.bin holds token id {bad}, outside the tokenizer's vocabulary "
            f"[0, {vocab_size}): it was tokenized with another tokenizer; use that tokenizer "
            "(data.tokenizer) or re-run Megatron-LM's preprocessing with this one"
        )


def iter_indexed_chunks(
    path: str,
) -> Iterator[tuple[list[tuple[str, np.ndarray, None]], int]]:
    """``([(where, document tokens, None), ...], bytes)`` chunks of about :data:`CHUNK_TOKENS`
    tokens, documents in order (empty documents skipped). Call :func:`check_indexed` with the
    vocabulary first."""
    dataset = open_indexed(path)
    prefix = indexed_prefix(path)
    documents = np.asarray(dataset.document_indices, dtype=np.int64)
    itemsize = np.dtype(dataset.index.dtype).itemsize
    chunk: list[tuple[str, np.ndarray, None]] = []
    tokens = 0
    for d in range(len(documents) - 1):
        first, last = int(documents[d]), int(documents[d + 1])
        if last == first:
            continue
        if last - first == 1:
            ids = np.asarray(dataset[first], dtype=np.int64)
        else:
            ids = np.concatenate(dataset[first:last]).astype(np.int64)
        if len(ids) == 0:
            continue
        chunk.append((f"{prefix} document {d}", ids, None))
        tokens += len(ids)
        if tokens >= CHUNK_TOKENS:
            yield chunk, tokens * itemsize
            chunk, tokens = [], 0
    if chunk:
        yield chunk, tokens * itemsize
