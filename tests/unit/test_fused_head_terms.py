"""The fused head's smaller workspace and its two-term pass (issue 18, wave 4), against fp64
references written here from the definitions (``log_softmax`` of hand-built logits ``h @ W^T``):

- the in-place kernels (forward KL and cross entropy overwrite the chunk's own logits buffers)
  give the same loss and gradients (1e-10 relative in fp64) at temperature 1, where the chunk's
  logits are the matmul's output buffer itself;
- the fused forward KL keeps only two chunk-sized buffers (the student's and the teacher's
  logits), not five;
- ``kd``'s soft and hard terms in one pass over the student head (:func:`fused_head.soft_and_hard`):
  both losses and the gradients of ``soft_weight * soft + hard_weight * hard`` w.r.t. the hidden
  states and the output weight equal Hinton's KD written by hand; adding the losses with other
  weights than declared raises instead of giving a wrong gradient.
"""

from __future__ import annotations

import pytest
import torch

from methods import fused_head as fh
from methods import vocab_kernels as vk
from methods import vocab_parallel as vp
from methods.fused_head import HeadInput

pytestmark = pytest.mark.unit

N, H_S, H_T, V, CHUNK = 29, 12, 20, 45, 8
REL = 1e-10


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H_S, generator=gen, dtype=torch.float64).requires_grad_()
    ws = (torch.randn(V, H_S, generator=gen, dtype=torch.float64) / H_S**0.5 * 2).requires_grad_()
    ht = torch.randn(N, H_T, generator=gen, dtype=torch.float64)
    wt = torch.randn(V, H_T, generator=gen, dtype=torch.float64) / H_T**0.5 * 2
    mask = (torch.rand(N, generator=gen) > 0.25).double()
    labels = torch.randint(0, V, (N,), generator=gen)
    return hs, ws, ht, wt, mask, labels


def _close(got, want, rel=REL):
    scale = want.abs().max().clamp_min(1e-30)
    assert float((got - want).abs().max() / scale) < rel


def _masked_mean(per_token, mask):
    return (per_token * mask).sum() / mask.sum()


def _ref_kl(hs, ws, ht, wt, mask, temperature):
    log_p = torch.log_softmax(hs @ ws.T / temperature, -1)
    log_q = torch.log_softmax(ht @ wt.T / temperature, -1)
    return _masked_mean((log_q.exp() * (log_q - log_p)).sum(-1), mask)


def _ref_soft_ce(hs, ws, ht, wt, mask, temperature):
    log_p = torch.log_softmax(hs @ ws.T / temperature, -1)
    q = torch.softmax(ht @ wt.T / temperature, -1)
    return _masked_mean(-(q * log_p).sum(-1), mask)


def _ref_ce(hs, ws, labels, mask):
    log_p = torch.log_softmax(hs @ ws.T, -1)
    return _masked_mean(-log_p.gather(1, labels[:, None]).squeeze(1), mask)


def test_in_place_kernels_at_temperature_one_match_hand_reference():
    hs, ws, ht, wt, mask, labels = _inputs()
    shard = vp.VocabShard(chunk_size=CHUNK)
    kl = vp.divergence(vk.forward_kl_kernel, HeadInput(hs, ws), HeadInput(ht, wt), mask, shard)
    ce = vp.cross_entropy(HeadInput(hs, ws), labels, mask, shard)  # type: ignore[arg-type]
    ref_kl = _ref_kl(hs, ws, ht, wt, mask, 1.0)
    ref_ce = _ref_ce(hs, ws, labels, mask)
    _close(kl.detach(), ref_kl.detach())
    _close(ce.detach(), ref_ce.detach())
    for got, want in zip(
        torch.autograd.grad(kl + 0.3 * ce, (hs, ws)),
        torch.autograd.grad(ref_kl + 0.3 * ref_ce, (hs, ws)),
        strict=True,
    ):
        _close(got, want)


