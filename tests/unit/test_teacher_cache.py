"""The teacher cache format (gkd_cli.teacher_cache): bytes written as the README's "Teacher cache
format" section says (checked against values worked out by hand from that text), round trips,
refusals of mismatched, damaged and unfinished caches, resumption after a killed writer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gkd_cli.teacher_cache import (
    CacheError,
    CacheKey,
    CacheReader,
    CacheSpec,
    CacheWriter,
    finalize,
)
from gkd_cli.teacher_cache import format as fmt
from methods import sparse_targets as st

pytestmark = pytest.mark.unit

L, B, V = 4, 3, 50
KEY = CacheKey("tok-hash", "data-fp", L, V, "teacher@abc")


def _targets(kind, seed=0, batch=B, temperature=1.5):
    t = torch.randn(L * batch, V, generator=torch.Generator().manual_seed(seed)) * 3
    if kind == "topk":
        return st.from_logits_topk(t, 8, temperature=temperature)
    gen = torch.Generator().manual_seed(seed + 1)
    return st.from_logits_sampled(t, 12, temperature=temperature, generator=gen)


def _spec(kind, quantization="u16log"):
    return CacheSpec(kind, k=8, samples=12, temperature=1.5, quantization=quantization)


def _samples(targets, order, batch=B):
    """Rows of the s-major targets of the samples ``order`` (positions in the batch)."""

    def pick(x):
        x = x.view(L, batch, *x.shape[1:])
        return x[:, order].reshape(L * len(order), *x.shape[2:])

    return pick


def _write(root, kind, quantization="u16log", ids=(10, 11, 12), seed=0):
    writer = CacheWriter(root, _spec(kind, quantization), KEY, 0, 1)
    targets = _targets(kind, seed)
    writer.write(list(ids), targets, L)
    writer.close()
    finalize(root)
    return targets


def test_bit_packing_as_the_format_says():
    # 3-bit values 1, 2, 3 LSB-first: bits 1,0,0 | 0,1,0 | 1,1,0 -> byte 0 = 1+16+64+128, byte 1 = 0
    assert fmt.pack_bits(np.array([1, 2, 3]), 3) == bytes([209, 0])
    values = np.random.default_rng(0).integers(0, 2**17, size=101)
    assert (fmt.unpack_bits(fmt.pack_bits(values, 17), 101, 17) == values).all()
    wide = np.random.default_rng(1).integers(0, 2**30, size=37)  # the > 25-bit path
    assert (fmt.unpack_bits(fmt.pack_bits(wide, 30), 37, 30) == wide).all()
    assert fmt.unpack_bits(bytes([209, 0]), 3, 3).tolist() == [1, 2, 3]
    assert fmt.id_bits(49152) == 16 and fmt.id_bits(65535) == 16 and fmt.id_bits(65536) == 17


def test_weight_codes_as_the_format_says():
    q = np.array([1.0, math.exp(-1.0), 0.0, 1e-30])
    assert fmt.quantize(q, "u16log").tolist() == [0, 2048, 65535, 65534]
    assert fmt.quantize(q, "u8log").tolist() == [0, 16, 255, 254]
    assert fmt.dequantize(np.array([2048, 65535], dtype="<u2"), "u16log").tolist() == pytest.approx(
        [math.exp(-1.0), 0.0]
    )
    # the resolution the format states: half a code, in log space
    q = np.exp(-np.linspace(0.0, 15.0, 997))
    for quantization, scale in (("u16log", 2048.0), ("u8log", 16.0)):
        back = fmt.dequantize(fmt.quantize(q, quantization), quantization)
        assert np.abs(np.log(back) - np.log(q)).max() <= 0.5 / scale + 1e-6


def test_record_bytes_as_the_format_says(tmp_path):
    # V = 50: 6-bit ids. top-k k = 8 over L = 4 tokens: ids ceil(4*8*6/8) = 24, u16 weights 64,
    # tail 8, entropy 8 = 104 bytes; sampled n = 12: ids 36 + entropy 8 = 44 bytes
    assert fmt.Layout("topk", 8, L, V, "u16log").record_bytes == 104
    assert fmt.Layout("topk", 8, L, V, "u8log").record_bytes == 72
    assert fmt.Layout("sampled", 12, L, V, "u16log").record_bytes == 44
    _write(tmp_path, "topk")
    assert (tmp_path / "shard-00000.bin").stat().st_size == 3 * 104
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["layout"]["record_bytes"] == 104 and meta["samples"] == 3
    # the first record's first id, read by hand: the 6 low bits of byte 0
    first = (tmp_path / "shard-00000.bin").read_bytes()[0] & 0b111111
    targets = _targets("topk")
    assert first == int(targets.ids[0, 0])  # token 0 of sample 0 (row 0 of the s-major targets)


@pytest.mark.parametrize(
    "kind, quantization, tolerance",
    [
        ("topk", "fp32", 1e-6),
        ("topk", "fp16", 1e-3),
        ("topk", "u16log", 3e-4),
        ("topk", "u8log", 8e-2),
        ("sampled", "u16log", 0),
    ],
)
def test_round_trip_in_any_order(tmp_path, kind, quantization, tolerance):
    targets = _write(tmp_path, kind, quantization)
    reader = CacheReader(tmp_path, KEY)
    order = [2, 0, 1, 0]
    out = reader.read([12, 10, 11, 10], L)
    pick = _samples(targets, order)
    assert out.kind == kind and out.temperature == 1.5
    assert torch.equal(out.ids, pick(targets.ids))
    if kind == "topk":
        live = pick(targets.weights) > 0
        rel = (out.weights - pick(targets.weights)).abs() / pick(targets.weights).clamp(min=1e-12)
        assert float(rel[live].max()) <= tolerance + 1e-3  # + the renormalization
        total = out.weights.sum(1) + out.tail
        torch.testing.assert_close(total, torch.ones_like(total))
    else:
        assert torch.equal(out.weights, pick(targets.weights))  # counts / n: exact
    torch.testing.assert_close(out.entropy, pick(targets.entropy), atol=4e-3, rtol=1e-3)


@pytest.mark.parametrize("quantization, rel", [("fp32", 1e-6), ("u16log", 1e-3)])
def test_a_dense_cache_on_disk_gives_the_colocated_teachers_loss(tmp_path, quantization, rel):
    """k = V written and read back: the forward KL and its gradient equal the dense teacher's
    (vocab_parallel.divergence on its logits) within the weights' resolution."""
    from methods import vocab_kernels as vk
    from methods import vocab_parallel as vp

    g = torch.Generator().manual_seed(21)
    t = torch.randn(L * B, V, generator=g, dtype=torch.float64) * 2
    s = torch.randn(L * B, V, generator=g, dtype=torch.float64) * 2
    spec = CacheSpec("topk", k=V, temperature=1.5, quantization=quantization)
    writer = CacheWriter(tmp_path, spec, KEY, 0, 1)
    writer.write([0, 1, 2], st.from_logits_topk(t, V, temperature=1.5), L)
    writer.close()
    finalize(tmp_path)
    back = CacheReader(tmp_path, KEY).read([0, 1, 2], L)
    mask = torch.ones(L * B, dtype=torch.float64)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    cached = vp.divergence(vk.forward_kl_kernel, a, back, mask, temperature=1.5)
    dense = vp.divergence(vk.forward_kl_kernel, b, t, mask, temperature=1.5)
    cached.backward()
    dense.backward()
    assert cached.item() == pytest.approx(dense.item(), rel=rel)
    torch.testing.assert_close(a.grad, b.grad, rtol=rel * 10, atol=rel / 10)


