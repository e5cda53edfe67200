"""The prediction-layer methods against their papers' definitions, written out here with plain
torch on gathered fp64 logits."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from methods.base import BuildContext, LossContext, ModelInfo, Stage
from methods.logit_common import STUDENT_LOGITS, TEACHER_LOGITS
from methods.registry import build_method
from tests.unit.test_methods_vocab_parallel import make_case, reference

pytestmark = pytest.mark.unit

VOCAB, PADDED, TOKENS = 29, 32, 10
INFO = ModelInfo(
    num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=32,
    vocab_size=VOCAB, padded_vocab_size=PADDED,
)  # fmt: skip


def _case(seed=0):
    return make_case(seed, TOKENS, VOCAB, PADDED)


def _ctx(mask, labels, *, step=0, total_steps=100, stage=Stage.TASK, token_mask=None):
    return LossContext(
        step=step, total_steps=total_steps, stage=stage, loss_mask=mask, labels=labels,
        vocab_start=0, vocab_size=VOCAB, token_mask=token_mask,
    )  # fmt: skip


def _features(student, teacher):
    return {STUDENT_LOGITS: student, TEACHER_LOGITS: teacher}


def _masked_mean(per_token, mask):
    return (per_token * mask).sum() / mask.sum()


def _kl(s, t, temperature):
    log_p = torch.log_softmax(s[:, :VOCAB] / temperature, -1)
    log_q = torch.log_softmax(t[:, :VOCAB] / temperature, -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def test_glmd_is_t_squared_kl_at_every_non_pad_position():
    student, teacher, mask, labels = _case()
    glmd = build_method("glmd", {})
    token_mask = torch.ones(TOKENS, dtype=torch.float64)
    token_mask[-2:] = 0.0
    terms = glmd.compute(_features(student, teacher), _ctx(mask, None, token_mask=token_mask))
    expected = 15.0**2 * _masked_mean(_kl(student, teacher, 15.0), token_mask)
    torch.testing.assert_close(terms["kl"], expected, rtol=1e-9, atol=0)
    # without a token mask from the runtime it falls back to the loss mask
    terms = glmd.compute(_features(student, teacher), _ctx(mask, None))
    expected = 225.0 * _masked_mean(_kl(student, teacher, 15.0), mask)
    torch.testing.assert_close(terms["kl"], expected, rtol=1e-9, atol=0)
    assert glmd.stages == {Stage.PRETRAIN, Stage.TASK}


def test_kd_soft_cross_entropy_plus_hard():
    student, teacher, mask, labels = _case(1)
    kd = build_method("kd", {})
    terms = kd.compute(_features(student, teacher), _ctx(mask, labels))
    q = torch.softmax(teacher[:, :VOCAB] / 10.0, -1)
    soft = -(q * torch.log_softmax(student[:, :VOCAB] / 10.0, -1)).sum(-1)
    hard = F.cross_entropy(student[:, :VOCAB], labels.clamp(min=0), reduction="none")
    torch.testing.assert_close(terms["soft"], _masked_mean(soft, mask), rtol=1e-9, atol=0)
    torch.testing.assert_close(terms["hard"], _masked_mean(hard, mask), rtol=1e-9, atol=0)
    assert kd.term_weights(_ctx(mask, labels)) == {"soft": 1.0, "hard": 1.0}


def test_kd_kl_variant_and_no_hard_term():
    student, teacher, mask, labels = _case(2)
    kd = build_method("kd", {"soft_loss": "kl", "temperature": 4, "hard_weight": 0})
    terms = kd.compute(_features(student, teacher), _ctx(mask, None))
    assert set(terms) == {"soft"}  # no hard term, so no labels needed
    expected = 16.0 * _masked_mean(_kl(student, teacher, 4.0), mask)
    torch.testing.assert_close(terms["soft"], expected, rtol=1e-9, atol=0)


def test_pd_pretrains_without_teacher_then_distills_at_t1():
    student, teacher, mask, labels = _case(3)
    pd = build_method("pd", {}, BuildContext(stage=Stage.PRETRAIN))  # PD reads the stage
    assert list(pd.taps(INFO, INFO)) == [STUDENT_LOGITS]
    pre = pd.compute({STUDENT_LOGITS: student}, _ctx(mask, labels, stage=Stage.PRETRAIN))
    hard = F.cross_entropy(student[:, :VOCAB], labels.clamp(min=0), reduction="none")
    torch.testing.assert_close(pre["lm"], _masked_mean(hard, mask), rtol=1e-9, atol=0)
    pd = build_method("pd", {}, BuildContext(stage=Stage.TASK))
    assert set(pd.taps(INFO, INFO)) == {STUDENT_LOGITS, TEACHER_LOGITS}
    task = pd.compute(_features(student, teacher), _ctx(mask, labels))
    q = torch.softmax(teacher[:, :VOCAB], -1)
    soft = -(q * torch.log_softmax(student[:, :VOCAB], -1)).sum(-1)
    torch.testing.assert_close(task["soft"], _masked_mean(soft, mask), rtol=1e-9, atol=0)


def _paper_phi(step, total, tau_max):
    """Annealing KD: T goes tau_max, ..., 1 in equal phases; Phi(T) = 1 - (T - 1) / tau_max."""
    phase = min(int(step * tau_max / total), tau_max - 1)  # 0 .. tau_max-1
    temperature = tau_max - phase
    return 1.0 - (temperature - 1) / tau_max


def test_annealing_kd_scales_the_teacher_from_one_seventh_to_one():
    student, teacher, mask, labels = _case(4)
    method = build_method("annealing_kd", {})
    total = 70
    seen = set()
    for step in range(total + 1):
        terms = method.compute(
            _features(student, teacher), _ctx(mask, labels, step=step, total_steps=total)
        )
        phi = _paper_phi(step, total, 7)
        seen.add(round(phi, 9))
        expected = ((student[:, :VOCAB] - phi * teacher[:, :VOCAB]) ** 2).mean(-1)
        torch.testing.assert_close(terms["mse"], _masked_mean(expected, mask), rtol=1e-9, atol=0)
    assert min(seen) == pytest.approx(1 / 7) and max(seen) == 1.0 and len(seen) == 7


def _glmkd_psi(step, total):
    """GLMKD's Continuation_KD: psi = iteration / (1.333 x train_iters), 1 after 66.6%."""
    return 1.0 if step > 0.666 * total else step / (1.333 * total)


