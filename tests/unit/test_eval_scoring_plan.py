"""Shared-context packing of scoring requests (``parallel.scoring.plan_rows`` and
``batch_tensors``), checked against what each option would see if scored alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel.scoring import CONTEXT_SEGMENT, batch_tensors, plan_rows

pytestmark = pytest.mark.unit

token_lists = st.lists(st.integers(0, 99), min_size=1, max_size=12)


@st.composite
def _request(draw):
    """A context and options that often share leading tokens (few token values, and an explicit
    common prefix), like ReCoRD's filled-in queries."""
    context = draw(token_lists)
    prefix = draw(st.lists(st.integers(0, 3), max_size=4))
    endings = draw(
        st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=5), min_size=1, max_size=5)
    )
    return context, [prefix + ending for ending in endings]


requests_strategy = st.lists(_request(), min_size=1, max_size=6)


def _seen(batch, row: int, query: int) -> list[tuple[int, int]]:
    """(position id, token) of every key that ``query`` attends to, in position order."""
    visible = ~batch["attention_mask"][row, 0, query]
    keys = torch.nonzero(visible).flatten().tolist()
    return sorted(
        (int(batch["position_ids"][row, k]), int(batch["input_ids"][row, k])) for k in keys
    )


def _expected_window(context, options, option, offset, seq_length):
    """The tokens that predict ``options[option][offset]``, by the documented rules: an option
    that fits the window follows the context cut to ``seq_length - longest fitting option``; a
    longer one is scored in chunks of ``seq_length // 2``, each after the last
    ``seq_length - chunk`` tokens of ``context + option`` before it."""
    tokens = options[option]
    if len(tokens) <= seq_length - 1:
        keep = seq_length - max(len(o) for o in options if len(o) <= seq_length - 1)
        return list(context[-keep:]) + list(tokens[:offset])
    chunk = seq_length // 2
    begin = offset - offset % chunk
    piece = tokens[begin : begin + chunk]
    before = (list(context) + list(tokens[:begin]))[-(seq_length - len(piece)) :]
    return before + list(tokens[begin:offset])


@settings(max_examples=80, deadline=None)
@given(requests=requests_strategy, seq_length=st.integers(4, 30), share=st.booleans())
def test_every_scored_token_sees_exactly_its_window(requests, seq_length, share):
    plan = plan_rows(requests, seq_length=seq_length, share_context=share)
    batch = batch_tensors(plan.rows, seq_length=seq_length, num_rows=len(plan.rows) + 1)
    scored: dict[tuple[int, int], list[int]] = {}
    n = 0
    for b, row in enumerate(plan.rows):
        assert len(row.tokens) <= seq_length
        context, options = requests[row.request]
        for predicting, token, option in row.targets:
            j = len(scored.setdefault((row.request, option), []))
            window = _expected_window(context, options, option, j, seq_length)
            # The model sees exactly that window, at positions 0..len-1, as if it ran alone.
            assert _seen(batch, b, predicting) == list(enumerate(window))
            assert token == options[option][j]
            assert (
                int(batch["target_rows"][n]) == b
                and int(batch["target_positions"][n]) == predicting
            )
            assert int(batch["target_ids"][n]) == token
            scored[(row.request, option)].append(token)
            n += 1
    assert n == len(batch["target_ids"])
    # Every option of every request is scored once, whole, in order.
    expected = {
        (r, k): list(o) for r, (_, options) in enumerate(requests) for k, o in enumerate(options)
    }
    assert scored == expected
    assert plan.split_options == sum(
        len(o) > seq_length - 1 for _, options in requests for o in options
    )


def test_shared_context_packs_all_options_after_one_context():
    plan = plan_rows([([1, 2, 3], [[4], [5, 6], [7]])], seq_length=16)
    (row,) = plan.rows
    assert row.tokens == [1, 2, 3, 4, 5, 6, 7]
    assert row.positions == [0, 1, 2, 3, 3, 4, 3]
    assert row.segments == [CONTEXT_SEGMENT] * 3 + [0, 1, 1, 2]
    # Option 1's first token is predicted at the context's last position, its second at its first.
    assert row.targets == [(2, 4, 0), (2, 5, 1), (4, 6, 1), (2, 7, 2)]


def test_leading_tokens_common_to_all_options_are_run_once():
    plan = plan_rows([([1, 2], [[4, 5, 6], [4, 5, 7], [4, 5]])], seq_length=16)
    (row,) = plan.rows
    # [4] is common and leaves every option a token of its own; [4, 5] would not.
    assert row.tokens == [1, 2, 4, 5, 6, 5, 7, 5]
    assert row.segments == [CONTEXT_SEGMENT] * 3 + [0, 0, 1, 1, 2]
    assert row.positions == [0, 1, 2, 3, 4, 3, 4, 3]
    assert row.targets == [
        (1, 4, 0),
        (2, 5, 0),
        (3, 6, 0),
        (1, 4, 1),
        (2, 5, 1),
        (5, 7, 1),
        (1, 4, 2),
        (2, 5, 2),
    ]


def test_naive_layout_has_one_row_per_option():
    plan = plan_rows([([1, 2], [[3], [4, 5]])], seq_length=16, share_context=False)
    assert [r.tokens for r in plan.rows] == [[1, 2, 3], [1, 2, 4, 5]]


def test_options_that_do_not_fit_one_row_go_to_more_rows_with_the_context_again():
    plan = plan_rows([([1, 2, 3, 4], [[5, 6, 7], [8, 9, 10], [11]])], seq_length=8)
    assert [r.tokens for r in plan.rows] == [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 8, 9, 10, 11]]


def test_long_context_is_cut_from_the_left():
    context = list(range(10, 30))
    plan = plan_rows([(context, [[1, 2, 3], [4]])], seq_length=8)
    assert plan.truncated_requests == 1 and plan.dropped_context_tokens == 15
    assert plan.rows[0].tokens[:5] == context[-5:]


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([([1], [])], "has no options"),
        ([([], [[1]])], "empty context"),
        ([([1], [[]])], "has no tokens"),
    ],
)
def test_unscorable_requests_are_refused(requests, message):
    with pytest.raises(ValueError, match=message):
        plan_rows(requests, seq_length=8)


def test_options_longer_than_the_window_are_scored_in_chunks():
    option = list(range(50, 61))  # 11 tokens, window 8: chunks of 4
    plan = plan_rows([([1, 2, 3], [option, [9]])], seq_length=8)
    assert plan.split_options == 1 and plan.truncated_requests == 0
    assert [r.tokens for r in plan.rows] == [
        [1, 2, 3, 9],  # the fitting option after the context
        [1, 2, 3, 50, 51, 52, 53],  # chunk 50..53 after all 3 context tokens (window 8 - 4)
        [50, 51, 52, 53, 54, 55, 56, 57],  # chunk 54..57 after the 4 tokens before it
        [53, 54, 55, 56, 57, 58, 59, 60],  # chunk 58..60 after the 5 tokens before it
    ]
    assert [len(r.targets) for r in plan.rows] == [1, 4, 4, 3]


def test_padding_rows_and_columns():
    plan = plan_rows([([1, 2], [[3]])], seq_length=8)
    batch = batch_tensors(plan.rows, seq_length=6, num_rows=2, pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9], [9] * 6]
    assert batch["attention_mask"].shape == (2, 1, 6, 6)
    # Real tokens never attend to padding.
    assert batch["attention_mask"][0, 0, :3, 3:].all()
    with pytest.raises(ValueError):
        batch_tensors(plan.rows, seq_length=2, num_rows=1)