def test_any_dp_layout_reads_any_sample(tmp_path):
    spec = _spec("topk")
    parts = {}
    for rank in range(2):  # dp=2: rank r wrote samples r, r+2, r+4
        ids = [rank, rank + 2, rank + 4]
        parts[rank] = (ids, _targets("topk", seed=rank))
        writer = CacheWriter(tmp_path, spec, KEY, rank, 2)
        writer.write(ids, parts[rank][1], L)
        writer.close()
    with pytest.raises(CacheError, match="no teacher cache"):
        CacheReader(tmp_path, KEY)  # not finalized yet
    finalize(tmp_path)
    reader = CacheReader(tmp_path, KEY)
    assert reader.num_samples == 6
    out = reader.read([5, 0], L)  # rank 1's third sample, rank 0's first
    expected_5 = _samples(parts[1][1], [2])(parts[1][1].ids)
    expected_0 = _samples(parts[0][1], [0])(parts[0][1].ids)
    assert torch.equal(out.ids.view(L, 2, -1)[:, 0], expected_5)
    assert torch.equal(out.ids.view(L, 2, -1)[:, 1], expected_0)
    with pytest.raises(CacheError, match=r"sample\(s\) \[9\]"):
        reader.read([9], L)


@pytest.mark.parametrize(
    "field", ["tokenizer_hash", "data_fingerprint", "seq_length", "vocab_size", "teacher"]
)
def test_a_key_mismatch_is_refused_naming_the_field(tmp_path, field):
    _write(tmp_path, "topk")
    other = {
        "tokenizer_hash": "x",
        "data_fingerprint": "y",
        "seq_length": 8,
        "vocab_size": 7,
        "teacher": "z",
    }
    key = CacheKey(**{**KEY.__dict__, field: other[field]})
    with pytest.raises(CacheError, match=f"key.{field}="):
        CacheReader(tmp_path, key)
    with pytest.raises(CacheError, match=f"key.{field}="):
        CacheWriter(tmp_path, _spec("topk"), key, 0, 1)


