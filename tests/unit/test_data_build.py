"""build_example_store: text stores equal today's token stream, the cache follows file contents,
workers do not change the output, and the mixture order follows the weights."""

import json

import numpy as np
import pytest

from gkd_cli.data.build import DataSource, build_example_store, mixture_counts, mixture_order
from gkd_cli.data.corpus import build_token_stream
from gkd_cli.data.tokenizer import train_bpe

pytestmark = pytest.mark.unit

TEXT = (
    "The cat sat on the mat.\nIt was warm.\n\nA second paragraph, longer than the first one, "
    "with some words.\n\n\nThird.\n"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "train.txt"
    path.write_text(TEXT * 3 + "prompt completion user assistant question answer\n")
    return train_bpe([path], 320)


@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text(TEXT)
    lines = tmp_path / "b.jsonl"
    lines.write_text(
        "\n".join(
            json.dumps(r)
            for r in ({"text": "first json doc"}, {"text": "   "}, {"text": "second\n\ndoc"})
        )
        + "\n\n"
    )
    return text, lines


@pytest.mark.parametrize("doc_split", ["paragraph", "line"])
def test_text_store_equals_token_stream(tmp_path, tok, corpus, doc_split):
    text, lines = corpus
    stream = build_token_stream([text, lines], tok, tmp_path / "s", doc_split=doc_split)
    store = build_example_store(
        [DataSource(path=str(text), doc_split=doc_split), DataSource(path=str(lines))],
        tok,
        tmp_path / "e",
    )
    expected = np.fromfile(stream.bin_path, dtype=stream.dtype)
    np.testing.assert_array_equal(store.all_tokens(), expected)
    assert len(store) == stream.num_documents
    assert not store.has_mask
    for i in range(len(store)):  # each example is one document closed by end-of-document
        assert store.tokens(i)[-1] == tok.eos_id
        assert tok.eos_id not in store.tokens(i)[:-1]
    sources = store.meta["sources"]
    assert [s["first_example"] for s in sources] == [0, sources[0]["num_examples"]]
    assert sources[1]["num_examples"] == 2  # the blank document is skipped, as in the stream
    assert sum(s["num_examples"] for s in sources) == len(store)


def test_cache_reused_rebuilt_on_content_change_and_weights_updated(tmp_path, tok, corpus):
    text, _ = corpus
    first = build_example_store([DataSource(path=str(text))], tok, tmp_path / "c")
    stamp = first.paths["bin"].stat().st_mtime_ns
    again = build_example_store([DataSource(path=str(text), weight=None)], tok, tmp_path / "c")
    assert again.paths == first.paths and again.paths["bin"].stat().st_mtime_ns == stamp
    reweighted = build_example_store([DataSource(path=str(text), weight=3.0)], tok, tmp_path / "c")
    assert reweighted.paths == first.paths and reweighted.meta["sources"][0]["weight"] == 3.0
    assert reweighted.paths["bin"].stat().st_mtime_ns == stamp  # not re-tokenized
    text.write_text(TEXT + "\nOne more paragraph.\n")
    changed = build_example_store([DataSource(path=str(text))], tok, tmp_path / "c")
    assert changed.paths != first.paths and len(changed) == len(first) + 1


def test_workers_give_identical_output(tmp_path, tok, monkeypatch):
    import gkd_cli.data.build as build

    monkeypatch.setattr(build, "CHUNK_RECORDS", 3)  # many chunks, so the order matters
    path = tmp_path / "many.jsonl"
    rows = [
        {"prompt": f"question {i}?", "completion": f" answer {i}" * (i % 4 + 1)} for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    progress = []
    one = build_example_store([DataSource(path=str(path))], tok, tmp_path / "one")
    two = build_example_store(
        [DataSource(path=str(path))],
        tok,
        tmp_path / "two",
        workers=2,
        progress=lambda *a: progress.append(a),
    )
    assert one.paths["bin"].read_bytes() == two.paths["bin"].read_bytes()
    assert one.paths["mask"].read_bytes() == two.paths["mask"].read_bytes()
    np.testing.assert_array_equal(one.offsets, two.offsets)
    assert progress[-1][0] == progress[-1][1] and progress[-1][2] == two.num_tokens
    assert [p[0] for p in progress] == sorted(p[0] for p in progress)


def test_mixture_counts_and_order(tmp_path, tok):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"alpha {i}"}) + "\n" for i in range(6)))
    b.write_text("".join(json.dumps({"text": f"beta {i}"}) + "\n" for i in range(3)))
    plain = build_example_store(
        [DataSource(path=str(a)), DataSource(path=str(b))], tok, tmp_path / "p"
    )
    np.testing.assert_array_equal(mixture_counts(plain), [6, 3])
    for epoch in (0, 1):  # no weights: a permutation of all examples, new each epoch
        assert sorted(mixture_order(plain, 5, epoch)) == list(range(9))
    assert not np.array_equal(mixture_order(plain, 5, 0), mixture_order(plain, 5, 1))
    np.testing.assert_array_equal(mixture_order(plain, 5, 1), mixture_order(plain, 5, 1))

    # Megatron-style shares: 1:3 of 8 samples -> 2 from a (6 examples), 6 from b (3 examples)
    weighted = build_example_store(
        [DataSource(path=str(a), weight=0.25), DataSource(path=str(b), weight=0.75)],
        tok,
        tmp_path / "p",
    )
    np.testing.assert_array_equal(mixture_counts(weighted, 8), [2, 6])
    order = mixture_order(weighted, 1, 0, 8)
    from_a = order[order < 6]
    from_b = order[order >= 6]
    assert len(from_a) == 2 and len(set(from_a)) == 2
    assert sorted(from_b) == [6, 6, 7, 7, 8, 8]  # every b example before any repeats twice
    # across epochs a subsampled source walks its permutation: 3 epochs x 2 = all 6 of a
    seen = np.concatenate([mixture_order(weighted, 1, e, 8) for e in range(3)])
    assert sorted(seen[seen < 6]) == list(range(6))


