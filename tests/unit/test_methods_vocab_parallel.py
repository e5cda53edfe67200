"""The vocab-parallel logit losses against a straightforward fp64 reference (TP=1 here; TP=2 in
tests/dist/test_methods_vocab_parallel.py, which reuses ``reference`` and ``make_case``).

The reference gathers everything, never chunks, drops the padded vocabulary columns by slicing,
and uses plain torch.softmax/log_softmax/F.kl_div and autograd for the gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from methods import vocab_kernels as vk
from methods import vocab_parallel as vp

pytestmark = pytest.mark.unit

KINDS = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_kl",
    "skew_rkl",
    "tvd",
    "soft_ce",
    "mse",
    "topk",
    "ce",
)


# ----------------------------------------------------------------------------------------------
# Reference


def _per_token_reference(kind, s, t, labels, temperature, options):
    """Per-token losses from full, unpadded fp64 logits ``s`` (requires grad) and ``t``."""
    if kind == "ce":
        return F.cross_entropy(s, labels, reduction="none")
    if kind == "mse":
        diff = s - options.get("teacher_scale", 1.0) * t
        hinge = (diff.abs() - options.get("margin", 0.0)).clamp(min=0.0)
        return (hinge**2).mean(dim=-1)
    log_p = torch.log_softmax(s / temperature, dim=-1)
    log_q = torch.log_softmax(t / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if kind == "soft_ce":
        return -(q * log_p).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "jsd":  # TRL's generalized_jsd_loss, written out
        beta = options.get("beta", 0.5)
        if beta == 0.0:
            return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
        if beta == 1.0:
            return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
        log_m = torch.log(beta * q + (1 - beta) * p)
        kl_teacher = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
        kl_student = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
        return beta * kl_teacher + (1 - beta) * kl_student
    if kind == "skew_kl":
        alpha = options.get("alpha", 0.1)
        mix = alpha * q + (1 - alpha) * p
        return (q * (log_q - mix.log())).sum(-1)
    if kind == "skew_rkl":
        alpha = options.get("alpha", 0.1)
        mix = alpha * p + (1 - alpha) * q
        return (p * (log_p - mix.log())).sum(-1)
    if kind == "topk":
        top = torch.topk(t, options["k"], dim=-1).indices
        in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(1, top, True)
        q_top, p_top = q.gather(1, top), p.gather(1, top)
        q_tail, p_tail = (q * ~in_top).sum(-1), (p * ~in_top).sum(-1)
        tail = torch.where(q_tail > 0, q_tail * (q_tail.log() - p_tail.log()), 0.0)
        return (q_top * (q_top.log() - p_top.log())).sum(-1) + tail
    raise AssertionError(kind)


def reference(kind, student, teacher, mask, labels, vocab_size, temperature=1.0, **options):
    """``(loss, grad)`` in fp64; ``grad`` has the padded shape, zero in padding columns."""
    s = student[:, :vocab_size].detach().to(torch.float64).requires_grad_()
    t = teacher[:, :vocab_size].detach().to(torch.float64)
    per_token = _per_token_reference(kind, s, t, labels, temperature, options)
    mask = mask.to(torch.float64)
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    grad = torch.zeros(student.shape, dtype=torch.float64)
    grad[:, :vocab_size] = s.grad
    return loss.detach(), grad


KERNELS = {
    "forward_kl": lambda o: vk.forward_kl_kernel,
    "reverse_kl": lambda o: vk.reverse_kl_kernel,
    "jsd": lambda o: vk.jsd_kernel(o.get("beta", 0.5)),
    "skew_kl": lambda o: vk.skew_kl_kernel(o.get("alpha", 0.1)),
    "skew_rkl": lambda o: vk.skew_reverse_kl_kernel(o.get("alpha", 0.1)),
    "tvd": lambda o: vk.tvd_kernel,
    "soft_ce": lambda o: vk.soft_ce_kernel,
    "mse": lambda o: vk.mse_kernel(o.get("teacher_scale", 1.0), o.get("margin", 0.0)),
    "topk": lambda o: vk.topk_kernel(o["k"]),
}
"""The kernel of each kind from its options."""


def call(
    kind, student, teacher, mask, labels, *, vocab_start=0, vocab_size=None, tp_group=None,
    chunk_size=None, temperature=1.0, **options,
):  # fmt: skip
    """Our loss of ``kind``: :func:`vp.divergence` with the kind's kernel (``vp.cross_entropy``
    for ``ce``) and the layout as one :class:`vp.VocabShard`."""
    shard = vp.VocabShard(vocab_start, vocab_size, tp_group, chunk_size)
    if kind == "ce":
        return vp.cross_entropy(student, labels, mask, shard)
    if kind == "mse":  # raw logits: no temperature
        temperature = 1.0
    kernel = KERNELS[kind](options)
    return vp.divergence(kernel, student, teacher, mask, shard, temperature=temperature)


def forward_kl(student, teacher, mask, **kwargs):
    return call("forward_kl", student, teacher, mask, None, **kwargs)


OPTIONS = {
    "jsd": {"beta": 0.3},
    "skew_kl": {"alpha": 0.2},
    "skew_rkl": {"alpha": 0.2},
    "mse": {"teacher_scale": 0.6, "margin": 0.4},
    "topk": {"k": 5},
}


def make_case(seed, tokens, vocab_size, padded_vocab, scale=3.0, dtype=torch.float64):
    """Student/teacher logits ``[tokens, padded_vocab]`` with garbage in the padding columns, a
    mask with padding rows, and labels (arbitrary, out of range, where the mask is 0)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, padded_vocab, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(tokens, padded_vocab, generator=gen, dtype=torch.float64) * scale
    student[:, vocab_size:] = 40.0  # would dominate every softmax if padding leaked in
    teacher[:, vocab_size:] = 50.0
    mask = (torch.rand(tokens, generator=gen) > 0.3).to(torch.float64)
    mask[0] = 1.0
    if tokens > 1:
        mask[-1] = 0.0
    labels = torch.randint(0, vocab_size, (tokens,), generator=gen)
    labels[mask == 0] = -100
    return student.to(dtype), teacher.to(dtype), mask, labels


