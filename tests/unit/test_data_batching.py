"""Example-aware batches (gkd_cli.data.batching): rows, masks, example ids, order and epochs.

References are written by hand from the definitions (which label of a prompt/completion example
counts, where a packed example starts), not computed by the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from gkd_cli.data import TokenDataset, batch_indices, build_token_stream, iter_documents
from gkd_cli.data.batching import (
    PackedRows,
    PaddedRows,
    StreamRows,
    collate,
    epochs_covered,
    local_example_ids,
    make_rows,
    step_microbatches,
    step_rows,
)
from gkd_cli.data.store import ExampleStoreWriter

pytestmark = pytest.mark.unit


def store_of(tmp_path, examples, name="s"):
    """``examples``: list of (tokens, mask or None)."""
    writer = ExampleStoreWriter(tmp_path, name, vocab_size=100)
    for tokens, mask in examples:
        writer.add(tokens, mask)
    return writer.finish()


def random_store(tmp_path, n=23, seed=0, max_len=9, name="r"):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(2, max_len + 1))
        prompt = int(rng.integers(1, length))
        examples.append(
            (rng.integers(1, 100, length).tolist(), [0] * prompt + [1] * (length - prompt))
        )
    return store_of(tmp_path, examples, name)


def test_padded_row_masks_a_prompt_and_the_padding(tmp_path):
    # prompt 11 12 13, completion 21 22 (targets), seq_length 8
    store = store_of(tmp_path, [([11, 12, 13, 21, 22], [0, 0, 0, 1, 1])])
    rows = PaddedRows(store, 8, seed=0, pad_id=99)
    row = rows.row(0, 0)
    assert row.tokens.tolist() == [11, 12, 13, 21, 22, 99, 99, 99, 99]
    # position i predicts tokens[i+1]: 13 -> 21 and 21 -> 22 count; nothing else
    assert row.label_mask.tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    # label-free methods also distill at the last answer position (22, no label inside)
    assert row.distill_mask.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert row.example_ids.tolist() == [0, 0, 0, 0, 0, -1, -1, -1]


def test_plain_text_example_counts_every_label_but_its_last_position(tmp_path):
    store = store_of(tmp_path, [([5, 6, 7], None)])
    row = PaddedRows(store, 4, seed=0).row(0, 0)
    assert row.label_mask.tolist() == [1, 1, 0, 0]
    assert row.distill_mask.tolist() == [1, 1, 1, 0]


def test_packed_rows_restart_positions_and_never_count_across_examples(tmp_path):
    examples = [([1, 2, 3], [0, 1, 1]), ([4, 5], None), ([6, 7, 8, 9], [0, 0, 1, 1])]
    store = store_of(tmp_path, examples)
    rows = PackedRows(store, 8, seed=0, shuffle=False, pad_id=0)
    assert rows.rows_in_epoch(0) == 2  # 3 + 2 fit 8; 4 more do not (next-fit)
    first, second = rows.row(0, 0), rows.row(0, 1)
    assert first.tokens.tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 0]
    assert first.positions[:5].tolist() == [0, 1, 2, 0, 1]
    assert first.example_ids.tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    # 1->2, 2->3 count; 3->4 crosses into example 1: never; 4->5 counts; 5->pad never
    assert first.label_mask.tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert second.tokens[:4].tolist() == [6, 7, 8, 9]
    assert second.label_mask.tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    batch = collate([first, second], packed=True)
    assert batch["example_ids"].tolist() == [
        [0, 0, 0, 1, 1, -1, -1, -1],
        [2, 2, 2, 2, -1, -1, -1, -1],
    ]
    assert batch["packed"] is True


def test_local_example_ids_number_runs_in_row_order():
    ids = np.array([[7, 7, 3, -1], [3, 3, 3, 3], [-1, -1, -1, -1], [5, 9, 9, -1]])
    assert local_example_ids(ids).tolist() == [
        [0, 0, 1, -1],
        [2, 2, 2, 2],
        [-1, -1, -1, -1],
        [3, 4, 4, -1],
    ]


def test_overlong_examples_are_refused_or_truncated_with_a_count(tmp_path):
    store = store_of(tmp_path, [([1, 2], None), ([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 1, 1])])
    with pytest.raises(ValueError, match=r"example 1 .* 6 tokens.*data.seq_length=4.*overlong"):
        make_rows(store, "padded", 4, seed=0)
    rows = make_rows(store, "packed", 4, seed=0, overlong="truncate", shuffle=False)
    assert rows.truncated == 1
    cut = rows.row(0, 1)
    assert cut.tokens[:4].tolist() == [1, 2, 3, 4]
    assert cut.label_mask.tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="data.mode"):
        make_rows(store, "bucketed", 4, seed=0)


@pytest.mark.parametrize("mode", ["stream", "padded", "packed"])
def test_same_rows_in_the_same_order_at_every_dp_size_and_after_resume(tmp_path, mode):
    store = random_store(tmp_path)
    gbs = 8

    def seen(dp, mbs, steps):
        rows = make_rows(store, mode, 12, seed=3)  # a fresh object per run: no state carried
        order = []
        for step in steps:
            for rank in range(dp):
                for micro in step_microbatches(rows, step, gbs, rank, dp, mbs):
                    order.extend(micro)
        return order

    reference = seen(1, 1, range(7))
    for dp, mbs in ((1, 2), (2, 1), (2, 2), (4, 2), (8, 1)):
        assert seen(dp, mbs, range(7)) == reference
    # resuming at step 4 (a new process: new objects) continues exactly
    assert seen(2, 2, range(4)) + seen(2, 2, range(4, 7)) == reference


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_epochs_visit_every_example_once_reshuffled_deterministically(tmp_path, mode):
    store = random_store(tmp_path)
    rows = make_rows(store, mode, 12, seed=5)
    orders = []
    for epoch in range(3):
        ids = [rows.row(epoch, r).example_ids for r in range(rows.rows_in_epoch(epoch))]
        flat = np.concatenate(ids)
        order = list(dict.fromkeys(flat[flat >= 0].tolist()))
        assert sorted(order) == list(range(len(store)))  # every example once per epoch
        assert sum(len(set(i[i >= 0].tolist())) for i in ids) == len(store)
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    again = make_rows(store, mode, 12, seed=5)
    assert [again.row(1, r).tokens.tolist() for r in range(again.rows_in_epoch(1))] == [
        rows.row(1, r).tokens.tolist() for r in range(rows.rows_in_epoch(1))
    ]
    other = make_rows(store, mode, 12, seed=6)
    assert [other.row(0, r).tokens.tolist() for r in range(other.rows_in_epoch(0))] != [
        rows.row(0, r).tokens.tolist() for r in range(rows.rows_in_epoch(0))
    ]
    # the rows of consecutive steps walk epoch 0, then epoch 1, without gaps
    n0 = rows.rows_in_epoch(0)
    walked = step_rows(rows, 0, n0 + 3)
    assert walked[:n0] == [(0, r) for r in range(n0)] and walked[n0:] == [(1, 0), (1, 1), (1, 2)]
    assert epochs_covered(rows, 3, n0) == 3
    unshuffled = make_rows(store, mode, 12, seed=5, shuffle=False)
    assert unshuffled.row(0, 0).tokens.tolist() == unshuffled.row(2, 0).tokens.tolist()


def test_stream_mode_is_todays_token_stream_and_order(tmp_path):
    from gkd_cli.data.tokenizer import train_bpe

    text = "\n\n".join(f"document {i} about topic {i % 5} with words {i * 7}" for i in range(40))
    corpus = tmp_path / "c.txt"
    corpus.write_text(text)
    tokenizer = train_bpe([corpus], 300, tmp_path / "tok.json")
    stream = build_token_stream([corpus], tokenizer, tmp_path / "cache")
    samples = TokenDataset(stream, 16)
    # the same corpus through the example-store builder: stream mode is a view over it
    from gkd_cli.data.build import build_example_store
    from gkd_cli.data.formats import DataSource

    source = DataSource(path=str(corpus), format="text", kind="text")
    store = build_example_store([source], tokenizer, tmp_path / "examples")
    assert len(store) == sum(1 for _ in iter_documents(corpus))
    view = StreamRows(store, 16, seed=9)
    legacy = StreamRows(None, 16, seed=9, samples=samples)
    assert len(view) == len(samples)
    for step in range(3):
        old = batch_indices(step, 8, 1, 2, 2, len(samples), 9)
        for rows in (view, legacy):
            micro = step_microbatches(rows, step, 8, 1, 2, 2)
            got = [[rows.row(e, r).tokens.tolist() for e, r in m] for m in micro]
            assert got == [[samples[i].tolist() for i in m] for m in old]
    row = view.row(0, 0)
    assert row.label_mask.all() and row.distill_mask is None
    assert len(set(row.example_ids.tolist())) == 1  # the window is the sample


def test_packed_mode_refuses_methods_that_relate_positions_of_a_sequence(tmp_path):
    from gkd_cli.build import build_methods
    from gkd_cli.errors import ConfigError
    from tests.unit.test_config_load import base_config, load

    data = base_config(tmp_path)
    data["data"]["mode"] = "packed"
    data["train"]["stage"] = "task"
    data["methods"] = [{"name": "pkd"}, {"name": "tinybert"}]
    with pytest.raises(ConfigError, match=r"methods.1 \(tinybert\).*data.mode: padded") as info:
        build_methods(load(tmp_path, data))
    assert info.value.field == "data.mode"
    data["methods"] = [{"name": "mgskd", "relation_heads": 8}]
    with pytest.raises(ConfigError, match="token relations"):
        build_methods(load(tmp_path, data))
    data["methods"] = [{"name": "mgskd", "relation_heads": 8, "token_levels": 0}, {"name": "pkd"}]
    assert len(build_methods(load(tmp_path, data)).entries) == 2
    data["data"]["mode"] = "padded"
    data["methods"] = [{"name": "tinybert"}]
    assert len(build_methods(load(tmp_path, data)).entries) == 1
