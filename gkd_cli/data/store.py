"""Tokenized examples on disk: the one representation every corpus format becomes.

An example store is a folder-independent set of four files sharing a stem ``<stem>``:

``<stem>.bin``
    every example's token ids, concatenated (raw ``uint16`` when the vocabulary has at most
    65,536 ids, else ``uint32``), memory-mapped on read.
``<stem>.mask``
    one ``uint8`` per token: 1 when the token is a *target* (its prediction from the tokens before
    it counts in the loss), 0 for prompt, system and user tokens that are only context. Absent
    when every token is a target (plain text, ``text`` fields, megatron indexed datasets).
``<stem>.idx.npy``
    ``int64`` offsets ``[num_examples + 1]``: example ``i`` is tokens ``offsets[i]:offsets[i+1]``.
``<stem>.json``
    written last: version, dtype, counts, vocabulary size, and whatever the builder records
    (tokenizer hash, sources, options) under ``meta``.

Writers append examples with :meth:`ExampleStoreWriter.add` and publish with
:meth:`ExampleStoreWriter.finish`; everything is written under temporary names and renamed, the
index last, so an interrupted build leaves nothing that opens. Readers use
:meth:`ExampleStore.open`.

The first token of an example has no prediction (nothing precedes it in the example), so its mask
value is informational only; batching code uses ``mask[1:]`` as the label mask of
``tokens[:-1] -> tokens[1:]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gkd_cli.data.files import temp_path

STORE_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def store_paths(directory: str | os.PathLike, stem: str) -> dict[str, Path]:
    """The four files of the store ``stem`` in ``directory``."""
    d = Path(directory)
    return {
        "bin": d / f"{stem}.bin",
        "mask": d / f"{stem}.mask",
        "idx": d / f"{stem}.idx.npy",
        "json": d / f"{stem}.json",
    }


class ExampleStoreWriter:
    """Append tokenized examples, then :meth:`finish` (or :meth:`abort`).

    ``add(tokens, mask)``: ``tokens`` a sequence of ids in ``[0, vocab_size)``; ``mask`` ``None``
    (every token is a target) or a 0/1 sequence of the same length. Empty examples are refused
    (callers report them with their file and line before they get here).
    """

    def __init__(self, directory: str | os.PathLike, stem: str, *, vocab_size: int) -> None:
        self.paths = store_paths(directory, stem)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self._temps = {k: temp_path(self.directory, p.name) for k, p in self.paths.items()}
        self._bin = open(self._temps["bin"], "wb")  # noqa: SIM115 (closed in finish/abort)
        self._mask = open(self._temps["mask"], "wb")  # noqa: SIM115
        # Offsets stream to a raw temporary file (8 bytes per example, nothing kept in memory).
        self._ends_path = temp_path(self.directory, self.paths["idx"].name + ".raw")
        self._ends = open(self._ends_path, "wb")  # noqa: SIM115 (closed in finish/abort)
        self._temps["ends"] = self._ends_path
        self._count = 0
        self._total = 0
        self._any_masked = False
        self._targets = 0

    @property
    def num_examples(self) -> int:
        return self._count

    @property
    def num_tokens(self) -> int:
        return self._total

    def add(
        self, tokens: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None
    ) -> None:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("an example must be a non-empty 1-D sequence of token ids")
        self.add_batch(ids, np.asarray([len(ids)]), None if mask is None else np.asarray(mask))

    def add_batch(
        self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None
    ) -> None:
        """Append ``len(lengths)`` examples at once: ``tokens`` their ids concatenated,
        ``lengths`` their token counts (each >= 1), ``mask`` their masks concatenated or ``None``
        (every token a target). The same checks as :meth:`add`, done once per call."""
        ids = np.asarray(tokens, dtype=np.int64)
        sizes = np.asarray(lengths, dtype=np.int64)
        if ids.ndim != 1 or sizes.ndim != 1 or len(sizes) == 0 or int(sizes.sum()) != len(ids):
            raise ValueError(
                f"lengths (sum {int(sizes.sum()) if sizes.size else 0}) must add up to the "
                f"{len(ids)} tokens, with at least one example"
            )
        if (sizes < 1).any():
            raise ValueError("an example must be a non-empty 1-D sequence of token ids")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids.max() if ids.max() >= self.vocab_size else ids.min())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if mask is None:
            m = np.ones(len(ids), dtype=np.uint8)
        else:
            m = np.asarray(mask, dtype=np.uint8)
            if m.shape != ids.shape:
                raise ValueError(f"mask has {len(m)} entries for {len(ids)} tokens")
            if m.max(initial=0) > 1:
                raise ValueError("mask values must be 0 or 1")
            self._any_masked |= bool((m == 0).any())
        self._targets += int(m.sum())
        ids.astype(self.dtype).tofile(self._bin)
        m.tofile(self._mask)
        ends = self._total + np.cumsum(sizes)
        ends.astype(np.int64).tofile(self._ends)
        self._total = int(ends[-1])
        self._count += len(sizes)

    def abort(self) -> None:
        """Close and remove the temporary files; nothing is published."""
        self._bin.close()
        self._mask.close()
        self._ends.close()
        for temp in self._temps.values():
            if temp.exists():
                temp.unlink()

    def finish(self, meta: dict[str, Any] | None = None) -> ExampleStore:
        """Publish the store (index written last) and open it."""
        try:
            self._bin.close()
            self._mask.close()
            self._ends.close()
            if self.num_examples == 0:
                raise ValueError("no examples to write")
            offsets = np.lib.format.open_memmap(
                self._temps["idx"], mode="w+", dtype=np.int64, shape=(self._count + 1,)
            )
            offsets[0] = 0
            ends = np.memmap(self._ends_path, dtype=np.int64, mode="r", shape=(self._count,))
            step = 1 << 24
            for start in range(0, self._count, step):
                offsets[1 + start : 1 + start + step] = ends[start : start + step]
            offsets.flush()
            del offsets, ends
            index = {
                "version": STORE_VERSION,
                "dtype": self.dtype.name,
                "vocab_size": self.vocab_size,
                "num_examples": self.num_examples,
                "num_tokens": self.num_tokens,
                "num_targets": self._targets,
                "has_mask": self._any_masked,
                "meta": meta or {},
            }
            self._temps["json"].write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
            order = ["bin", "idx"] + (["mask"] if self._any_masked else []) + ["json"]
            for key in order:
                os.replace(self._temps[key], self.paths[key])
            if not self._any_masked and self.paths["mask"].exists():
                self.paths["mask"].unlink()  # a stale mask from an older build of this stem
        finally:
            for temp in self._temps.values():
                if temp.exists():
                    temp.unlink()
        return ExampleStore.open(self.directory, self.paths["json"].name[: -len(".json")])


class ExampleStore:
    """A read-only, memory-mapped example store (see the module docstring)."""

    def __init__(self, paths: dict[str, Path], index: dict[str, Any]) -> None:
        self.paths = paths
        self.index = index
        self.meta: dict[str, Any] = index.get("meta", {})
        self.vocab_size: int = index["vocab_size"]
        self.offsets: np.ndarray = np.load(paths["idx"], mmap_mode="r")
        self._tokens = np.memmap(paths["bin"], dtype=np.dtype(index["dtype"]), mode="r")
        self._mask = (
            np.memmap(paths["mask"], dtype=np.uint8, mode="r") if index["has_mask"] else None
        )

    @classmethod
    def open(cls, directory: str | os.PathLike, stem: str) -> ExampleStore:
        paths = store_paths(directory, stem)
        if not paths["json"].is_file():
            raise FileNotFoundError(f"no example store {paths['json']}")
        index = json.loads(paths["json"].read_text(encoding="utf-8"))
        if index.get("version") != STORE_VERSION:
            raise ValueError(
                f"{paths['json']}: store version {index.get('version')}, this gkd reads "
                f"{STORE_VERSION}; delete the cache folder to rebuild it"
            )
        return cls(paths, index)

    @classmethod
    def exists(cls, directory: str | os.PathLike, stem: str) -> bool:
        return store_paths(directory, stem)["json"].is_file()

    def __len__(self) -> int:
        return int(self.index["num_examples"])

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    @property
    def has_mask(self) -> bool:
        return self._mask is not None

    def lengths(self) -> np.ndarray:
        """``int64 [num_examples]`` token counts."""
        return np.diff(np.asarray(self.offsets))

    def tokens(self, i: int) -> np.ndarray:
        """Example ``i``'s token ids (a read-only view in the store's dtype)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self._tokens[a:b]

    def mask(self, i: int) -> np.ndarray:
        """Example ``i``'s ``uint8`` target mask (all ones when the store has no mask file)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        if self._mask is None:
            return np.ones(b - a, dtype=np.uint8)
        return self._mask[a:b]

    def all_tokens(self) -> np.ndarray:
        """Every token, concatenated (memory-mapped)."""
        return self._tokens