def ours_with_grad(kind, student, teacher, mask, labels, **kwargs):
    leaf = student.detach().clone().requires_grad_()
    loss = call(kind, leaf, teacher, mask, labels, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


# ----------------------------------------------------------------------------------------------
# Value and gradient equal the reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_matches_fp64_reference(kind, chunk_size):
    vocab_size, padded = 37, 48
    student, teacher, mask, labels = make_case(1, 11, vocab_size, padded)
    temperature = 1.0 if kind in ("ce", "mse") else 2.5
    options = OPTIONS.get(kind, {})
    loss, grad = ours_with_grad(
        kind, student, teacher, mask, labels, vocab_size=vocab_size, temperature=temperature,
        chunk_size=chunk_size, **options,
    )  # fmt: skip
    ref_loss, ref_grad = reference(
        kind, student, teacher, mask, labels, vocab_size, temperature, **options
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    assert torch.all(grad[:, vocab_size:] == 0)
    assert torch.all(grad[mask == 0] == 0)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    tokens=st.integers(1, 9),
    vocab_size=st.integers(6, 30),
    padding=st.integers(0, 6),
    chunk_size=st.integers(1, 10),
    temperature=st.floats(0.5, 4.0),
    scale=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_on_random_shapes(
    kind, tokens, vocab_size, padding, chunk_size, temperature, scale, seed
):
    student, teacher, mask, labels = make_case(
        seed, tokens, vocab_size, vocab_size + padding, scale
    )
    if kind in ("ce", "mse"):
        temperature = 1.0
    options = OPTIONS.get(kind, {})
    loss, grad = ours_with_grad(
        kind, student, teacher, mask, labels, vocab_size=vocab_size, temperature=temperature,
        chunk_size=chunk_size, **options,
    )  # fmt: skip
    ref_loss, ref_grad = reference(
        kind, student, teacher, mask, labels, vocab_size, temperature, **options
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


def test_chunking_does_not_change_the_result():
    student, teacher, mask, labels = make_case(3, 23, 50, 64, dtype=torch.float32)
    results = [
        ours_with_grad("forward_kl", student, teacher, mask, labels, vocab_size=50, chunk_size=c)
        for c in (1, 5, 23, 1000)
    ]
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0.0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-9)


def test_fp32_inputs_match_reference_closely():
    student, teacher, mask, labels = make_case(4, 16, 300, 384, dtype=torch.float32)
    for kind in KINDS:
        options = OPTIONS.get(kind, {})
        temperature = 1.0 if kind in ("ce", "mse") else 2.0
        loss, grad = ours_with_grad(
            kind, student, teacher, mask, labels, vocab_size=300, temperature=temperature,
            **options,
        )  # fmt: skip
        ref_loss, ref_grad = reference(
            kind, student, teacher, mask, labels, 300, temperature, **options
        )
        assert loss.dtype == torch.float32 and grad.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-7, msg=kind)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-8, msg=kind)