def test_config_fields_become_sources_and_groups_share_a_weight(tmp_path, tok):
    from gkd_cli.config import DataConfig
    from gkd_cli.data.formats import check_data_fields, config_sources

    files = []
    for name, n in (("a1", 2), ("a2", 6), ("b", 4)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(n)))
        files.append(str(path))
    data = DataConfig(
        tokenizer="t",
        format="auto",
        train_files=[str(tmp_path / "a*.jsonl"), files[2]],
        train_weights=[1, 1],
    )
    check_data_fields(data)
    sources = config_sources(
        data, data.train_files, lambda p: sorted(map(str, tmp_path.glob(p.rsplit("/", 1)[1])))
    )
    assert [s.group for s in sources] == ["train_files.0", "train_files.0", "train_files.1"]
    store = build_example_store(sources, tok, tmp_path / "c")
    # a* (8 examples: 2 + 6) and b share 1:1 of 16 samples: a1 2, a2 6, b 8
    np.testing.assert_array_equal(mixture_counts(store, 16), [2, 6, 8])
    with pytest.raises(ValueError, match="is JSON lines .* but data.format is text"):
        build_example_store([DataSource(path=files[2], format="text")], tok, tmp_path / "c")
    for bad, message in (
        (
            DataConfig(tokenizer="t", train_files=["x"], train_weights=[1, 2]),
            "one weight per entry",
        ),
        (DataConfig(tokenizer="t", train_files=["x"], train_weights=[0]), "sum to 0"),
        (DataConfig(tokenizer="t", workers=-1), "data.workers"),
        (DataConfig(tokenizer="t", prompt_field="q", completion_field="q"), "must differ"),
    ):
        with pytest.raises(ValueError, match=message):
            check_data_fields(bad)
