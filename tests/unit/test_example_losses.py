"""Loss masks and per-example pooling of example-aware batches, through the runtime's own batch
and loss-context code, against references written by hand from the examples themselves (which
positions predict a completion token), in fp64."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gkd_cli.data.batching import collate, make_rows
from gkd_cli.data.store import ExampleStoreWriter
from methods.base import FeatureKind, LossContext, ModelInfo, Role, Stage, Tap
from methods.examples import pool_by_example
from methods.intermediate.common import pool
from methods.logit_common import STUDENT_LOGITS, TEACHER_LOGITS
from methods.registry import build_method
from parallel.runtime import DistillationRuntime, block_causal_mask

pytestmark = pytest.mark.unit

VOCAB = 37
INFO = ModelInfo(
    num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=32,
    vocab_size=VOCAB, padded_vocab_size=VOCAB,
)  # fmt: skip
# (prompt, completion) token lists
EXAMPLES = [([3, 4, 5], [6, 7]), ([8, 9], [10, 11, 12]), ([13], [14, 15, 16, 17])]


def _store(tmp_path):
    writer = ExampleStoreWriter(tmp_path, "pc", vocab_size=VOCAB)
    for prompt, completion in EXAMPLES:
        writer.add(prompt + completion, [0] * len(prompt) + [1] * len(completion))
    return writer.finish()


def _fake_runtime():
    """The attributes ``_make_example_batch`` and ``_loss_context`` read."""
    return SimpleNamespace(
        ctx=SimpleNamespace(device=torch.device("cpu"), tp=1, tp_rank=0, dp=1, tp_group=None),
        vocab=None,
        student_info=INFO,
        teacher_infos=[INFO],
        step_state=SimpleNamespace(step=0),
        train_cfg=SimpleNamespace(steps=10, logit_chunk_tokens=None),
        stage_kind=Stage.TASK,
    )


def _batch_and_ctx(tmp_path, mode, seq):
    rows = make_rows(_store(tmp_path), mode, seq, seed=0, shuffle=False, pad_id=0)
    micro = collate([rows.row(0, r) for r in range(rows.rows_in_epoch(0))], packed=rows.packed)
    fake = _fake_runtime()
    batch = DistillationRuntime._make_example_batch(fake, micro)
    ctx = DistillationRuntime._loss_context(fake, batch)
    return micro, batch, ctx


def _placements(micro):
    """``(example, row, offset)`` of every example, read from the store indices by hand."""
    out = []
    for r, ids in enumerate(micro["example_index"].tolist()):
        for e in sorted(set(ids) - {-1}):
            out.append((e, r, ids.index(e)))
    return out


@pytest.mark.parametrize("mode,seq", [("padded", 8), ("packed", 12)])
def test_losses_count_the_completion_tokens_only(tmp_path, mode, seq):
    micro, batch, ctx = _batch_and_ctx(tmp_path, mode, seq)
    b = micro["tokens"].shape[0]
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(seq, b, VOCAB, generator=gen, dtype=torch.float64)
    teacher = torch.randn(seq, b, VOCAB, generator=gen, dtype=torch.float64)
    features = {
        STUDENT_LOGITS: student.reshape(-1, VOCAB),
        TEACHER_LOGITS: teacher.reshape(-1, VOCAB),
    }
    # by hand: the positions whose next token is a completion token, and each completion's last
    kl_terms, ce_terms, last_terms = [], [], []
    tokens = micro["tokens"]
    for e, r, offset in _placements(micro):
        prompt, completion = EXAMPLES[e]
        for j in range(len(completion)):
            i = offset + len(prompt) - 1 + j  # predicts completion[j]
            assert int(tokens[r, i + 1]) == completion[j]
            log_s = torch.log_softmax(student[i, r], -1)
            log_t = torch.log_softmax(teacher[i, r], -1)
            kl_terms.append((log_t.exp() * (log_t - log_s)).sum())
            ce_terms.append(-log_s[completion[j]])
        i = offset + len(prompt) + len(completion) - 1  # the last completion token's position
        log_s = torch.log_softmax(student[i, r] / 15, -1)
        log_t = torch.log_softmax(teacher[i, r] / 15, -1)
        last_terms.append((log_t.exp() * (log_t - log_s)).sum())
    kl = torch.stack(kl_terms).mean()
    ce = torch.stack(ce_terms).mean()
    got = build_method("forward_kl", {"temperature": 1.0}).compute(features, ctx)
    torch.testing.assert_close(got["kl"], kl, rtol=1e-9, atol=1e-12)
    got = build_method("lm", {}).compute(features, ctx)
    torch.testing.assert_close(next(iter(got.values())), ce, rtol=1e-9, atol=1e-12)
    # GLMD (label-free) distills at the same positions plus each completion's last one
    glmd_terms = []
    for e, r, offset in _placements(micro):
        prompt, completion = EXAMPLES[e]
        for j in range(len(completion)):
            i = offset + len(prompt) - 1 + j
            log_s = torch.log_softmax(student[i, r] / 15, -1)
            log_t = torch.log_softmax(teacher[i, r] / 15, -1)
            glmd_terms.append((log_t.exp() * (log_t - log_s)).sum())
    glmd = 15.0**2 * torch.stack(glmd_terms + last_terms).mean()
    got = build_method("glmd", {}).compute(features, ctx)
    torch.testing.assert_close(got["kl"], glmd, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode,seq", [("padded", 8), ("packed", 12)])
def test_pooling_and_answer_positions_per_example(tmp_path, mode, seq):
    micro, batch, ctx = _batch_and_ctx(tmp_path, mode, seq)
    b = micro["tokens"].shape[0]
    hidden = torch.randn(seq, b, 5, dtype=torch.float64)
    last_prompt, first_target = ctx.answer_positions()
    means, firsts, lasts = (
        ctx.pool_examples(hidden, "mean"),
        ctx.pool_examples(hidden, "first"),
        ctx.pool_examples(hidden, "last"),
    )
    local = 0
    for e, r, offset in sorted(_placements(micro), key=lambda p: (p[1], p[2])):
        prompt, completion = EXAMPLES[e]
        n = len(prompt) + len(completion)
        alone = hidden[offset : offset + n, r]
        torch.testing.assert_close(means[0][local], alone.mean(0))
        torch.testing.assert_close(firsts[0][local], alone[0])
        torch.testing.assert_close(lasts[0][local], alone[-1])
        # flat s-major index of (position i, row r) is i * b + r
        assert int(last_prompt[local]) == (offset + len(prompt) - 1) * b + r
        assert int(first_target[local]) == (offset + len(prompt)) * b + r
        local += 1
    assert local == len(EXAMPLES) == ctx.num_segments()
    # a method's pooling (pkd/sid/... through common.pool) over the distill mask, per example
    mask = ctx.distill_mask.reshape(seq, b)
    vec, valid = pool(hidden, mask, "mean", ctx)
    assert vec.shape == (len(EXAMPLES), 5) and bool(valid.all())
    if mode == "packed":  # a packed row holds several examples, attending only within each
        # row 0 holds example 0 at positions 0-4 and example 1 at 5-9
        allowed = ~block_causal_mask(micro["example_ids"])[0, 0]
        assert allowed[3, 2] and allowed[7, 5] and allowed[4, 0]
        assert not allowed[5, 4] and not allowed[9, 0] and not allowed[4, 5]


def test_rows_as_examples_pool_like_the_per_row_code():
    """stream mode: every row is one example; the per-example path equals the per-row one."""
    s, b = 6, 3
    hidden = torch.randn(s, b, 4, dtype=torch.float64)
    mask = torch.ones(s, b, dtype=torch.float64)
    mask[4:, 1] = 0
    ids = torch.arange(b).repeat(s)  # s-major: flat k -> row k % b
    ctx = LossContext(
        step=0, total_steps=1, stage=Stage.TASK, loss_mask=mask.reshape(-1), labels=None,
        vocab_start=0, vocab_size=VOCAB, example_ids=ids, batch_size=b,
    )  # fmt: skip
    for how in ("mean", "last"):
        rows, valid_rows = pool(hidden, mask, how)
        examples, valid = pool(hidden, mask, how, ctx)
        torch.testing.assert_close(examples, rows)
        assert torch.equal(valid, valid_rows)
    # padding (-1) never pools; an example without counted tokens gets zeros and valid False
    ids2 = torch.tensor([0, 1, -1, 0, 2, -1])
    vec, valid = pool_by_example(
        torch.arange(6.0).reshape(6, 1), ids2, "mean", mask=torch.tensor([1, 1, 1, 1, 0, 1])
    )
    assert vec.squeeze(1).tolist() == [1.5, 1.0, 0.0] and valid.tolist() == [True, True, False]


def test_sample_level_method_pools_per_example(tmp_path):
    """PKD over a packed batch equals PKD over the same examples padded one per row."""
    packed_micro, _, packed_ctx = _batch_and_ctx(tmp_path / "a", "packed", 12)
    padded_micro, _, padded_ctx = _batch_and_ctx(tmp_path / "b", "padded", 12)

    def hidden_for(micro, seed):
        """Per-example hidden states placed where the example sits (the same for both)."""
        s, b = micro["tokens"].shape[1] - 1, micro["tokens"].shape[0]
        out = torch.zeros(s, b, 8, dtype=torch.float64)
        for e, r, offset in _placements(micro):
            n = sum(map(len, EXAMPLES[e]))
            gen = torch.Generator().manual_seed(seed * 100 + e)
            out[offset : offset + n, r] = torch.randn(n, 8, generator=gen, dtype=torch.float64)
        return out

    method = build_method("pkd", {"alpha": 0.0, "pooling": "mean"}, None)
    method.taps(INFO, INFO)
    results = []
    for micro, ctx in ((packed_micro, packed_ctx), (padded_micro, padded_ctx)):
        features = {}
        for layer in range(INFO.num_layers):
            features[Tap(Role.STUDENT, FeatureKind.HIDDEN, layer)] = hidden_for(micro, 1 + layer)
            features[Tap(Role.TEACHER, FeatureKind.HIDDEN, layer)] = hidden_for(micro, 7 + layer)
        results.append(method.compute(features, ctx)["patience"])
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)
    # and by hand (PKD eq. 1): per example, the mean over the positions the method counts (the
    # distill mask: last prompt token to the completion's end), normalized, squared distance
    expected = 0.0
    for j, t in enumerate(method._mapping):
        for e, (prompt, completion) in enumerate(EXAMPLES):
            n = len(prompt) + len(completion)

            def vec(seed, e=e, n=n, start=len(prompt) - 1):
                gen = torch.Generator().manual_seed(seed * 100 + e)
                return torch.randn(n, 8, generator=gen, dtype=torch.float64)[start:].mean(0)

            diff = F.normalize(vec(1 + j), dim=0) - F.normalize(vec(7 + t), dim=0)
            expected += float(diff.pow(2).mean()) / len(EXAMPLES)
    assert float(results[0]) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("how", ["first", "last", "mean"])
def test_micro_batch_of_one_pools_to_one_vector_per_example(how):
    """At micro batch size 1, ``[s, 1, h]`` has ``s == N`` rows: it is still ``[s, b, h]``."""
    torch.manual_seed(0)
    s, h = 6, 4
    features = torch.randn(s, 1, h, dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1, -1])  # two examples and one padding position
    pooled, valid = pool_by_example(features, ids, how, num_examples=2)
    assert pooled.shape == (2, h) and valid.tolist() == [True, True]
    flat = features[:, 0]
    spans = [flat[0:3], flat[3:5]]
    expected = torch.stack(
        [sp[0] if how == "first" else sp[-1] if how == "last" else sp.mean(0) for sp in spans]
    )
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)


def test_train_logit_chunk_tokens_reaches_the_losses(tmp_path):
    """``train.logit_chunk_tokens`` sets the chunk of the vocab-parallel losses (the loss context
    carries it); the default leaves the byte-budget choice."""
    from methods.vocab_parallel import VocabShard

    rows = make_rows(_store(tmp_path), "padded", 8, seed=0, shuffle=False, pad_id=0)
    micro = collate([rows.row(0, r) for r in range(rows.rows_in_epoch(0))], packed=rows.packed)
    fake = _fake_runtime()
    batch = DistillationRuntime._make_example_batch(fake, micro)
    assert VocabShard.of(DistillationRuntime._loss_context(fake, batch)).chunk_size is None
    fake.train_cfg.logit_chunk_tokens = 24
    assert VocabShard.of(DistillationRuntime._loss_context(fake, batch)).chunk_size == 24
