"""The record layout of the teacher cache (see README, "Teacher cache format"): id bit-packing,
weight quantization, one fixed-size record per sample.

A record holds the ``L`` tokens of one sample (``L`` = the sequence length), each with ``K``
slots (``K`` = ``k`` for top-k, ``n`` draws for sampled), little-endian, sections in this order:

1. ``ids``: ``L * K`` unsigned integers of ``id_bits = ceil(log2(V + 1))`` bits each, token-major
   (token 0's K slots, then token 1's...), packed LSB-first (bit ``j`` of value ``i`` is bit
   ``(i * id_bits + j) % 8`` of byte ``(i * id_bits + j) // 8``), the section zero-padded to a
   whole byte. The value ``V`` marks an empty slot. Top-k: most likely first; sampled: the raw
   draws sorted by id (duplicates repeated: a token's weight is its count / n).
2. ``weights`` (top-k only): ``L * K`` codes of the teacher probabilities ``q`` at the cache
   temperature, by ``quantization``: ``fp32`` (IEEE single, exact: for tests and references);
   ``fp16`` (IEEE half of ``q``); ``u16log`` (uint16
   ``round(-ln(q) * 2048)``, so ``q = exp(-code / 2048)``, code 65535 = 0); ``u8log`` (uint8
   ``round(-ln(q) * 16)``, ``q = exp(-code / 16)``, code 255 = 0; ``q < e^-15.9`` saturates).
3. ``tail`` (top-k only): ``L`` fp16, the mass outside the kept ids.
4. ``entropy``: ``L`` fp16, the teacher's entropy ``H(q)`` in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from methods.sparse_targets import SAMPLED, TOPK, SparseTargets, merge_duplicates

QUANTIZATIONS = ("fp32", "fp16", "u16log", "u8log")
U16_SCALE = 2048.0
"""``u16log`` codes per nat (resolution 1/2048 nat: relative error of q at most 2.4e-4)."""
U8_SCALE = 16.0
"""``u8log`` codes per nat (resolution 1/16 nat: relative error of q at most 3.2%)."""


def id_bits(vocab_size: int) -> int:
    """Bits per packed id: enough for ``0 .. vocab_size`` (``vocab_size`` marks an empty slot)."""
    return max(1, math.ceil(math.log2(vocab_size + 1)))


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned ``values`` (< 2**bits) packed LSB-first, zero-padded to a whole byte."""
    v = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``count`` int64 values."""
    if bits <= 25:  # each value lies within 4 bytes from its first byte: gather and shift
        raw = np.frombuffer(data, dtype=np.uint8)
        padded = np.zeros(len(raw) + 4, dtype=np.uint32)
        padded[: len(raw)] = raw
        start = np.arange(count, dtype=np.int64) * bits
        byte, shift = start >> 3, (start & 7).astype(np.uint32)
        word = (
            padded[byte]
            | (padded[byte + 1] << np.uint32(8))
            | (padded[byte + 2] << np.uint32(16))
            | (padded[byte + 3] << np.uint32(24))
        )
        return ((word >> shift) & np.uint32((1 << bits) - 1)).astype(np.int64)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = np.left_shift(np.uint64(1), np.arange(bits, dtype=np.uint64))
    return (flat.reshape(count, bits).astype(np.uint64) @ weights).astype(np.int64)


def quantize(q: np.ndarray, quantization: str) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if quantization in ("fp32", "fp16"):
        return q.astype("<f4" if quantization == "fp32" else "<f2")
    scale, top, dtype = (
        (U16_SCALE, 65535, "<u2") if quantization == "u16log" else (U8_SCALE, 255, "u1")
    )
    if quantization not in ("u16log", "u8log"):
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    with np.errstate(divide="ignore"):
        code = np.rint(-np.log(q) * scale)
    code = np.where(q > 0, np.clip(code, 0, top - 1), top)
    return code.astype(dtype)


def dequantize(codes: np.ndarray, quantization: str) -> np.ndarray:
    if quantization in ("fp32", "fp16"):
        return codes.astype(np.float32)
    scale, top = (U16_SCALE, 65535) if quantization == "u16log" else (U8_SCALE, 255)
    c = codes.astype(np.float64)
    return np.where(codes == top, 0.0, np.exp(-c / scale)).astype(np.float32)


def weight_bytes(quantization: str) -> int:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    return {"fp32": 4, "u8log": 1}.get(quantization, 2)


@dataclass(frozen=True)
class Layout:
    """Sizes of one record (all derived from the spec and the key)."""

    kind: str
    slots: int
    seq_length: int
    vocab_size: int
    quantization: str

    @property
    def bits(self) -> int:
        return id_bits(self.vocab_size)

    @property
    def id_bytes(self) -> int:
        return (self.seq_length * self.slots * self.bits + 7) // 8

    @property
    def weight_bytes(self) -> int:
        if self.kind != TOPK:
            return 0
        return self.seq_length * self.slots * weight_bytes(self.quantization)

    @property
    def tail_bytes(self) -> int:
        return 2 * self.seq_length if self.kind == TOPK else 0

    @property
    def record_bytes(self) -> int:
        return self.id_bytes + self.weight_bytes + self.tail_bytes + 2 * self.seq_length

    def describe(self) -> dict:
        return {
            "id_bits": self.bits,
            "slots": self.slots,
            "seq_length": self.seq_length,
            "record_bytes": self.record_bytes,
            "sections": [
                ["ids", self.id_bytes],
                ["weights", self.weight_bytes],
                ["tail", self.tail_bytes],
                ["entropy", 2 * self.seq_length],
            ],
        }


def encode(layout: Layout, targets: SparseTargets, sample: int, batch: int) -> bytes:
    """The record of sample ``sample`` (column ``sample`` of an s-major ``[L * batch]`` target
    set): ``targets`` rows ``position * batch + sample``."""
    rows = slice(sample, None, batch)
    if targets.offset is not None:
        raise ValueError("the cache stores global ids: write the targets, not a local() view")
    ids = targets.ids[rows].cpu().numpy()
    weights = targets.weights[rows].cpu().double().numpy()
    if ids.shape != (layout.seq_length, layout.slots):
        raise ValueError(
            f"targets give {ids.shape} entries for a sample, the cache expects "
            f"{(layout.seq_length, layout.slots)} (seq_length, slots)"
        )
    if targets.entropy is None:
        raise ValueError("the cache stores the teacher's entropy: targets without it")
    parts = []
    if layout.kind == TOPK:
        stored = np.where(ids >= 0, ids, layout.vocab_size)
        parts.append(pack_bits(stored, layout.bits))
        parts.append(quantize(np.where(ids >= 0, weights, 0.0), layout.quantization).tobytes())
        assert targets.tail is not None
        parts.append(targets.tail[rows].cpu().numpy().astype("<f2").tobytes())
    else:
        n = layout.slots
        counts = np.rint(np.where(ids >= 0, weights, 0.0) * n).astype(np.int64)
        if (counts.sum(axis=1) != n).any():
            raise ValueError(f"sampled targets' weights must be counts / {n} summing to 1")
        # every row's counts sum to n: the flat expansion is row after row
        draws = np.sort(np.repeat(ids.reshape(-1), counts.reshape(-1)).reshape(-1, n), axis=1)
        parts.append(pack_bits(draws, layout.bits))
    parts.append(targets.entropy[rows].cpu().numpy().astype("<f2").tobytes())
    data = b"".join(parts)
    assert len(data) == layout.record_bytes
    return data


def decode(layout: Layout, records: list[bytes], temperature: float) -> SparseTargets:
    """The targets of ``records`` (one per sample, ``b`` of them), s-major ``[L * b, K]``."""
    b, length, slots = len(records), layout.seq_length, layout.slots
    ids = np.empty((b, length, slots), dtype=np.int64)
    weights = np.zeros((b, length, slots), dtype=np.float32)
    tail = np.zeros((b, length), dtype=np.float32)
    entropy = np.empty((b, length), dtype=np.float32)
    wdtype = {"fp32": "<f4", "fp16": "<f2", "u16log": "<u2", "u8log": "u1"}[layout.quantization]
    for i, rec in enumerate(records):
        view = memoryview(rec)
        pos = layout.id_bytes
        ids[i] = unpack_bits(view[:pos], length * slots, layout.bits).reshape(length, slots)
        if layout.kind == TOPK:
            codes = np.frombuffer(view[pos : pos + layout.weight_bytes], dtype=wdtype)
            weights[i] = dequantize(codes, layout.quantization).reshape(length, slots)
            pos += layout.weight_bytes
            tail[i] = np.frombuffer(view[pos : pos + layout.tail_bytes], dtype="<f2")
            pos += layout.tail_bytes
        entropy[i] = np.frombuffer(view[pos : pos + 2 * length], dtype="<f2")
    ids = np.where(ids >= layout.vocab_size, -1, ids)
    # s-major: token position outer, sample inner
    t_ids = torch.from_numpy(ids.transpose(1, 0, 2).reshape(length * b, slots).copy())
    t_ent = torch.from_numpy(entropy.T.reshape(-1).copy())
    if layout.kind == TOPK:
        w = torch.from_numpy(weights.transpose(1, 0, 2).reshape(length * b, slots).copy())
        w = torch.where(t_ids >= 0, w, 0.0)
        t_tail = torch.from_numpy(tail.T.reshape(-1).copy()).clamp(min=0.0)
        # quantization rounding: renormalize so the buckets sum to exactly 1
        total = w.sum(dim=1) + t_tail
        scale = torch.where(total > 0, 1.0 / total, 1.0)
        return SparseTargets(TOPK, t_ids, w * scale[:, None], t_tail * scale, t_ent, temperature)
    ones = torch.where(t_ids >= 0, 1.0 / slots, 0.0)
    m_ids, m_w = merge_duplicates(t_ids, ones)
    return SparseTargets(SAMPLED, m_ids, m_w, None, t_ent, temperature)
