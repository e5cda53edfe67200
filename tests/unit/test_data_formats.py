"""Formats into examples: prompt/completion masks by hand, Parquet/Arrow files written by pyarrow,
megatron indexed datasets written by megatron-core's IndexedDatasetBuilder, malformed inputs
(named by file and line or row) and the overlong policy."""

import json

import numpy as np
import pytest

from gkd_cli.data.build import DataSource, build_example_store
from gkd_cli.data.tokenizer import Tokenizer

pytestmark = pytest.mark.unit

WORDS = ["<|endoftext|>", "<s>", "<unk>", "what", "is", "two", "plus", "four", "five", "a", "b"]
ID = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer(bos: bool) -> Tokenizer:
    """A whitespace word-level tokenizer whose ids are known by hand (``WORDS``); with ``bos`` its
    post-processor frames a single text as ``<s> $A`` (as Llama's tokenizer.json does)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, processors

    hf = HF(models.WordLevel(ID, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        hf.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", ID["<s>"])]
        )
    return Tokenizer.from_hf(hf, eos_token="<|endoftext|>", unk_token="<unk>")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bos", [False, True])
def test_prompt_completion_mask_by_hand(tmp_path, bos):
    path = write_jsonl(
        tmp_path / "pc.jsonl",
        [
            {"prompt": "what is two plus two", "completion": "four"},
            {"prompt": "", "completion": "a b"},
        ],
    )
    store = build_example_store([DataSource(path=str(path))], word_tokenizer(bos), tmp_path / "c")
    head = [ID["<s>"]] if bos else []
    eos = ID["<|endoftext|>"]
    q = [ID[w] for w in "what is two plus two".split()]
    expected = [
        (head + q + [ID["four"], eos], [0] * len(head + q) + [1, 1]),
        (head + [ID["a"], ID["b"], eos], [0] * len(head) + [1, 1, 1]),
    ]
    assert len(store) == 2 and store.has_mask
    assert store.meta["sources"][0]["kind"] == "prompt_completion"
    for i, (ids, mask) in enumerate(expected):
        np.testing.assert_array_equal(store.tokens(i), ids)
        np.testing.assert_array_equal(store.mask(i), mask)


ROWS = [
    {"prompt": "what is two", "completion": "four", "text": "a b", "id": 1},
    {"prompt": "what is", "completion": "five five", "text": "b", "id": 2},
]


@pytest.mark.parametrize("fmt", ["parquet", "arrow-file", "arrow-stream", "jsonl"])
def test_table_formats_read_like_jsonl(tmp_path, fmt):
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_pylist(ROWS)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(table, path, row_group_size=1)
    elif fmt.startswith("arrow"):
        path = tmp_path / "d.arrow"
        new = pa.ipc.new_file if fmt == "arrow-file" else pa.ipc.new_stream
        with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=1):
                writer.write_batch(batch)
    else:
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    tok = word_tokenizer(False)
    store = build_example_store([DataSource(path=str(path))], tok, tmp_path / "c")
    eos = ID["<|endoftext|>"]
    np.testing.assert_array_equal(
        store.tokens(1), [ID["what"], ID["is"], ID["five"], ID["five"], eos]
    )
    np.testing.assert_array_equal(store.mask(1), [0, 0, 1, 1, 1])
    text = build_example_store([DataSource(path=str(path), kind="text")], tok, tmp_path / "c")
    np.testing.assert_array_equal(text.all_tokens(), [ID["a"], ID["b"], eos, ID["b"], eos])


def test_megatron_indexed_dataset_documents_become_examples(tmp_path):
    torch = pytest.importorskip("torch")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    documents = [[[3, 4, 5], [6, 0]], [[7, 8, 9, 10, 0]], [[5, 0]]]  # sentences per document
    for sentences in documents:
        for sentence in sentences:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    tok = word_tokenizer(False)
    store = build_example_store([DataSource(path=prefix + ".bin")], tok, tmp_path / "c")
    assert store.meta["sources"][0]["format"] == "indexed" and not store.has_mask
    assert [store.tokens(i).tolist() for i in range(len(store))] == [
        [3, 4, 5, 6, 0],
        [7, 8, 9, 10, 0],
        [5, 0],
    ]
    small = Tokenizer.from_hf(
        __import__("tokenizers").Tokenizer(
            __import__("tokenizers").models.WordLevel(
                {"<|endoftext|>": 0, "<unk>": 1, "x": 2}, unk_token="<unk>"
            )
        )
    )
    with pytest.raises(ValueError, match=r"corpus_text_document\.bin holds token id 10, outside"):
        build_example_store([DataSource(path=prefix)], small, tmp_path / "c")


def test_overlong_truncate_counts_and_refuse_names_the_line(tmp_path):
    rows = [
        {"prompt": "what is", "completion": "four"},
        {"prompt": "what is two plus two plus two", "completion": "four"},  # cut to the prompt
        {"prompt": "what", "completion": "a b a b a b"},  # cut inside the completion
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    tok = word_tokenizer(False)
    store = build_example_store(
        [DataSource(path=str(path))], tok, tmp_path / "c", max_length=4, overlong="truncate"
    )
    assert store.meta["truncated"] == 2 and store.meta["dropped"] == 1
    assert len(store) == 2 and store.lengths().tolist() == [4, 4]
    np.testing.assert_array_equal(store.mask(1), [0, 1, 1, 1])
    with pytest.raises(
        ValueError, match=r"long\.jsonl:2: the example has 9 tokens, more than the limit of 4"
    ):
        build_example_store(
            [DataSource(path=str(path))], tok, tmp_path / "r", max_length=4, overlong="refuse"
        )
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


CHATML = "{% for m in messages %}{{ m['role'] + ' ' + m['content'] + ' ' + eos_token }}{% endfor %}"
GOOD = {"prompt": "what", "completion": "four"}
CHAT_OK = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize(
    ("rows", "source", "message"),
    [
        ([GOOD, "{not json"], {}, r"bad\.jsonl:2: not valid JSON"),
        (
            [GOOD, {"prompt": "what", "completion": 4}],
            {},
            r"bad\.jsonl:2: field 'completion' \(completion\) is a number \(4\), not a string",
        ),
        (
            [GOOD, {"prompt": "what"}],
            {"kind": "prompt_completion"},
            r"bad\.jsonl:2: no field 'completion' \(completion\) in this record \(its keys: 'prompt'\)",
        ),
        (
            [GOOD, {"prompt": "what", "completion": "  "}],
            {},
            r"bad\.jsonl:2: the completion is empty",
        ),
        ([{"title": "x"}], {}, r"bad\.jsonl:1: cannot tell the kind of example.*its keys: 'title'"),
        ([{"text": ["a"]}], {}, r"bad\.jsonl:1: field 'text' \(text\) is a list"),
        ([{"text": "a"}, [1, 2]], {}, r"bad\.jsonl:2: the record is a list, not an object"),
        ([CHAT_OK, {"messages": []}], {}, r"bad\.jsonl:2: the message list 'messages' is empty"),
        (
            [CHAT_OK, {"messages": "hi"}],
            {},
            r"bad\.jsonl:2: field 'messages' is a string, not a list",
        ),
        (
            [CHAT_OK, {"messages": [{"role": "robot", "content": "x"}]}],
            {},
            r"bad\.jsonl:2: message 0 has role \"robot\"; roles are system, user, assistant",
        ),
        (
            [CHAT_OK, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}],
            {},
            r"bad\.jsonl:2: message 0 \(user\) has content a list .*not a string",
        ),
        (
            [CHAT_OK, {"messages": [{"role": "user", "content": "only a question"}]}],
            {},
            r"bad\.jsonl:2: no assistant message with content",
        ),
        ([CHAT_OK], {}, r"has no chat_template .*add a \"chat_template\" string"),
        (["\n"], {}, r"bad\.jsonl holds no records"),
    ],
)
def test_malformed_records_are_named_before_anything_is_written(tmp_path, rows, source, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cache = tmp_path / "cache"
    tok = word_tokenizer(False)
    if "chat_template" not in message:
        tok.template_config = {"chat_template": CHATML}
    with pytest.raises(ValueError, match=message):
        build_example_store([DataSource(path=str(path), **source)], tok, cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_bad_parquet_row_and_field_type_named_with_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "what", "completion": None}]), path)
    with pytest.raises(
        ValueError, match=r"bad\.parquet row 1: field 'completion' \(completion\) is null"
    ):
        build_example_store([DataSource(path=str(path))], word_tokenizer(False), tmp_path / "c")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet is not a readable Parquet file"):
        build_example_store(
            [DataSource(path=str(tmp_path / "junk.parquet"))], word_tokenizer(False), tmp_path / "c"
        )


def test_late_bad_record_aborts_without_publishing(tmp_path, monkeypatch):
    import gkd_cli.data.build as build

    monkeypatch.setattr(build, "PRECHECK_RECORDS", 2)
    rows = [GOOD] * 5 + [{"prompt": "what", "completion": 7}]
    path = write_jsonl(tmp_path / "late.jsonl", rows)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"late\.jsonl:6: field 'completion'"):
        build_example_store([DataSource(path=str(path))], word_tokenizer(False), cache)
    assert list(cache.iterdir()) == []


def test_config_errors(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [GOOD])
    tok = word_tokenizer(False)
    with pytest.raises(ValueError, match="give every data source a weight, or none"):
        build_example_store(
            [DataSource(path=str(path), weight=1.0), DataSource(path=str(path))], tok, tmp_path
        )
    with pytest.raises(ValueError, match="format must be one of"):
        build_example_store([DataSource(path=str(path), format="csv")], tok, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not exist"):
        build_example_store([DataSource(path=str(tmp_path / "nope.jsonl"))], tok, tmp_path)
    with pytest.raises(ValueError, match="overlong must be 'truncate' or 'refuse'"):
        build_example_store([DataSource(path=str(path))], tok, tmp_path, overlong="cut")  # type: ignore[arg-type]


def test_packed_stream_of_a_parquet_file_and_launch_checks(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from gkd_cli.data.build import check_sources
    from gkd_cli.data.corpus import TokenDataset, build_token_stream

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    tok = word_tokenizer(False)
    stream = build_token_stream([path], tok, tmp_path / "c", fmt="parquet")
    eos = ID["<|endoftext|>"]
    dataset = TokenDataset(stream, 2)
    assert stream.num_tokens == 5 and len(dataset) == 2
    np.testing.assert_array_equal(dataset[0], [ID["a"], ID["b"], eos])
    assert check_sources([DataSource(path=str(path))], tok) == ["prompt_completion"]
    with pytest.raises(ValueError, match=r"has no chat_template"):
        check_sources([DataSource(path=str(path), kind="chat")], tok)
    tok.template_config = {"chat_template": CHATML}
    with pytest.raises(ValueError, match=r"d\.parquet row 0: no field 'messages'"):
        check_sources([DataSource(path=str(path), kind="chat")], tok)