@pytest.mark.parametrize("segments", ["rows", "examples"])
def test_continuation_kd_is_glmkd_per_sample_hinge_with_psi_weights(segments):
    student, teacher, mask, labels = _case(5)
    total = 100
    if segments == "rows":  # 10 tokens as a [5, 2] grid, s-major: sample = k % 2
        ids = torch.arange(TOKENS) % 2
        extra = {"batch_size": 2}
    else:  # three examples and one padding position
        ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
        extra = {"example_ids": ids, "batch_size": 1}
    samples = sorted(int(i) for i in ids.unique() if i >= 0)
    for step in (0, 33, 66, 67, 90):
        phi = _paper_phi(step, total, 10)
        per_token = ((student[:, :VOCAB] - phi * teacher[:, :VOCAB]) ** 2).mean(-1)
        m = torch.stack(
            [
                (per_token * mask * (ids == i)).sum() / (mask * (ids == i)).sum().clamp(min=1)
                for i in samples
            ]
        )
        # a margin that leaves some samples below the threshold and some above
        margin = float(m.min() + m.max()) / 2 / phi
        method = build_method("continuation_kd", {"margin": margin})
        ctx = dataclasses.replace(_ctx(mask, labels, step=step, total_steps=total), **extra)
        terms = method.compute(_features(student, teacher), ctx)
        soft = (m * (m > margin * phi)).sum() / len(samples)
        assert 0 < int((m > margin * phi).sum()) < len(samples)
        torch.testing.assert_close(terms["soft"], soft, rtol=1e-9, atol=0)
        hard = F.cross_entropy(student[:, :VOCAB], labels.clamp(min=0), reduction="none")
        torch.testing.assert_close(terms["hard"], _masked_mean(hard, mask), rtol=1e-9, atol=0)
        weights = method.term_weights(ctx)
        psi = _glmkd_psi(step, total)
        assert weights["hard"] == pytest.approx(psi) and weights["soft"] == pytest.approx(1 - psi)
    # psi: 0 at the start, 0.5 just before two thirds, then 1
    assert _glmkd_psi(66, 100) == pytest.approx(0.4951, abs=1e-4) and _glmkd_psi(67, 100) == 1.0


