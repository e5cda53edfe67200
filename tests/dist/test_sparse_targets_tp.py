"""Sparse teacher targets at TP=2 over gloo (one launch for every case): building the targets from
vocab-sharded teacher logits gives the unsharded targets, and every divergence against them gives
the unsharded loss and gradient shards, padded vocabulary columns included (the unsharded values
are themselves checked against an fp64 reference in tests/unit/test_sparse_targets.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from methods import sparse_targets as st
from methods import vocab_parallel as vp
from tests.distributed import run_on_ranks
from tests.unit.test_sparse_targets import KINDS

pytestmark = pytest.mark.dist

WORLD = 2
# (real vocabulary, padded vocabulary): rank 1's shard is part padding, then only padding
LAYOUTS = ((37, 48), (20, 48))


def _case(vocab_size, padded, n=11):
    g = torch.Generator().manual_seed(vocab_size)
    s = torch.randn(n, padded, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, padded, generator=g, dtype=torch.float64) * 2
    mask = (torch.rand(n, generator=g) > 0.25).double()
    return s, t, mask


def _np(x):
    return None if x is None else x.detach().numpy()


def _targets_np(tg):
    return tuple(_np(x) for x in (tg.ids, tg.weights, tg.tail, tg.entropy))


def _on_rank(layouts):
    rank, group = dist.get_rank(), dist.group.WORLD
    out = []
    for vocab_size, padded in layouts:
        s, t, mask = _case(vocab_size, padded)
        width = padded // WORLD
        cols = slice(rank * width, (rank + 1) * width)
        sharded = vp.VocabShard(rank * width, vocab_size, group, chunk_size=4)
        single = vp.VocabShard(0, vocab_size, None, chunk_size=4)
        for k in (5, vocab_size):
            tp = st.from_logits_topk(t[:, cols], k, sharded, temperature=1.4)
            one = st.from_logits_topk(t, k, single, temperature=1.4)
            out.append(("topk", vocab_size, k, _targets_np(tp), _targets_np(one)))
        gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        tp = st.from_logits_sampled(t[:, cols], 12, sharded, temperature=1.4, generator=gen_a)
        one = st.from_logits_sampled(t, 12, single, temperature=1.4, generator=gen_b)
        out.append(("sampled", vocab_size, 12, _targets_np(tp), _targets_np(one)))
        targets = {
            "topk": st.from_logits_topk(t, 6, single, temperature=1.4),
            "sampled": one,
        }
        for rep, tg in targets.items():
            for kind, (kernel, _) in KINDS.items():
                if st.supports(kind, rep) is not None:
                    continue
                leaf = s[:, cols].clone().requires_grad_()
                loss = vp.divergence(kernel, leaf, tg, mask, sharded, temperature=1.4)
                loss.backward()
                full = s.clone().requires_grad_()
                ref = vp.divergence(kernel, full, tg, mask, single, temperature=1.4)
                ref.backward()
                out.append(
                    ("loss", vocab_size, f"{rep}/{kind}", (_np(loss), _np(leaf.grad)),
                     (_np(ref), _np(full.grad[:, cols])))
                )  # fmt: skip
        # each rank holding only its own slice of the targets (what a cache reader may give)
        for kind in ("forward_kl", "jsd"):
            kernel = KINDS[kind][0]
            mine = targets["topk"].local(rank * width, rank * width + width)
            leaf = s[:, cols].clone().requires_grad_()
            loss = vp.divergence(kernel, leaf, mine, mask, sharded, temperature=1.4)
            loss.backward()
            full = s.clone().requires_grad_()
            ref = vp.divergence(kernel, full, targets["topk"], mask, single, temperature=1.4)
            ref.backward()
            out.append(
                ("local", vocab_size, kind, (_np(loss), _np(leaf.grad)),
                 (_np(ref), _np(full.grad[:, cols])))
            )  # fmt: skip
    return out


def test_tp2_equals_tp1():
    per_rank = run_on_ranks(_on_rank, WORLD, LAYOUTS)
    cases = 0
    for results in per_rank:
        for what, vocab_size, detail, got, want in results:
            label = f"{what} V={vocab_size} {detail}"
            for a, b in zip(got, want, strict=True):
                if a is None or b is None:
                    assert a is None and b is None, label
                    continue
                torch.testing.assert_close(
                    torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-6, msg=label
                )
            cases += 1
    # 2 ranks x 2 layouts x (2 top-k + 1 sampled + 8 top-k + 2 sampled + 2 local-view losses)
    assert cases == 2 * 2 * 15