# ----------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("beta, equivalent", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints_are_the_kl_divergences(beta, equivalent):
    student, teacher, mask, labels = make_case(5, 9, 20, 24)
    jsd, jsd_grad = ours_with_grad(
        "jsd", student, teacher, mask, labels, vocab_size=20, beta=beta, temperature=1.7
    )
    kl, kl_grad = ours_with_grad(
        equivalent, student, teacher, mask, labels, vocab_size=20, temperature=1.7
    )
    ref, _ = reference(equivalent, student, teacher, mask, labels, 20, 1.7)
    torch.testing.assert_close(jsd, kl, rtol=0, atol=0)
    torch.testing.assert_close(jsd_grad, kl_grad, rtol=0, atol=0)
    torch.testing.assert_close(jsd, ref, rtol=1e-6, atol=0)


def test_jsd_is_symmetric_at_one_half():
    student, teacher, mask, labels = make_case(6, 7, 20, 20)
    forward = call("jsd", student, teacher, mask, labels, beta=0.5)
    swapped = call("jsd", teacher, student, mask, labels, beta=0.5)
    torch.testing.assert_close(forward, swapped, rtol=1e-9, atol=0)
    assert 0 < forward < math.log(2)  # the JSD at 1/2 is bounded by log 2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "topk"])
def test_divergences_are_nonnegative_and_zero_for_identical_inputs(kind):
    options = OPTIONS.get(kind, {})
    student, teacher, mask, labels = make_case(7, 12, 30, 32)
    value = call(kind, student, teacher, mask, labels, vocab_size=30, **options)
    assert value > 0
    same, grad = ours_with_grad(kind, student, student, mask, labels, vocab_size=30, **options)
    assert abs(same.item()) < 1e-12
    assert grad.abs().max() < 1e-12


def test_tvd_is_zero_for_identical_and_at_most_one():
    student, teacher, mask, labels = make_case(8, 12, 30, 32, scale=20.0)
    assert abs(call("tvd", student, student, mask, labels, vocab_size=30).item()) < 1e-12
    assert 0 < call("tvd", student, teacher, mask, labels, vocab_size=30) <= 1.0


def test_skew_with_alpha_zero_is_the_plain_kl():
    student, teacher, mask, labels = make_case(9, 8, 25, 32)
    for kind, plain in (("skew_kl", "forward_kl"), ("skew_rkl", "reverse_kl")):
        skew, skew_grad = ours_with_grad(
            kind, student, teacher, mask, labels, vocab_size=25, alpha=0.0
        )
        kl, kl_grad = ours_with_grad(plain, student, teacher, mask, labels, vocab_size=25)
        torch.testing.assert_close(skew, kl, rtol=1e-9, atol=0)
        torch.testing.assert_close(skew_grad, kl_grad, rtol=1e-9, atol=1e-15)


