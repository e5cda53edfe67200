"""Writing and reading a teacher cache directory (layout in :mod:`.format` and the README).

Directory ``root``::

    header.json                    format, version, key, spec, dp_size (first writer creates it)
    shard-00003.part               rank 3's records while it writes (appended, fsynced per call)
    shard-00003.index.part         its index while it writes: int64 pairs (sample id, offset)
    shard-00003.bin / .index       after CacheWriter.close() (renamed from the .part files)
    shard-00003.done.json          records, bytes and sha256 of both files (written last)
    meta.json                      finalize(): everything a reader needs, every shard's checksum

Every JSON file is written under a temporary name and renamed. A killed writer leaves its
``.part`` files: the next writer of the same rank keeps the records whose index entry and data
are both complete (an index entry is appended only after its record is fsynced), truncates the
rest and continues; :meth:`CacheWriter.completed_samples` says which samples to skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gkd_cli.data.files import atomic_write
from gkd_cli.errors import GkdError
from gkd_cli.teacher_cache.format import QUANTIZATIONS, Layout, decode, encode
from methods.sparse_targets import REPRESENTATIONS, SAMPLED, TOPK, SparseTargets

FORMAT = "gkd-teacher-cache"
VERSION = 1
HEADER = "header.json"
META = "meta.json"
INDEX_ENTRY = np.dtype([("sample", "<i8"), ("offset", "<i8")])


class CacheError(GkdError, ValueError):
    """A teacher cache that cannot be used (mismatched, damaged, incomplete); says why and what
    to do."""


@dataclass(frozen=True)
class CacheKey:
    """What a cache is keyed to: the exact token sequences and the teacher. A reader expecting
    another key is refused, naming the differing field."""

    tokenizer_hash: str
    data_fingerprint: str
    """The training data's identity in its order (the example ids of the run's data order)."""
    seq_length: int
    vocab_size: int
    """The teacher's real (unpadded) vocabulary size."""
    teacher: str
    """The teacher checkpoint's identity (path and its metadata hash)."""


@dataclass(frozen=True)
class CacheSpec:
    """What each token's record holds."""

    kind: str
    """``topk`` or ``sampled``."""
    k: int = 0
    """Top-k entries per token (``topk``)."""
    samples: int = 0
    """Draws per token (``sampled``)."""
    temperature: float = 1.0
    """Temperature of the cached teacher distribution (a distillation must use the same)."""
    quantization: str = "u16log"
    """Top-k weights: ``fp16``, ``u16log`` or ``u8log`` (format docstring; unused by sampled)."""

    def __post_init__(self) -> None:
        if self.kind not in REPRESENTATIONS:
            raise CacheError(f"cache kind must be one of {REPRESENTATIONS}, got {self.kind!r}")
        if self.kind == TOPK and self.k < 1:
            raise CacheError(f"a top-k cache needs k >= 1, got k={self.k}")
        if self.kind == SAMPLED and not 1 <= self.samples <= 65535:
            raise CacheError(f"a sampled cache needs 1 <= samples <= 65535, got {self.samples}")
        if not self.temperature > 0:
            raise CacheError(f"cache temperature must be > 0, got {self.temperature}")
        if self.quantization not in QUANTIZATIONS:
            raise CacheError(
                f"cache quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )

    @property
    def slots(self) -> int:
        return self.k if self.kind == TOPK else self.samples


def layout_of(spec: CacheSpec, key: CacheKey) -> Layout:
    return Layout(spec.kind, spec.slots, key.seq_length, key.vocab_size, spec.quantization)


def _json_write(path: Path, value: Any) -> None:
    def write(temp: Path) -> None:
        with open(temp, "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _json_read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path} is damaged ({exc}); delete the cache and write it again") from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_name(rank: int) -> str:
    return f"shard-{rank:05d}"


def _compare(what: str, expected: dict, found: dict, root: Path) -> None:
    for name in expected:
        if expected[name] != found.get(name):
            raise CacheError(
                f"teacher cache {root} was written for {what}.{name}={found.get(name)!r}, this "
                f"run has {name}={expected[name]!r}: write a new cache for this run (gkd "
                "cache-teacher) or point teacher.cache at the matching one"
            )


def _header(spec: CacheSpec, key: CacheKey, dp_size: int) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "key": dataclasses.asdict(key),
        "spec": dataclasses.asdict(spec),
        "dp_size": dp_size,
        "layout": layout_of(spec, key).describe(),
    }


def _check_format(doc: dict, path: Path) -> None:
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CacheError(
            f"{path} is not a {FORMAT} version {VERSION} file (format={doc.get('format')!r}, "
            f"version={doc.get('version')!r})"
        )