def test_writers_of_another_spec_or_dp_size_are_refused(tmp_path):
    CacheWriter(tmp_path, _spec("topk"), KEY, 0, 2).close()
    with pytest.raises(CacheError, match="spec.quantization="):
        CacheWriter(tmp_path, _spec("topk", "fp16"), KEY, 1, 2)
    with pytest.raises(CacheError, match="dp_size="):
        CacheWriter(tmp_path, _spec("topk"), KEY, 1, 4)
    with pytest.raises(CacheError, match=r"rank\(s\) \[1\]"):
        finalize(tmp_path)


def test_damaged_or_missing_shards_are_refused(tmp_path):
    _write(tmp_path, "topk")
    data = tmp_path / "shard-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="checksum mismatch for shard-00000.bin"):
        CacheReader(tmp_path, KEY)
    data.write_bytes(bytes(raw[:-3]))
    with pytest.raises(CacheError, match="truncated"):
        CacheReader(tmp_path, KEY)
    data.unlink()
    with pytest.raises(CacheError, match="shard-00000.bin is missing"):
        CacheReader(tmp_path, KEY)


def test_a_killed_writer_resumes(tmp_path):
    """A kill mid-write leaves a partial record (and possibly a partial index entry): the next
    writer keeps the complete records, drops the rest, and the finished cache reads back as if
    nothing happened."""
    spec = _spec("sampled")
    first, second = _targets("sampled", seed=3), _targets("sampled", seed=4)
    writer = CacheWriter(tmp_path, spec, KEY, 0, 1)
    writer.write([0, 1, 2], first, L)
    writer._data.write(b"\x07" * 30)  # the kill: half a record of the next call ...
    writer._data.flush()
    writer._index.write(b"\x01" * 9)  # ... and half an index entry
    writer._index.flush()
    del writer  # no close(): the process died
    resumed = CacheWriter(tmp_path, spec, KEY, 0, 1)
    assert resumed.completed_samples() == {0, 1, 2}
    resumed.write([3, 4, 5], second, L)
    resumed.close()
    finalize(tmp_path)
    out = CacheReader(tmp_path, KEY).read([0, 1, 2, 3, 4, 5], L)
    ids = out.ids.view(L, 6, -1)
    assert torch.equal(ids[:, :3].reshape(L * 3, -1), first.ids)
    assert torch.equal(ids[:, 3:].reshape(L * 3, -1), second.ids)
    # a finished shard can be reopened to add samples (meta.json is rewritten by finalize)
    again = CacheWriter(tmp_path, spec, KEY, 0, 1)
    assert again.completed_samples() == set(range(6))
    assert not (tmp_path / "meta.json").exists()
    again.close()
    assert finalize(tmp_path)["samples"] == 6


def test_bad_specs_and_targets_are_refused(tmp_path):
    with pytest.raises(CacheError, match="k >= 1"):
        CacheSpec("topk")
    with pytest.raises(CacheError, match="quantization"):
        CacheSpec("topk", k=4, quantization="int4")
    writer = CacheWriter(tmp_path, _spec("topk"), KEY, 0, 1)
    with pytest.raises(CacheError, match="seq_length"):
        writer.write([0, 1, 2], _targets("topk"), L + 1)
    with pytest.raises(CacheError, match="sampled at temperature"):
        writer.write([0, 1, 2], _targets("sampled"), L)
    with pytest.raises(CacheError, match="temperature"):
        writer.write([0, 1, 2], _targets("topk", temperature=2.0), L)