def test_soft_ce_is_forward_kl_plus_teacher_entropy():
    student, teacher, mask, labels = make_case(10, 8, 25, 25)
    ce = call("soft_ce", student, teacher, mask, labels, temperature=3.0)
    kl = call("forward_kl", student, teacher, mask, labels, temperature=3.0)
    q = torch.softmax(teacher / 3.0, dim=-1)
    entropy = -(q * q.log()).sum(-1)
    torch.testing.assert_close(ce - kl, (entropy * mask).sum() / mask.sum(), rtol=1e-9, atol=0)


def test_temperature_divides_the_logits():
    student, teacher, mask, labels = make_case(11, 8, 25, 25)
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd", "topk"):
        options = OPTIONS.get(kind, {})
        hot = call(kind, student, teacher, mask, labels, temperature=4.0, **options)
        cooled = call(kind, student / 4.0, teacher / 4.0, mask, labels, **options)
        torch.testing.assert_close(hot, cooled, rtol=1e-12, atol=0)
    # the gradient with respect to the raw logits carries the chain rule's 1/T
    _, hot_grad = ours_with_grad("forward_kl", student, teacher, mask, labels, temperature=4.0)
    _, cool_grad = ours_with_grad("forward_kl", student / 4.0, teacher / 4.0, mask, labels)
    torch.testing.assert_close(hot_grad, cool_grad / 4.0, rtol=1e-12, atol=1e-15)


def test_topk_with_the_whole_vocabulary_is_the_forward_kl():
    student, teacher, mask, labels = make_case(12, 6, 15, 16)
    whole = call("topk", student, teacher, mask, labels, vocab_size=15, k=15)
    kl = call("forward_kl", student, teacher, mask, labels, vocab_size=15)
    torch.testing.assert_close(whole, kl, rtol=1e-9, atol=0)