@pytest.mark.parametrize(
    "name, params, kind, options",
    [
        ("forward_kl", {"temperature": 2.0}, "forward_kl", {}),
        ("reverse_kl", {"temperature": 2.0}, "reverse_kl", {}),
        ("jsd", {"beta": 0.7, "temperature": 2.0}, "jsd", {"beta": 0.7}),
        ("skew_kl", {"temperature": 2.0}, "skew_kl", {"alpha": 0.1}),
        ("skew_rkl", {"temperature": 2.0}, "skew_rkl", {"alpha": 0.1}),
        ("tvd", {"temperature": 2.0}, "tvd", {}),
        ("topk_kd", {"k": 7, "temperature": 2.0}, "topk", {"k": 7}),
        ("lm", {}, "ce", {}),
    ],
)
def test_divergence_methods_match_the_reference(name, params, kind, options):
    student, teacher, mask, labels = _case(6)
    method = build_method(name, params)
    leaf = student.clone().requires_grad_()
    (term,) = method.compute(_features(leaf, teacher), _ctx(mask, labels)).values()
    term.backward()
    temperature = params.get("temperature", 1.0)
    ref, ref_grad = reference(kind, student, teacher, mask, labels, VOCAB, temperature, **options)
    torch.testing.assert_close(term, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(leaf.grad, ref_grad, rtol=1e-6, atol=1e-12)


def test_scheduled_temperature_follows_the_step():
    student, teacher, mask, labels = _case(7)
    method = build_method("forward_kl", {"temperature": {"type": "linear", "start": 4, "end": 1}})
    early = method.compute(_features(student, teacher), _ctx(mask, labels, step=0))["kl"]
    late = method.compute(_features(student, teacher), _ctx(mask, labels, step=100))["kl"]
    torch.testing.assert_close(
        early, _masked_mean(_kl(student, teacher, 4.0), mask), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        late, _masked_mean(_kl(student, teacher, 1.0), mask), rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("name", ["lm", "kd", "pd", "glmd", "annealing_kd", "continuation_kd",
                                  "forward_kl", "jsd", "topk_kd"])  # fmt: skip
def test_methods_return_nothing_without_logits(name):
    _, teacher, mask, labels = _case(8)
    method = build_method(name, {})
    assert method.compute({}, _ctx(mask, labels)) == {}
    if name != "lm":
        assert method.compute({TEACHER_LOGITS: teacher}, _ctx(mask, labels)) == {}


def test_hard_terms_need_labels():
    student, teacher, mask, _ = _case(9)
    with pytest.raises(ValueError, match="'lm' needs labels"):
        build_method("lm", {}).compute({STUDENT_LOGITS: student}, _ctx(mask, None))
    with pytest.raises(ValueError, match="'kd' needs labels"):
        build_method("kd", {}).compute(_features(student, teacher), _ctx(mask, None))


def test_topk_larger_than_the_vocabulary_is_rejected_at_build():
    with pytest.raises(ValueError, match="topk_kd.k=64 exceeds"):
        build_method("topk_kd", {}).taps(INFO, INFO)
    assert build_method("topk_kd", {"k": 8}).taps(INFO, INFO)


def test_annealing_parameters_are_checked():
    with pytest.raises(ValueError, match="annealing_kd.max_temperature"):
        build_method("annealing_kd", {"max_temperature": 0})
    with pytest.raises(ValueError, match="continuation_kd.margin"):
        build_method("continuation_kd", {"margin": -1.0})
    assert math.isclose(build_method("continuation_kd", {"margin": 0.5}).params.margin, 0.5)


# ----------------------------------------------------------------------------------------------
# Composition: a logit divergence is a kernel plus a declaration


def test_a_divergence_is_a_kernel_plus_a_declaration():
    """A new divergence from an existing kernel: registry attributes, no base class, the value of
    vp.divergence at the parameters' temperature, bad parameters refused when built."""
    from dataclasses import dataclass

    from methods import vocab_kernels as vk
    from methods import vocab_parallel as vp
    from methods.divergences import logit_divergence

    @dataclass(kw_only=True, frozen=True)
    class HalfSkewParams:
        alpha: float = 0.5
        temperature: float = 2.0

    HalfSkew = logit_divergence(
        "HalfSkew", name="half_skew", params=HalfSkewParams, term="skl",
        kernel=lambda p: vk.skew_kl_kernel(p.alpha), paper="test", doc="""A test divergence.""",
    )  # fmt: skip
    assert HalfSkew.__mro__ == (HalfSkew, object)
    assert HalfSkew.name == "half_skew" and HalfSkew.Params is HalfSkewParams
    assert HalfSkew.__doc__ == "A test divergence."
    student, teacher, mask, labels = _case(3)
    method = HalfSkew()
    assert method.taps(INFO, INFO) == (TEACHER_LOGITS, STUDENT_LOGITS)
    terms = method.compute(_features(student, teacher), _ctx(mask, labels))
    shard = vp.VocabShard(0, VOCAB)
    expected = vp.divergence(vk.skew_kl_kernel(0.5), student, teacher, mask, shard, temperature=2.0)
    assert set(terms) == {"skl"} and torch.equal(terms["skl"], expected)
    assert method.compute({STUDENT_LOGITS: student}, _ctx(mask, labels)) == {}
    with pytest.raises(ValueError, match="alpha"):
        HalfSkew(HalfSkewParams(alpha=1.5))


def test_soft_and_hard_terms_are_one_definition():
    """KD's soft term is logit_common.soft_loss, its weights soft_hard_weights."""
    from methods.logit_common import soft_hard_weights, soft_loss

    student, teacher, mask, labels = _case(4)
    ctx = _ctx(mask, labels, step=3)
    kd = build_method("kd", {"soft_loss": "kl", "temperature": 3.0, "soft_weight": 0.5})
    terms = kd.compute(_features(student, teacher), ctx)
    assert torch.equal(terms["soft"], soft_loss("kl", student, teacher, mask, ctx, 3.0))
    assert kd.term_weights(ctx) == soft_hard_weights(kd.params, ctx) == {"soft": 0.5, "hard": 1.0}
