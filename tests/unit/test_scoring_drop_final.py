"""``plan_rows(..., drop_final_token=True)``: rows without each option's last token (a target
only), checked against lm-evaluation-harness's ``hf`` input rule, written out by hand: the model
runs ``(context + continuation)[-(L + 1):][:-1]`` and scores the continuation's tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel.scoring import batch_tensors, plan_rows
from tests.unit.test_eval_scoring_plan import _seen, requests_strategy

pytestmark = pytest.mark.unit


def _hf_window(context, options, option, offset, seq_length):
    """The tokens before ``options[option][offset]`` in its window: for options of up to
    ``seq_length`` tokens, the context is cut to ``seq_length + 1 - longest such option`` (one
    request per continuation in lm-eval: ``(context + cont)[-(L + 1):]``; with several options
    sharing a row the longest sets the cut); longer options go in chunks of ``seq_length // 2``."""
    tokens = options[option]
    if len(tokens) <= seq_length:
        keep = seq_length + 1 - max(len(o) for o in options if len(o) <= seq_length)
        return list(context[-keep:]) + list(tokens[:offset])
    chunk = seq_length // 2
    begin = offset - offset % chunk
    piece = tokens[begin : begin + chunk]
    before = (list(context) + list(tokens[:begin]))[-(seq_length - len(piece)) :]
    return before + list(tokens[begin:offset])


@settings(max_examples=60, deadline=None)
@given(requests=requests_strategy, seq_length=st.integers(4, 30), share=st.booleans())
def test_every_scored_token_sees_its_window_without_final_tokens(requests, seq_length, share):
    plan = plan_rows(requests, seq_length=seq_length, share_context=share, drop_final_token=True)
    batch = batch_tensors(plan.rows, seq_length=seq_length, num_rows=len(plan.rows))
    scored: dict[tuple[int, int], list[int]] = {}
    for b, row in enumerate(plan.rows):
        assert len(row.tokens) <= seq_length
        context, options = requests[row.request]
        for predicting, token, option in row.targets:
            j = len(scored.setdefault((row.request, option), []))
            window = _hf_window(context, options, option, j, seq_length)
            assert _seen(batch, b, predicting) == list(enumerate(window))
            assert token == options[option][j]
            scored[(row.request, option)].append(token)
        # The row ends with a token that predicts one (it would end with an option's last token,
        # which predicts nothing, if that were kept).
        assert len(row.tokens) - 1 in {p for p, _, _ in row.targets}
    expected = {
        (r, k): list(o) for r, (_, options) in enumerate(requests) for k, o in enumerate(options)
    }
    assert scored == expected


def test_a_full_window_is_lm_evals_input():
    """A rolling window of lm-eval: one prefix token and L continuation tokens: one row of L."""
    L = 8
    context, continuation = [99], list(range(1, L + 1))
    (row,) = plan_rows([(context, [continuation])], seq_length=L, drop_final_token=True).rows
    assert row.tokens == (context + continuation)[-(L + 1) :][:-1]
    assert [t for _, t, _ in row.targets] == continuation
    # A longer context is cut as lm-eval cuts it: (context + continuation)[-(L + 1):].
    (row,) = plan_rows(
        [(list(range(50, 60)), [[1, 2, 3]])], seq_length=L, drop_final_token=True
    ).rows
    assert row.tokens == (list(range(50, 60)) + [1, 2, 3])[-(L + 1) :][:-1]
    # Without the option the default keeps one context token less.
    (row,) = plan_rows([(list(range(50, 60)), [[1, 2, 3]])], seq_length=L).rows
    assert row.tokens == (list(range(50, 60)) + [1, 2, 3])[-L:]