def test_fused_forward_kl_keeps_two_chunk_buffers(monkeypatch):
    """The workspace of the fused forward KL: the chunk's two logits buffers (overwritten with
    the exponentials and the gradient) and two small row blocks, nothing else."""
    made = []
    original = vk.Workspace.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(vk.Workspace, "__init__", spy)
    hs, ws, ht, wt, mask, _ = _inputs(seed=1)
    shard = vp.VocabShard(chunk_size=CHUNK)
    loss = vp.divergence(vk.forward_kl_kernel, HeadInput(hs, ws), HeadInput(ht, wt), mask, shard)
    loss.backward()
    names = sorted(name for work in made for name in work.buffers)
    assert names == ["block:et", "block:gap", "s", "t"], names
    _close(loss.detach(), _ref_kl(hs.detach(), ws.detach(), ht, wt, mask, 1.0).detach())


def test_default_chunk_from_a_byte_budget():
    teacher = object()
    # 16 MiB for the student's and the teacher's fp32 logits of the chunk
    assert fh.default_chunk(32768, torch.float32, teacher) == 64
    assert fh.default_chunk(32768, torch.float32, None) == 128
    assert fh.default_chunk(131072, torch.float32, teacher) == fh.FUSED_MIN_CHUNK_TOKENS
    assert fh.default_chunk(50, torch.float32, teacher) == fh.FUSED_MAX_CHUNK_TOKENS


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_kd_soft_and_hard_in_one_pass_match_hinton_by_hand(kind):
    hs, ws, ht, wt, mask, labels = _inputs(seed=2)
    temperature, soft_weight, hard_weight = 2.0, 0.7, 0.4
    soft, hard = fh.soft_and_hard(
        kind,
        HeadInput(hs, ws),
        HeadInput(ht, wt),
        labels,
        mask,
        vp.VocabShard(chunk_size=CHUNK),
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
    )
    if kind == "kl":
        ref_soft = _ref_kl(hs, ws, ht, wt, mask, temperature) * temperature**2
    else:
        ref_soft = _ref_soft_ce(hs, ws, ht, wt, mask, temperature)
    ref_hard = _ref_ce(hs, ws, labels, mask)
    _close(soft.detach(), ref_soft.detach())
    _close(hard.detach(), ref_hard.detach())
    # the objective adds them with the declared weights, times a common factor (e.g. a method
    # weight); only the student head's three matmuls ran, once for both terms
    total = 1.5 * (soft_weight * soft + hard_weight * hard)
    ref_total = 1.5 * (soft_weight * ref_soft + hard_weight * ref_hard)
    for got, want in zip(
        torch.autograd.grad(total, (hs, ws)), torch.autograd.grad(ref_total, (hs, ws)), strict=True
    ):
        _close(got, want)


def test_kd_terms_added_with_other_weights_raise():
    hs, ws, ht, wt, mask, labels = _inputs(seed=3)
    soft, hard = fh.soft_and_hard(
        "kl",
        HeadInput(hs, ws),
        HeadInput(ht, wt),
        labels,
        mask,
        vp.VocabShard(chunk_size=CHUNK),
        temperature=1.0,
        soft_weight=1.0,
        hard_weight=0.5,
    )
    with pytest.raises(RuntimeError, match="combined with weights"):
        (soft + hard).backward()


def test_materialized_logits_give_the_same_terms():
    """On logits (the materialized path) :func:`vocab_parallel.divergences` is one loss per term."""
    hs, ws, ht, wt, mask, labels = _inputs(seed=4)
    shard = vp.VocabShard(chunk_size=CHUNK)
    soft, hard = fh.soft_and_hard(
        "ce",
        hs @ ws.T,
        ht @ wt.T,
        labels,
        mask,
        shard,
        temperature=1.5,
        soft_weight=1.0,
        hard_weight=2.0,
    )
    _close(soft.detach(), _ref_soft_ce(hs, ws, ht, wt, mask, 1.5).detach())
    _close(hard.detach(), _ref_ce(hs, ws, labels, mask).detach())