def test_mse_is_mean_over_the_real_vocabulary():
    student, teacher, mask, labels = make_case(13, 5, 10, 16)
    value = call("mse", student, teacher, mask, labels, vocab_size=10)
    expected = ((student[:, :10] - teacher[:, :10]) ** 2).mean(-1)
    torch.testing.assert_close(value, (expected * mask).sum() / mask.sum(), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------
# Precision, dtype, autograd behaviour


def test_bf16_inputs_accumulate_in_fp32():
    """With 8192 bf16 columns, bf16 sums would be off by about 1e-2; fp32 accumulation keeps the
    loss within fp32 rounding of the fp64 reference computed on the same bf16 values."""
    vocab = 8192
    student, teacher, mask, labels = make_case(14, 6, vocab, vocab, scale=2.0, dtype=torch.bfloat16)
    leaf = student.clone().requires_grad_()
    loss = forward_kl(leaf, teacher, mask, temperature=2.0)
    loss.backward()
    assert loss.dtype == torch.float32
    assert leaf.grad.dtype == torch.bfloat16
    ref_loss, ref_grad = reference("forward_kl", student, teacher, mask, labels, vocab, 2.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    # grads are rounded once to bf16 (8 bits of mantissa)
    torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=1e-2, atol=1e-9)
    naive = (
        torch.softmax(teacher / 2.0, -1)
        * (torch.log_softmax(teacher / 2.0, -1) - torch.log_softmax(leaf.detach() / 2.0, -1))
    ).sum(-1)
    naive_loss = (naive.double() * mask).sum() / mask.sum()
    assert abs(naive_loss - ref_loss) > 10 * abs(loss.double() - ref_loss)


def test_teacher_gets_no_gradient_and_student_grad_has_input_dtype():
    student, teacher, mask, labels = make_case(15, 5, 12, 16, dtype=torch.float32)
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    forward_kl(s, t, mask, vocab_size=12).backward()
    assert t.grad is None
    assert s.grad.dtype == torch.float32 and s.grad.shape == s.shape


def test_backward_scales_the_stored_gradient():
    student, teacher, mask, labels = make_case(16, 5, 12, 12)
    s = student.clone().requires_grad_()
    (3.5 * call("reverse_kl", s, teacher, mask, None)).backward()
    _, ref_grad = reference("reverse_kl", student, teacher, mask, labels, 12)
    torch.testing.assert_close(s.grad, 3.5 * ref_grad, rtol=1e-9, atol=1e-15)


def test_a_second_backward_fails_clearly():
    student, teacher, mask, _ = make_case(17, 5, 12, 12)
    s = student.clone().requires_grad_()
    loss = forward_kl(s, teacher, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_without_grad_nothing_is_stored():
    student, teacher, mask, labels = make_case(18, 5, 12, 12)
    with torch.no_grad():
        value = forward_kl(student.clone().requires_grad_(), teacher, mask)
    assert not value.requires_grad
    ref, _ = reference("forward_kl", student, teacher, mask, labels, 12)
    torch.testing.assert_close(value, ref, rtol=1e-9, atol=0)


def test_an_empty_mask_gives_zero():
    student, teacher, _, labels = make_case(19, 4, 12, 12)
    s = student.clone().requires_grad_()
    loss = forward_kl(s, teacher, torch.zeros(4))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(s.grad == 0)


def test_fractional_mask_weights_are_a_weighted_mean():
    student, teacher, _, labels = make_case(20, 4, 12, 12)
    weights = torch.tensor([0.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    value = forward_kl(student, teacher, weights)
    ref, _ = reference("forward_kl", student, teacher, weights, labels, 12)
    torch.testing.assert_close(value, ref, rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, message):
    student, teacher, mask, _ = make_case(21, 4, 12, 12)
    with pytest.raises(ValueError, match=message):
        forward_kl(student, teacher, mask, **kwargs)


def test_shape_mismatches_raise_value_errors():
    student, teacher, mask, labels = make_case(22, 4, 12, 12)
    with pytest.raises(ValueError, match="same"):
        forward_kl(student, teacher[:, :8], mask)
    with pytest.raises(ValueError, match="loss_mask"):
        forward_kl(student, teacher, mask[:3])
    with pytest.raises(ValueError, match="labels"):
        vp.cross_entropy(student, labels[:2], mask)
    with pytest.raises(ValueError, match="beta"):
        call("jsd", student, teacher, mask, None, beta=1.5)
    with pytest.raises(ValueError, match="k must be"):
        call("topk", student, teacher, mask, None, k=13)


def test_vocab_shard_is_built_once_from_a_loss_context():
    from methods.base import LossContext, Stage

    ctx = LossContext(
        step=0, total_steps=1, stage=Stage.TASK, loss_mask=torch.ones(2), labels=None,
        vocab_start=16, vocab_size=30, extras={vp.CHUNK_SIZE_EXTRA: 7},
    )  # fmt: skip
    assert vp.VocabShard.of(ctx) == vp.VocabShard(start=16, vocab_size=30, chunk_size=7)
    assert vp.VocabShard() == vp.UNSHARDED  # one unsharded, unpadded vocabulary
    with pytest.raises(ValueError, match="vocab_start"):
        vp.VocabShard(start=-1)


@pytest.mark.gpu
def test_cuda_bf16_matches_reference():
    student, teacher, mask, labels = make_case(23, 64, 1000, 1024, dtype=torch.bfloat16)
    leaf = student.cuda().requires_grad_()
    loss = forward_kl(leaf, teacher.cuda(), mask.cuda(), vocab_size=1000, temperature=2.0)
    loss.backward()
    ref_loss, ref_grad = reference("forward_kl", student, teacher, mask, labels, 1000, 2.0)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_grad, rtol=1e-2, atol=1e-8)
