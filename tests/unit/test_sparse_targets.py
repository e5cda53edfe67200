"""Sparse teacher targets (methods.sparse_targets) against independent references.

- The reference is written from the formulas in plain fp64 torch with autograd: both models'
  softmax over the whole vocabulary, coarsened to the buckets (each kept id, one tail bucket), the
  divergence of the two bucket distributions, the masked mean, ``backward()``.
- A dense top-k (k = V) must give the dense loss and gradient of the existing
  ``vocab_parallel.divergence`` (the co-located teacher's path) for every divergence.
- The sampled forward KL's mean over many independent draws equals the dense loss and gradient
  within a few standard errors computed from the draws.
(TP=2 in tests/dist/test_sparse_targets_tp.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from methods import sparse_targets as st
from methods import vocab_kernels as vk
from methods import vocab_parallel as vp
from methods.fused_head import HeadInput

pytestmark = pytest.mark.unit

KINDS = {  # kernel name -> (kernel, params)
    "forward_kl": (vk.forward_kl_kernel, {}),
    "soft_ce": (vk.soft_ce_kernel, {}),
    "reverse_kl": (vk.reverse_kl_kernel, {}),
    "jsd": (vk.jsd_kernel(0.3), {"beta": 0.3}),
    "skew_kl": (vk.skew_kl_kernel(0.2), {"alpha": 0.2}),
    "skew_rkl": (vk.skew_reverse_kl_kernel(0.25), {"alpha": 0.25}),
    "tvd": (vk.tvd_kernel, {}),
    "topk": (vk.topk_kernel(3), {"k": 3}),
}


def _bucket_divergence(kind, Q, P, params):
    """Per-token divergence of two ``[N, B]`` bucket distributions, from its definition."""

    def log(x):  # an empty bucket (the tail when k = V) contributes 0, and no NaN gradient
        return x.clamp(min=1e-300).log()

    def kl(a, b):
        return torch.where(a > 0, a * (log(a) - log(b)), 0.0).sum(-1)

    if kind in ("forward_kl", "topk"):
        return kl(Q, P)
    if kind == "soft_ce":
        return -torch.where(Q > 0, Q * log(P), 0.0).sum(-1)
    if kind == "reverse_kl":
        return kl(P, Q)
    if kind == "jsd":
        b = params["beta"]
        m = b * Q + (1 - b) * P
        return b * kl(Q, m) + (1 - b) * kl(P, m)
    if kind == "skew_kl":
        a = params["alpha"]
        return kl(Q, a * Q + (1 - a) * P)
    if kind == "skew_rkl":
        a = params["alpha"]
        return kl(P, a * P + (1 - a) * Q)
    if kind == "tvd":
        return 0.5 * (P - Q).abs().sum(-1)
    raise AssertionError(kind)


def reference(kind, student, teacher, mask, kept, temperature, params):
    """fp64 ``(loss, grad)`` with the teacher coarsened to the kept ids ``kept`` ``[N, k]`` (-1:
    none) and one tail bucket; ``kept = all ids`` is the dense divergence."""
    s = student.detach().double().requires_grad_()
    p = torch.softmax(s / temperature, -1)
    q = torch.softmax(teacher.double() / temperature, -1)
    if kind == "topk":
        kept = kept[:, : params["k"]]
    valid = kept >= 0
    idx = kept.clamp(min=0)
    member = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, valid)
    P = torch.cat([p.gather(1, idx) * valid, (p * ~member).sum(-1, keepdim=True)], 1)
    Q = torch.cat([q.gather(1, idx) * valid, (q * ~member).sum(-1, keepdim=True)], 1)
    per_token = _bucket_divergence(kind, Q, P, params)
    m = mask.double()
    loss = (per_token * m).sum() / m.sum()
    loss.backward()
    return loss.detach(), s.grad


def _case(seed, n=9, v=13, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    mask = (torch.rand(n, generator=g) > 0.3).double()
    mask[0] = 1.0
    return s, t, mask


def _ours(kernel, s, targets, mask, temperature, chunk_size=4):
    leaf = s.clone().requires_grad_()
    loss = vp.divergence(
        kernel, leaf, targets, mask, vp.VocabShard(chunk_size=chunk_size), temperature=temperature
    )
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("kind", list(KINDS))
def test_dense_topk_equals_the_colocated_teacher_and_the_reference(kind):
    s, t, mask = _case(1)
    kernel, params = KINDS[kind]
    temperature = 1.7
    targets = st.from_logits_topk(t, t.shape[1], temperature=temperature)
    assert targets.tail is not None and float(targets.tail.abs().max()) == 0.0
    loss, grad = _ours(kernel, s, targets, mask, temperature)
    dense_leaf = s.clone().requires_grad_()
    dense = vp.divergence(kernel, dense_leaf, t, mask, temperature=temperature)
    dense.backward()
    ref_loss, ref_grad = reference(kind, s, t, mask, targets.ids, temperature, params)
    # the targets hold fp32 probabilities: fp32 tolerance
    assert loss.item() == pytest.approx(dense.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad, dense_leaf.grad, rtol=1e-5, atol=1e-7)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", list(KINDS))
def test_topk_with_a_tail_equals_the_bucket_reference(kind):
    s, t, mask = _case(2)
    kernel, params = KINDS[kind]
    targets = st.from_logits_topk(t, 5, temperature=1.0)
    assert float(targets.tail.min()) > 0
    loss, grad = _ours(kernel, s, targets, mask, 1.0, chunk_size=2)
    ref_loss, ref_grad = reference(kind, s, t, mask, targets.ids, 1.0, params)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_topk_kd_from_a_larger_cache_equals_topk_kd_on_dense_logits():
    s, t, mask = _case(3)
    targets = st.from_logits_topk(t, 6, temperature=1.0)
    loss, grad = _ours(vk.topk_kernel(3), s, targets, mask, 1.0)
    dense_loss, dense_grad = _ours(vk.topk_kernel(3), s, t, mask, 1.0)
    assert loss.item() == pytest.approx(dense_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(st.SparseTargetsUnsupported, match="k >= 7"):
        vp.divergence(vk.topk_kernel(7), s, targets, mask)


def test_padded_vocabulary_columns_get_no_gradient():
    s, t, mask = _case(4, v=16)
    real = 11
    targets = st.from_logits_topk(t, 4, vp.VocabShard(vocab_size=real), temperature=1.0)
    assert int(targets.ids.max()) < real
    leaf = s.clone().requires_grad_()
    vp.divergence(
        vk.jsd_kernel(0.5), leaf, targets, mask, vp.VocabShard(vocab_size=real)
    ).backward()
    assert float(leaf.grad[:, real:].abs().max()) == 0.0
    ref_loss, ref_grad = reference(
        "jsd", s[:, :real], t[:, :real], mask, targets.ids, 1.0, {"beta": 0.5}
    )
    torch.testing.assert_close(leaf.grad[:, :real], ref_grad, rtol=1e-5, atol=1e-7)


def test_fused_head_student_equals_materialized_logits():
    g = torch.Generator().manual_seed(5)
    n, h, v = 10, 6, 17
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(n, dtype=torch.float64)
    targets = st.from_logits_topk(t, 4, temperature=1.3)
    hs, ws = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = vp.divergence(vk.reverse_kl_kernel, HeadInput(hs, ws), targets, mask, temperature=1.3)
    fused.backward()
    hm, wm = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = vp.divergence(vk.reverse_kl_kernel, hm @ wm.T, targets, mask, temperature=1.3)
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-10)
    torch.testing.assert_close(hs.grad, hm.grad)
    torch.testing.assert_close(ws.grad, wm.grad)


def test_sampled_forward_kl_is_unbiased_for_the_dense_loss_and_gradient():
    """Many independent draws of n = 4 samples per token: the mean of the estimates (loss and
    gradient) is within 4.5 standard errors of the dense forward KL (the standard error from the
    draws themselves)."""
    s, t, _ = _case(6, n=3, v=8, scale=1.5)
    reps, n = 4000, 4
    temperature = 1.2
    rows = s.shape[0]
    s_rep, t_rep = s.repeat(reps, 1), t.repeat(reps, 1)  # replicate r is rows r*rows..(r+1)*rows
    gen = torch.Generator().manual_seed(7)
    targets = st.from_logits_sampled(t_rep, n, temperature=temperature, generator=gen)
    assert torch.allclose(targets.weights.sum(1), torch.ones(1, dtype=torch.float32))
    mask = torch.ones(rows * reps, dtype=torch.float64)
    leaf = s_rep.clone().requires_grad_()
    loss = vp.divergence(vk.forward_kl_kernel, leaf, targets, mask, temperature=temperature)
    loss.backward()
    per_draw_grad = (leaf.grad * reps).view(reps, rows, -1)  # each draw set's own gradient
    dense_leaf = s.clone().requires_grad_()
    dense = vp.divergence(vk.forward_kl_kernel, dense_leaf, t, mask[:rows], temperature=temperature)
    dense.backward()
    # the loss: the per-draw estimate written out (for its spread only)
    log_p = torch.log_softmax(s_rep / temperature, -1)
    est = -(targets.weights.double() * log_p.gather(1, targets.ids.clamp(min=0))).sum(1)
    est = (est - targets.entropy.double()).view(reps, rows).mean(1)
    se_loss = est.std() / math.sqrt(reps)
    assert abs(loss.item() - dense.item()) < 4.5 * se_loss.item() + 1e-6
    assert loss.item() == pytest.approx(est.mean().item(), rel=1e-5)
    mean_grad = per_draw_grad.mean(0)
    se_grad = per_draw_grad.std(0) / math.sqrt(reps)
    assert bool(((mean_grad - dense_leaf.grad).abs() <= 4.5 * se_grad + 1e-9).all())
    # and the estimate is not trivially the dense one
    assert float((per_draw_grad[0] - dense_leaf.grad).abs().max()) > 1e-3


def test_sampled_draws_follow_q():
    t = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0]], dtype=torch.float64)
    q = torch.softmax(t / 0.8, -1)
    gen = torch.Generator().manual_seed(11)
    targets = st.from_logits_sampled(t.repeat(2000, 1), 16, temperature=0.8, generator=gen)
    freq = torch.zeros(5, dtype=torch.float64)
    freq.scatter_add_(0, targets.ids.clamp(min=0).view(-1), targets.weights.double().view(-1))
    freq /= 2000
    se = (q * (1 - q) / (2000 * 16)).sqrt()
    assert bool(((freq - q).abs() <= 4.5 * se + 1e-12).all())
    assert targets.entropy[0].item() == pytest.approx(float(-(q * q.log()).sum()), rel=1e-6)


def test_sampled_soft_ce_and_refusals():
    s, t, mask = _case(8)
    targets = st.from_logits_sampled(t, 12, temperature=1.0, generator=torch.Generator())
    loss, grad = _ours(vk.soft_ce_kernel, s, targets, mask, 1.0)
    # soft CE against the empirical distribution of the draws, written out
    leaf = s.clone().requires_grad_()
    log_p = torch.log_softmax(leaf, -1)
    per = -(targets.weights.double() * log_p.gather(1, targets.ids.clamp(min=0))).sum(1)
    ref = (per * mask).sum() / mask.sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, leaf.grad)
    for kernel in (vk.reverse_kl_kernel, vk.jsd_kernel(0.5), vk.tvd_kernel, vk.topk_kernel(2)):
        name = kernel.name  # type: ignore[attr-defined]
        assert st.supports(name, "sampled") is not None
        assert st.supports(name, "topk") is None
        with pytest.raises(st.SparseTargetsUnsupported, match="nonlinear"):
            vp.divergence(kernel, s, targets, mask)
    assert "raw logits" in (st.supports("mse", "topk") or "")
    with pytest.raises(st.SparseTargetsUnsupported, match="mse"):
        vp.divergence(vk.mse_kernel(), s, st.from_logits_topk(t, 3, temperature=1.0), mask)
    with pytest.raises(ValueError, match="temperature 1 but the loss asks for 2"):
        vp.divergence(vk.forward_kl_kernel, s, targets, mask, temperature=2.0)
    topk = st.from_logits_topk(t, 3, temperature=2.0)  # top-k is not re-tempered either
    with pytest.raises(ValueError, match="temperature 2 but the loss asks for 1"):
        vp.divergence(vk.forward_kl_kernel, s, topk, mask, temperature=1.0)


def test_remap_to_a_compressed_vocabulary_equals_the_restricted_dense_teacher():
    s, t, mask = _case(9, v=12)
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    orig_to_comp = torch.full((12,), -1, dtype=torch.long)
    orig_to_comp[kept] = torch.arange(len(kept))
    targets = st.from_logits_topk(t, 12, temperature=1.0).remap(orig_to_comp)
    s_comp = s[:, : len(kept)]
    loss, grad = _ours(vk.skew_kl_kernel(0.2), s_comp, targets, mask, 1.0)
    ref_loss, ref_grad = _ours(vk.skew_kl_kernel(0.2), s_comp, t[:, kept], mask, 1.0)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    # dropped ids mapped to a replacement: their mass merges into it
    merged = torch.arange(12)
    merged[1] = 0
    m = st.from_logits_topk(t, 12, temperature=1.0).remap(merged)
    q = torch.softmax(t, -1)
    row = m.weights[0][m.ids[0] == 0]
    assert row.item() == pytest.approx(float(q[0, 0] + q[0, 1]), rel=1e-5)
    assert int((m.ids[0] >= 0).sum()) == 11


def test_local_keeps_only_the_shard_entries():
    ids = torch.tensor([[3, 9, 5, -1]])
    w = torch.tensor([[0.4, 0.3, 0.2, 0.0]])
    t = st.SparseTargets("topk", ids, w, torch.tensor([0.1]), None, 1.0)
    loc = t.local(4, 8)
    assert loc.ids.tolist() == [[-1, -1, 1, -1]] and loc.offset == 4
    assert loc.weights[0].tolist() == pytest.approx([0.0, 0.0, 0.2, 0.0])
    assert t.local(0, 12).local(8, 12).ids.tolist() == [[-1, 1, -1, -1]]


def test_a_shard_view_gives_the_same_loss_as_the_global_targets():
    s, t, mask = _case(11, v=10)
    targets = st.from_logits_topk(t, 4, temperature=1.0)
    # one unsharded "shard" covering everything, seen through local(): ids offset by 0
    loss, grad = _ours(vk.jsd_kernel(0.4), s, targets.local(0, 10), mask, 1.0)
    ref, ref_grad = _ours(vk.jsd_kernel(0.4), s, targets, mask, 1.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad)
    with pytest.raises(ValueError, match="global targets"):
        vp.divergence(vk.topk_kernel(2), s, targets.local(0, 10), mask)


def test_padding_entries_never_hide_a_kept_column():
    """k > V pads with id -1 entries; they must not unmark column 0 (a kept id) on the way."""
    s, t, mask = _case(10, v=6)
    t[:, 0] += 5.0  # column 0 is every token's top id
    targets = st.from_logits_topk(t, 9, temperature=1.0)
    assert (targets.ids[:, -3:] == -1).all() and float(targets.tail.abs().max()) == 0.0
    loss, grad = _ours(vk.tvd_kernel, s, targets, mask, 1.0)
    dense_loss, dense_grad = _ours(vk.tvd_kernel, s, t, mask, 1.0)
    assert loss.item() == pytest.approx(dense_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-5, atol=1e-7)
