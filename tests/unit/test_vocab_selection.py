"""Keep-size rounding, frequency selection, the shard layout and shard-local teacher columns."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd_cli.vocab.selection import (
    equal_size_coverage,
    keep_size,
    layout_kept,
    parse_keep,
    select_kept,
    select_kept_balanced,
    shard_local_index,
)

pytestmark = pytest.mark.unit


def _reference_keep(requested: int, vocab: int, tp: int, multiple: int) -> int:
    size = requested
    while size % (multiple * tp):
        size += 1
    return min(size, vocab)


@settings(max_examples=200, deadline=None)
@given(
    vocab=st.integers(2, 5000),
    fraction=st.floats(0.001, 0.999),
    tp=st.sampled_from([1, 2, 4, 8]),
    multiple=st.sampled_from([1, 8, 64, 128]),
)
def test_rounding_rule(vocab, fraction, tp, multiple):
    requested = max(1, min(vocab - 1, int(fraction * vocab)))
    assert keep_size(requested, vocab, tp=tp, multiple=multiple) == _reference_keep(
        requested, vocab, tp, multiple
    )
    ratio_requested = math.ceil(fraction * vocab)
    if ratio_requested < vocab:
        assert keep_size(fraction, vocab, tp=tp, multiple=multiple) == _reference_keep(
            ratio_requested, vocab, tp, multiple
        )


def test_rounding_examples():
    assert keep_size(0.5, 30592, tp=1) == 15360  # GLMD's 50% of 30,592 -> 15,296 -> 15,360
    assert keep_size(1000, 50000, tp=2) == 1024
    assert keep_size(1025, 50000, tp=2) == 1280
    assert keep_size(290, 300, tp=1) == 300  # capped at the vocabulary
    assert keep_size("0.25", 1000, multiple=1) == 250 and parse_keep("12") == 12


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (300, "not smaller than the vocabulary"),
        (1.0, "strictly between 0 and 1"),
        (0.0, "strictly between 0 and 1"),
        (0, "at least 1"),
        ("half", "neither a ratio"),
        (True, "ratio in"),
    ],
)
def test_keep_errors(keep, message):
    with pytest.raises(ValueError, match=message):
        keep_size(keep, 300)


def test_tp_and_multiple_errors():
    with pytest.raises(ValueError, match="tp"):
        keep_size(10, 300, tp=0)
    with pytest.raises(ValueError, match="multiple"):
        keep_size(10, 300, multiple=0)


def test_select_keeps_forced_then_most_frequent_with_id_ties():
    counts = np.array([0, 5, 9, 5, 1, 9, 0, 3])
    kept = select_kept(counts, 4, forced_ids=[6, 0])
    # forced {0, 6}; then by (-count, id): 2 (9), 5 (9) -> kept {0, 2, 5, 6}
    assert kept.tolist() == [0, 2, 5, 6]
    kept = select_kept(counts, 5, forced_ids=[])
    reference = sorted(sorted(range(8), key=lambda i: (-counts[i], i))[:5])
    assert kept.tolist() == reference
    with pytest.raises(ValueError, match="smaller than the 3 tokens that must be kept"):
        select_kept(counts, 2, forced_ids=[1, 2, 3])


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    tp=st.sampled_from([1, 2, 4]),
    multiple=st.sampled_from([1, 4, 16]),
    shard_width=st.integers(1, 40),
)
def test_shard_partition_property(data, tp, multiple, shard_width):
    teacher_padded = tp * shard_width
    vocab = data.draw(st.integers(max(1, teacher_padded - shard_width + 1), teacher_padded))
    kept = np.array(
        sorted(data.draw(st.sets(st.integers(0, vocab - 1), min_size=1, max_size=vocab)))
    )
    comp_to_orig = layout_kept(kept, teacher_vocab_padded=teacher_padded, tp=tp, multiple=multiple)
    assert len(comp_to_orig) % (tp * multiple) == 0
    student_width = len(comp_to_orig) // tp
    held = comp_to_orig[comp_to_orig >= 0]
    assert sorted(held.tolist()) == kept.tolist()
    for rank in range(tp):
        slots = comp_to_orig[rank * student_width : (rank + 1) * student_width]
        ids = slots[slots >= 0]
        assert ((ids >= rank * shard_width) & (ids < (rank + 1) * shard_width)).all()
        assert (np.diff(ids) > 0).all()
        # padding only after the kept ids of the shard
        assert (slots[len(ids) :] == -1).all()
    # the shard width is the smallest multiple fitting the fullest teacher shard
    fullest = max(((kept // shard_width) == r).sum() for r in range(tp))
    assert student_width == -(-fullest // multiple) * multiple


def test_shard_local_index_restricts_like_a_global_gather():
    rng = np.random.default_rng(0)
    tp, teacher_padded, vocab = 4, 48, 45
    kept = np.sort(rng.choice(vocab, 17, replace=False))
    comp_to_orig = layout_kept(kept, teacher_vocab_padded=teacher_padded, tp=tp, multiple=2)
    teacher_logits = rng.normal(size=(5, teacher_padded))
    shard = teacher_padded // tp
    student_width = len(comp_to_orig) // tp
    for rank in range(tp):
        local, valid = shard_local_index(comp_to_orig, tp, teacher_padded, rank)
        restricted = teacher_logits[:, rank * shard : (rank + 1) * shard][:, local]
        slots = comp_to_orig[rank * student_width : (rank + 1) * student_width]
        np.testing.assert_array_equal(valid, slots >= 0)
        np.testing.assert_array_equal(restricted[:, valid], teacher_logits[:, slots[valid]])
    # A layout made for tp=1 puts id 30 (teacher shard 1 of 2) in student shard 0 at tp=2.
    single = layout_kept(np.array([30, 40]), teacher_vocab_padded=48, tp=1, multiple=1)
    with pytest.raises(ValueError, match="not laid out for tp=2"):
        shard_local_index(single, 2, 48, 0)
    with pytest.raises(ValueError, match="rank"):
        shard_local_index(comp_to_orig, tp, teacher_padded, tp)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    tp=st.sampled_from([1, 2, 4]),
    multiple=st.sampled_from([1, 2, 4]),
    shard_width=st.integers(2, 24),
)
def test_balanced_selection_fills_each_shard_with_its_most_frequent(
    data, tp, multiple, shard_width
):
    teacher_padded = tp * shard_width
    vocab = data.draw(st.integers(teacher_padded - shard_width + 1, teacher_padded))
    counts = np.array(data.draw(st.lists(st.integers(0, 6), min_size=vocab, max_size=vocab)))
    keep = data.draw(st.integers(1, vocab))
    quota = math.ceil(math.ceil(keep / tp) / multiple) * multiple
    forced = data.draw(st.sets(st.integers(0, vocab - 1), max_size=3))
    too_many = any(sum(1 for f in forced if f // shard_width == r) > quota for r in range(tp))
    if too_many:
        with pytest.raises(ValueError, match="more than its share"):
            select_kept_balanced(
                counts, keep, forced, teacher_vocab_padded=teacher_padded, tp=tp, multiple=multiple
            )
        return
    kept = select_kept_balanced(
        counts, keep, forced, teacher_vocab_padded=teacher_padded, tp=tp, multiple=multiple
    )
    # reference: shard by shard, forced first, then by (count desc, id asc)
    expected = set()
    for rank in range(tp):
        ids = [i for i in range(vocab) if i // shard_width == rank]
        must = [i for i in ids if i in forced]
        rest = sorted((i for i in ids if i not in forced), key=lambda i: (-counts[i], i))
        expected |= set(must) | set(rest[: quota - len(must)])
    assert kept.tolist() == sorted(expected)
    # within a shard, an unseen token is never kept while a seen one of that shard is dropped
    for rank in range(tp):
        ids = [i for i in range(vocab) if i // shard_width == rank and i not in forced]
        unseen_kept = [i for i in ids if counts[i] == 0 and i in expected]
        seen_dropped = [i for i in ids if counts[i] > 0 and i not in expected]
        assert not (unseen_kept and seen_dropped)
    comp_to_orig = layout_kept(kept, teacher_vocab_padded=teacher_padded, tp=tp, multiple=multiple)
    # no student shard is wider than the quota; exactly the quota when a teacher shard can fill it
    fullest = max(sum(1 for i in range(vocab) if i // shard_width == r) for r in range(tp))
    assert len(comp_to_orig) == tp * -(-min(quota, fullest) // multiple) * multiple


def test_balanced_equals_global_at_tp1():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 50, size=300)
    for keep in (8, 64, 200):
        assert np.array_equal(
            select_kept_balanced(counts, keep, [0, 5], teacher_vocab_padded=304, tp=1, multiple=8),
            select_kept(counts, keep, [0, 5]),
        )


def test_balanced_keeps_the_requested_size_where_global_pads():
    # frequent tokens crowd into the low ids (as in BPE vocabularies): teacher shard 0
    counts = np.concatenate([np.full(8, 100), np.arange(8, 0, -1)])
    global_kept = select_kept(counts, 8, [])
    assert len(layout_kept(global_kept, teacher_vocab_padded=16, tp=2, multiple=1)) == 16
    balanced = select_kept_balanced(counts, 8, [], teacher_vocab_padded=16, tp=2, multiple=1)
    assert balanced.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert len(layout_kept(balanced, teacher_vocab_padded=16, tp=2, multiple=1)) == 8


def test_equal_size_coverage_of_a_crowded_vocabulary():
    # shard 0 (ids 0-7) holds every frequent token, shard 1 (ids 8-15) only two seen ones: at a
    # student vocabulary of 8 (4 per shard) balanced keeps 0-3 plus 8, 9 and two unseen ids; the
    # global top-K (a prefix of the order by count) fits only while shard 0 holds at most 4.
    counts = np.array([100, 90, 80, 70, 60, 50, 40, 30, 1, 1, 0, 0, 0, 0, 0, 0])
    same = equal_size_coverage(counts, [], compressed_vocab_size=8, teacher_vocab_padded=16, tp=2)
    total = counts.sum()
    assert same["balanced_kept"] == 8 and same["balanced_unseen_kept"] == 2
    assert same["balanced_coverage"] == pytest.approx((100 + 90 + 80 + 70 + 1 + 1) / total)
    # global order: 0..7 by count; the 5th (id 4) would put 5 ids in shard 0: prefix 0-3
    assert same["global_kept"] == 4 and same["global_unseen_kept"] == 0
    assert same["global_coverage"] == pytest.approx((100 + 90 + 80 + 70) / total)