class CacheWriter:
    """The writer of one data-parallel rank's shard (only tp rank 0 of the last pipeline stage
    of each dp rank writes). Resumes the shard a killed writer of the same rank left."""

    def __init__(self, root: Path, spec: CacheSpec, key: CacheKey, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise CacheError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.root, self.spec, self.key = Path(root), spec, key
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.layout = layout_of(spec, key)
        self.root.mkdir(parents=True, exist_ok=True)
        header = _header(spec, key, dp_size)
        header_path = self.root / HEADER
        if not header_path.exists():
            _json_write(header_path, header)  # every rank writes the same: the rename is atomic
        found = _json_read(header_path)
        _check_format(found, header_path)
        _compare("key", header["key"], found["key"], self.root)
        _compare("spec", header["spec"], found["spec"], self.root)
        _compare("layout", {"dp_size": dp_size}, found, self.root)
        base = self.root / _shard_name(dp_rank)
        self.data_path = base.with_suffix(".part")
        self.index_path = Path(f"{base}.index.part")
        self._reopen_finished(base)
        self._recover()
        self._data = open(self.data_path, "ab")
        self._index = open(self.index_path, "ab")

    def _reopen_finished(self, base: Path) -> None:
        """A finished shard is reopened for appending (meta.json no longer describes the cache)."""
        done, data, index = (
            Path(f"{base}.done.json"),
            base.with_suffix(".bin"),
            Path(f"{base}.index"),
        )
        if data.exists() and index.exists() and not self.data_path.exists():
            os.replace(data, self.data_path)
            os.replace(index, self.index_path)
        for stale in (done, self.root / META):
            if stale.exists():
                stale.unlink()

    def _recover(self) -> None:
        record = self.layout.record_bytes
        for path in (self.data_path, self.index_path):
            path.touch()
        entries = np.fromfile(self.index_path, dtype=INDEX_ENTRY)
        data_size = self.data_path.stat().st_size
        complete = entries["offset"] + record <= data_size
        keep = int(np.argmin(complete)) if not complete.all() else len(entries)
        entries = entries[:keep]
        with open(self.index_path, "r+b") as f:
            f.truncate(keep * INDEX_ENTRY.itemsize)
        with open(self.data_path, "r+b") as f:
            f.truncate(keep * record)
        if keep and int(entries["offset"][-1]) != (keep - 1) * record:
            raise CacheError(f"{self.index_path} is damaged; delete the cache and write it again")
        self._done = set(int(s) for s in entries["sample"])
        self._records = keep

    def completed_samples(self) -> set[int]:
        """Global sample ids already in this rank's shard (skip them when resuming)."""
        return set(self._done)

    def write(self, sample_ids: Sequence[int], targets: SparseTargets, seq_length: int) -> None:
        """One record per sample; ``targets`` cover ``seq_length * len(sample_ids)`` tokens,
        s-major (``position * b + sample``) like the logits."""
        b = len(sample_ids)
        if seq_length != self.key.seq_length:
            raise CacheError(f"seq_length {seq_length} != the cache's {self.key.seq_length}")
        if targets.num_tokens != seq_length * b:
            raise CacheError(
                f"targets cover {targets.num_tokens} tokens, expected seq_length * samples = "
                f"{seq_length} * {b}"
            )
        if (
            targets.kind != self.spec.kind
            or abs(targets.temperature - self.spec.temperature) > 1e-6
        ):
            raise CacheError(
                f"targets are {targets.kind} at temperature {targets.temperature}, the cache "
                f"holds {self.spec.kind} at {self.spec.temperature}"
            )
        records = [encode(self.layout, targets, i, b) for i in range(b)]
        entries = np.zeros(b, dtype=INDEX_ENTRY)
        entries["sample"] = np.asarray(sample_ids, dtype=np.int64)
        entries["offset"] = (self._records + np.arange(b)) * self.layout.record_bytes
        self._data.write(b"".join(records))
        self._data.flush()
        os.fsync(self._data.fileno())
        self._index.write(entries.tobytes())  # only after the records are on disk
        self._index.flush()
        os.fsync(self._index.fileno())
        self._records += b
        self._done.update(int(s) for s in sample_ids)

    def close(self) -> None:
        """Checksums, then the atomic rename of the finished shard files and its done note."""
        self._data.close()
        self._index.close()
        base = self.root / _shard_name(self.dp_rank)
        data, index = base.with_suffix(".bin"), Path(f"{base}.index")
        note = {
            "rank": self.dp_rank,
            "data": data.name,
            "index": index.name,
            "records": self._records,
            "data_bytes": self.data_path.stat().st_size,
            "data_sha256": sha256_of(self.data_path),
            "index_sha256": sha256_of(self.index_path),
        }
        os.replace(self.data_path, data)
        os.replace(self.index_path, index)
        _json_write(Path(f"{base}.done.json"), note)


def finalize(root: Path) -> dict:
    """After every rank closed its writer: ``meta.json`` with every shard's checksum. Refuses a
    cache with an unfinished rank (naming it) or a sample written twice."""
    root = Path(root)
    header = _json_read(root / HEADER)
    _check_format(header, root / HEADER)
    shards, missing, seen = [], [], 0
    for rank in range(header["dp_size"]):
        note_path = root / f"{_shard_name(rank)}.done.json"
        if not note_path.exists():
            missing.append(rank)
            continue
        note = _json_read(note_path)
        shards.append(note)
        seen += note["records"]
    if missing:
        raise CacheError(
            f"teacher cache {root}: dp rank(s) {missing} have not finished their shard; run gkd "
            "cache-teacher again (it resumes) before using the cache"
        )
    samples: set[int] = set()
    for note in shards:
        ids = np.fromfile(root / note["index"], dtype=INDEX_ENTRY)["sample"]
        samples.update(int(s) for s in ids)
    if len(samples) != seen:
        raise CacheError(f"teacher cache {root}: some samples were written by two ranks")
    meta = dict(header, shards=shards, samples=seen)
    _json_write(root / META, meta)
    return meta


class CacheReader:
    """A finished cache, checked: format, key (a mismatch names the field), every shard present
    with its size and sha256 (``verify=False`` skips the checksums)."""

    def __init__(self, root: Path, expected_key: CacheKey, *, verify: bool = True):
        self.root = Path(root)
        meta_path = self.root / META
        if not meta_path.exists():
            hint = "it is unfinished: run gkd cache-teacher again (it resumes)"
            if not self.root.exists():
                hint = "the directory does not exist"
            raise CacheError(f"no teacher cache at {self.root} ({META} missing): {hint}")
        meta = _json_read(meta_path)
        _check_format(meta, meta_path)
        _compare("key", dataclasses.asdict(expected_key), meta["key"], self.root)
        self.meta = meta
        self.key = expected_key
        self.spec = CacheSpec(**meta["spec"])
        self.layout = layout_of(self.spec, expected_key)
        if meta["layout"]["record_bytes"] != self.layout.record_bytes:
            raise CacheError(f"{meta_path}: record size disagrees with its spec (damaged)")
        shard_of, offset_of, sample_of = [], [], []
        self._files: list[Path] = []
        for i, note in enumerate(meta["shards"]):
            data, index = self.root / note["data"], self.root / note["index"]
            for path in (data, index):
                if not path.exists():
                    raise CacheError(
                        f"teacher cache {self.root}: shard file {path.name} is missing; the "
                        "cache is incomplete, write it again"
                    )
            if data.stat().st_size != note["data_bytes"]:
                raise CacheError(
                    f"teacher cache {self.root}: {data.name} has {data.stat().st_size} bytes, "
                    f"meta.json says {note['data_bytes']} (truncated or damaged)"
                )
            if verify:
                for path, field in ((data, "data_sha256"), (index, "index_sha256")):
                    if sha256_of(path) != note[field]:
                        raise CacheError(
                            f"teacher cache {self.root}: checksum mismatch for {path.name} "
                            "(damaged); write the cache again"
                        )
            entries = np.fromfile(index, dtype=INDEX_ENTRY)
            shard_of.append(np.full(len(entries), i, dtype=np.int64))
            offset_of.append(entries["offset"])
            sample_of.append(entries["sample"])
            self._files.append(data)
        samples = np.concatenate(sample_of) if sample_of else np.zeros(0, np.int64)
        order = np.argsort(samples, kind="stable")
        self._samples = samples[order]
        self._shard = np.concatenate(shard_of)[order] if shard_of else samples
        self._offset = np.concatenate(offset_of)[order] if offset_of else samples
        self._handles: dict[int, Any] = {}

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    def locate(self, sample_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, offset)`` of each sample; a sample not in the cache is refused."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        pos = np.searchsorted(self._samples, ids).clip(max=max(len(self._samples) - 1, 0))
        found = len(self._samples) > 0
        ok = self._samples[pos] == ids if found else np.zeros(len(ids), dtype=bool)
        if not ok.all():
            raise CacheError(
                f"teacher cache {self.root} has no record of sample(s) "
                f"{ids[~ok][:5].tolist()}: it was written for other data or is incomplete"
            )
        return self._shard[pos], self._offset[pos]

    def read(self, sample_ids: Sequence[int], seq_length: int) -> SparseTargets:
        """The targets of these samples, s-major ``[seq_length * len(sample_ids), K]``."""
        if seq_length != self.key.seq_length:
            raise CacheError(f"seq_length {seq_length} != the cache's {self.key.seq_length}")
        shards, offsets = self.locate(sample_ids)
        size = self.layout.record_bytes
        records = []
        for shard, offset in zip(shards.tolist(), offsets.tolist(), strict=True):
            f = self._handles.get(shard)
            if f is None:
                f = self._handles[shard] = open(self._files[shard], "rb")
            f.seek(offset)
            records.append(f.read(size))
        return decode(self.layout, records, self.spec.temperature)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
