"""Token streams, fixed-length samples, sample order and data-parallel batch assignment."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gkd_cli.data.corpus import (
    TokenDataset,
    batch_indices,
    build_token_stream,
    global_batch,
    sample_order,
    stream_dtype,
)
from gkd_cli.data.tokenizer import train_bpe

pytestmark = pytest.mark.unit

PARAGRAPHS = [
    "Alpha beta gamma.\nStill the first document.",
    "Second document about dogs and cats.",
    "Third one: numbers 1 2 3, punctuation!",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    path.write_text("\n\n".join(PARAGRAPHS * 10), encoding="utf-8")
    return train_bpe([path], 300)


def _reference_stream(tokenizer, documents):
    out = []
    for document in documents:
        out += tokenizer.encode(document) + [tokenizer.eos_id]
    return np.asarray(out)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_paragraph_and_line_splitting(tokenizer, tmp_path):
    source = _write(tmp_path / "c.txt", "\n\n\n".join(PARAGRAPHS) + "\n")
    stream = build_token_stream([source], tokenizer, tmp_path / "cache")
    tokens = np.fromfile(stream.bin_path, dtype=stream.dtype)
    np.testing.assert_array_equal(tokens, _reference_stream(tokenizer, PARAGRAPHS))
    assert stream.num_documents == 3 and stream.dtype == "uint16"

    by_line = build_token_stream([source], tokenizer, tmp_path / "cache", doc_split="line")
    lines = [line for p in PARAGRAPHS for line in p.split("\n")]
    tokens = np.fromfile(by_line.bin_path, dtype=by_line.dtype)
    np.testing.assert_array_equal(tokens, _reference_stream(tokenizer, lines))
    assert by_line.bin_path != stream.bin_path


def test_jsonl_with_nested_field(tokenizer, tmp_path):
    rows = [{"passage": {"text": p}, "idx": i} for i, p in enumerate(PARAGRAPHS)]
    source = _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    stream = build_token_stream([source], tokenizer, tmp_path / "cache", text_field="passage.text")
    tokens = np.fromfile(stream.bin_path, dtype=stream.dtype)
    np.testing.assert_array_equal(tokens, _reference_stream(tokenizer, PARAGRAPHS))
    index = json.loads(stream.index_path.read_text())
    assert index["num_tokens"] == len(tokens)
    assert index["tokenizer_hash"] == tokenizer.hash
    assert index["sources"][0]["size"] == source.stat().st_size


def test_cache_reuse_and_staleness(tokenizer, tmp_path):
    source = _write(tmp_path / "c.txt", "\n\n".join(PARAGRAPHS))
    first = build_token_stream([source], tokenizer, tmp_path / "cache")
    assert first.rebuilt
    assert not build_token_stream([source], tokenizer, tmp_path / "cache").rebuilt
    _write(source, "\n\n".join(PARAGRAPHS[:2]))
    os.utime(source, ns=(1, 1))
    stale = build_token_stream([source], tokenizer, tmp_path / "cache")
    assert stale.rebuilt and stale.bin_path == first.bin_path
    np.testing.assert_array_equal(
        np.fromfile(stale.bin_path, dtype=stale.dtype),
        _reference_stream(tokenizer, PARAGRAPHS[:2]),
    )


def test_dtype_rule():
    assert stream_dtype(65536) == np.uint16
    assert stream_dtype(65537) == np.uint32


def test_input_errors_before_work(tokenizer, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="missing.txt does not exist"):
        build_token_stream([tmp_path / "missing.txt"], tokenizer, cache)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xc3\xa9 ok " * 3 + b"caf\xe9")
    # 3 x 9 bytes of valid text, then "caf" (3 bytes): the bad byte is at offset 30.
    with pytest.raises(ValueError, match=r"latin.txt is not valid UTF-8.*byte offset 30"):
        build_token_stream([latin], tokenizer, cache)
    empty = _write(tmp_path / "empty.txt", "\n   \n\n")
    with pytest.raises(ValueError, match="corpus is empty"):
        build_token_stream([empty], tokenizer, cache)
    with pytest.raises(ValueError, match="no corpus files"):
        build_token_stream([], tokenizer, cache)
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("chunk_bytes", [1, 3, 4, 1 << 20])
def test_utf8_offset_across_read_chunks(tmp_path, monkeypatch, chunk_bytes):
    from gkd_cli.data import documents

    monkeypatch.setattr(documents, "_CHECK_CHUNK_BYTES", chunk_bytes)
    data = "é東x".encode() * 2 + b"\xff" + "tail é".encode()
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    expected = data.index(b"\xff")
    with pytest.raises(ValueError, match=rf"byte offset {expected};"):
        documents.check_utf8(path)
    path.write_bytes(data.replace(b"\xff", b""))
    documents.check_utf8(path)


def test_bad_jsonl_leaves_nothing(tokenizer, tmp_path):
    cache = tmp_path / "cache"
    good = json.dumps({"text": "fine"})
    source = _write(tmp_path / "c.jsonl", f"{good}\n{good}\n{{broken\n")
    with pytest.raises(ValueError, match=r"c.jsonl:3: not valid JSON"):
        build_token_stream([source], tokenizer, cache)
    no_field = _write(tmp_path / "d.jsonl", f"{good}\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: no field 'text'"):
        build_token_stream([no_field], tokenizer, cache)
    assert list(cache.iterdir()) == []


def test_dataset_samples(tokenizer, tmp_path):
    source = _write(tmp_path / "c.txt", "\n\n".join(PARAGRAPHS * 4))
    stream = build_token_stream([source], tokenizer, tmp_path / "cache")
    reference = _reference_stream(tokenizer, PARAGRAPHS * 4)
    seq = 7
    dataset = TokenDataset(stream.bin_path, seq)
    assert len(dataset) == (len(reference) - 1) // seq
    for i in range(len(dataset)):
        np.testing.assert_array_equal(dataset[i], reference[i * seq : i * seq + seq + 1])
        assert dataset[i].dtype == np.int64
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    assert TokenDataset(stream.index_path, seq).num_tokens == len(reference)


def test_dataset_errors(tokenizer, tmp_path):
    source = _write(tmp_path / "c.txt", "Short.")
    stream = build_token_stream([source], tokenizer, tmp_path / "cache")
    n = stream.num_tokens
    with pytest.raises(ValueError, match=rf"has {n} tokens, but seq_length=64 needs at least 65"):
        TokenDataset(stream, 64)
    with pytest.raises(ValueError, match="seq_length"):
        TokenDataset(stream, 0)
    with open(stream.bin_path, "r+b") as handle:
        handle.truncate(2)
    with pytest.raises(ValueError, match="truncated or stale"):
        TokenDataset(stream, 1)
    with pytest.raises(ValueError, match="does not exist"):
        TokenDataset(tmp_path / "nothing.json", 4)


def test_sample_order_is_a_seeded_permutation():
    order = sample_order(50, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(50))
    np.testing.assert_array_equal(order, sample_order(50, seed=3, epoch=0))
    assert not np.array_equal(order, sample_order(50, seed=3, epoch=1))
    assert not np.array_equal(order, sample_order(50, seed=4, epoch=0))
    with pytest.raises(ValueError, match="seed"):
        sample_order(50, seed=-1, epoch=0)


def test_global_batches_walk_epochs_without_gaps():
    num_samples, gbs = 10, 4
    seen = np.concatenate([global_batch(step, gbs, num_samples, 7) for step in range(5)])
    expected = np.concatenate([sample_order(num_samples, 7, e) for e in range(2)])
    np.testing.assert_array_equal(seen, expected)


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_batch_indices_same_data_for_any_dp_size(micro_batch_size):
    gbs, num_samples, seed = 8, 37, 11
    for step in range(6):
        reference = global_batch(step, gbs, num_samples, seed).tolist()
        for dp_size in (1, 2, 4):
            if gbs % (micro_batch_size * dp_size):
                continue
            num_micro = gbs // (micro_batch_size * dp_size)
            flat = []
            for rank in range(dp_size):
                micro = batch_indices(step, gbs, rank, dp_size, micro_batch_size, num_samples, seed)
                assert len(micro) == num_micro
                for k, mb in enumerate(micro):
                    g = rank * num_micro + k
                    assert mb == reference[g * micro_batch_size : (g + 1) * micro_batch_size]
                flat += [i for mb in micro for i in mb]
            assert flat == reference


def test_batch_indices_errors():
    with pytest.raises(ValueError, match="divisible"):
        batch_indices(0, 6, 0, 4, 1, 10, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        batch_indices(0, 8, 2, 2, 1, 10, 0)
    with pytest.raises(ValueError, match="num_samples"):
        batch_indices(0, 8, 0, 2, 1, 0, 0)


def test_byte_order_mark_is_not_text(tmp_path):
    from gkd_cli.data.documents import iter_documents

    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfHello\n\nWorld\n")
    assert list(iter_documents(path)) == ["Hello", "World"]
    rows = tmp_path / "bom.jsonl"
    rows.write_bytes(b'\xef\xbb\xbf{"text": "Hi"}\n')
    assert list(iter_documents(rows)) == ["Hi"]
