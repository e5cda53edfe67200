"""The teacher's next-token distribution as sparse targets, and every logit divergence against them.

An offline teacher cache (:mod:`gkd_cli.teacher_cache`) cannot keep ``[N, V]`` logits: it keeps,
per token, a few (id, weight) pairs of the teacher's distribution ``q = softmax(t / T)``. Two
representations (:class:`SparseTargets`):

- ``topk``: the ``k`` most likely ids with their probabilities ``q_i`` (sorted, most likely
  first) and the ``tail`` mass ``1 - sum_i q_i`` of all the other ids. The vocabulary is then
  seen as ``k + 1`` *buckets*: each kept id alone, and one tail bucket holding the rest. A
  divergence is computed between the bucket distributions ``Q_b`` (teacher) and ``P_b`` (student,
  ``P_tail`` = the student's mass outside the kept ids). This is exact when ``k = V`` (the tail is
  empty) and otherwise is the divergence of the two distributions coarsened to the buckets (by the
  data-processing inequality, never more than the dense one for an f-divergence).
- ``sampled``: ``n`` ids drawn from ``q`` (with replacement; duplicates merged) with weights
  ``w_i = count_i / n``, so ``E[w_i] = q_i`` and ``sum_i w_i f(i)`` is an unbiased estimate of
  ``E_q[f]`` for any ``f`` (Anshumann et al., ACL 2025, "Sparse Logit Sampling": random-sampling
  KD gives unbiased gradients). Only losses *linear* in ``q`` have an unbiased estimate: the soft
  cross entropy ``H(q, p) = -E_q[log p]`` (``kd``) and the forward KL ``H(q, p) - H(q)`` (the
  exact entropy ``H(q)`` is stored with the samples). Reverse KL, JSD, skew KL/RKL, TVD and top-k
  KD are nonlinear in ``q`` and are refused (:func:`supports` says why, before launch).

Temperature: ``q`` is computed at one temperature ``T_c`` (``SparseTargets.temperature``, recorded
in the cache). A distillation at another temperature would need ``q^(T_c/T)`` renormalized over the
whole vocabulary, which the sparse form cannot give exactly (the tail's shape is unknown) and which
the samples cannot give at all (they were drawn from ``q``). It is therefore **refused** (for both
representations) with an error naming both temperatures: build the cache at the temperature of
the distillation. The student's logits are divided by the distillation temperature as usual.

The losses (:func:`divergence`) are vocab-parallel exactly as :mod:`methods.vocab_parallel`:

- each tensor-parallel rank keeps only the targets whose ids fall in its vocabulary slice
  (:meth:`SparseTargets.local`); the tail mass and the entropy are per-token scalars, replicated;
- per token three all-reduces cross ranks: the student's row maximum, the two sums of exponentials
  (all columns, and the columns outside the kept ids: ``P_tail``), then the two partial sums of the
  divergence and of ``c`` below: 20 bytes per token in fp32, whatever ``V`` and ``k``;
- tokens are processed in chunks by :func:`methods.vocab_parallel.run_chunks` (the same chunk
  plan, the same masked mean over tokens, the same fused path when the student is a
  :class:`methods.fused_head.HeadInput`: the chunk kernel here is simply run with no teacher
  logits), and the gradient is computed in the forward pass.

The gradient. Let ``p = softmax(s)`` (``s`` the tempered student logits of all ``V`` columns) and
``P_b = sum_{j in b} p_j`` the student's bucket masses. Every divergence here is a sum over
buckets ``D = sum_b d(Q_b, P_b)`` of one elementwise term ``d``; let ``g_b = dd/dP_b``. Since
``dp_j/ds_l = p_j (delta_jl - p_l)``:

    dD/ds_l = sum_b g_b sum_{j in b} p_j (delta_jl - p_l) = p_l (g_{b(l)} - c),  c = sum_b P_b g_b.

So the gradient is ``p_l (g_tail - c)`` for a tail column plus ``p_l (g_l - g_tail)`` added at
the kept ids; ``c`` is one per-token sum. The terms ``d`` and ``g`` (``M = beta Q + (1-beta) P``,
``R`` the skew mixture):

==============  =======================================  ===============================
kind            d(Q, P)                                   g = dd/dP
==============  =======================================  ===============================
forward_kl      Q log(Q/P)                                -Q/P
soft_ce (kd)    -Q log P                                  -Q/P
reverse_kl      P log(P/Q)                                log(P/Q) + 1
jsd(beta)       beta Q log(Q/M) + (1-beta) P log(P/M)     (1-beta) log(P/M)
skew_kl(a)      Q log(Q/R), R = a Q + (1-a) P             -(1-a) Q/R
skew_rkl(a)     P log(P/R), R = a P + (1-a) Q             log(P/R) + 1 - a P/R
tvd             |P - Q| / 2                               sign(P - Q) / 2
==============  =======================================  ===============================

Terms with ``Q_b = P_b = 0`` are 0 (an empty tail when ``k = V``). For the sampled
representation the buckets are the sampled ids (``Q_b = w_b``) and an unweighted rest
(``Q = 0``), and the forward KL is the soft cross entropy minus the stored ``H(q)``; its gradient
``p - w`` is unbiased for ``p - q``. ``topk_kd`` with ``k'`` smaller than the cache's ``k`` moves
the cache's entries after the first ``k'`` into the tail (the top-k is sorted), which is exactly
top-k KD's ``k' + 1`` buckets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import torch

from methods import vocab_kernels as vk
from methods import vocab_parallel as vp

Tensor = torch.Tensor

TOPK: Final = "topk"
SAMPLED: Final = "sampled"
REPRESENTATIONS = (TOPK, SAMPLED)

DIVERGENCES = ("forward_kl", "soft_ce", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd", "topk")
"""Kernel names (``kernel.name`` of :mod:`methods.vocab_kernels`) a top-k cache supports."""
SAMPLED_DIVERGENCES = ("forward_kl", "soft_ce")
"""The ones with an unbiased estimate from samples (linear in the teacher's distribution)."""
_NEEDS = {
    "mse": "the teacher's raw logits (glmd and kd's mse form compare logits, not probabilities)",
    "cross_entropy": "no teacher at all (it is the student's own loss)",
}


class SparseTargetsUnsupported(ValueError):
    """A loss that cannot be computed against a sparse teacher representation."""

    def __init__(self, method: str, need: str) -> None:
        self.method, self.need = method, need
        super().__init__(
            f"{method} cannot be computed from a cached (sparse) teacher: it needs {need}"
        )


@dataclass(frozen=True, eq=False)
class SparseTargets:
    """The teacher's next-token distribution at ``N`` token positions, sparse.

    Token order is the logits' flattened order (s-major: ``index = position * b + row``)."""

    kind: Literal["topk", "sampled"]
    ids: Tensor
    """``[N, k]`` int64 GLOBAL vocabulary ids (the student's, after :meth:`remap`); padding
    entries have id -1 and weight 0. ``topk``: most likely first."""
    weights: Tensor
    """``[N, k]`` fp32. ``topk``: ``q_i`` at ``temperature``; ``sampled``: ``count_i / n``."""
    tail: Tensor | None
    """``[N]`` fp32: ``topk``: the mass outside ``ids`` (``1 - sum weights``); ``sampled``: None."""
    entropy: Tensor | None
    """``[N]`` fp32: the teacher's entropy ``H(q)`` per token (needed for sampled forward-KL
    values; optional otherwise)."""
    temperature: float
    """The temperature ``q`` was computed at."""
    offset: int | None = None
    """``None``: ``ids`` are global. Else this is one tensor-parallel shard's view
    (:meth:`local`): ``ids`` are ``global id - offset`` and only that shard's entries are kept."""

    def __post_init__(self) -> None:
        if self.kind not in REPRESENTATIONS:
            raise ValueError(
                f"SparseTargets.kind must be one of {REPRESENTATIONS}, got {self.kind!r}"
            )
        if self.ids.dim() != 2 or self.ids.shape != self.weights.shape:
            raise ValueError(
                f"SparseTargets ids {tuple(self.ids.shape)} and weights "
                f"{tuple(self.weights.shape)} must both be [N, k]"
            )
        n = self.ids.shape[0]
        for name in ("tail", "entropy"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(
                    f"SparseTargets.{name} must be [N] = [{n}], got {tuple(value.shape)}"
                )
        if self.kind == TOPK and self.tail is None:
            raise ValueError("top-k SparseTargets need the tail mass")
        if not self.temperature > 0:
            raise ValueError(f"SparseTargets.temperature must be > 0, got {self.temperature}")

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        """Entries per token (``k`` for top-k, at most ``n`` for samples)."""
        return int(self.ids.shape[1])

    def rows(self, rows: slice) -> SparseTargets:
        """The targets of some token positions."""

        def cut(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[rows]

        return replace(
            self,
            ids=self.ids[rows],
            weights=self.weights[rows],
            tail=cut(self.tail),
            entropy=cut(self.entropy),
        )

    def to(self, device: torch.device | str) -> SparseTargets:
        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device)

        return replace(
            self,
            ids=self.ids.to(device),
            weights=self.weights.to(device),
            tail=move(self.tail),
            entropy=move(self.entropy),
        )

    def local(self, vocab_start: int, vocab_end: int) -> SparseTargets:
        """The entries of one tensor-parallel shard ``[vocab_start, vocab_end)``: their ids made
        local (``id - vocab_start``), every other entry id -1 and weight 0. Tail and entropy (per
        token) are kept."""
        base = self.offset or 0
        glob = self.ids + base
        here = (self.ids >= 0) & (glob >= vocab_start) & (glob < vocab_end)
        ids = torch.where(here, glob - vocab_start, -1)
        weights = torch.where(here, self.weights, 0.0)
        return replace(self, ids=ids, weights=weights, offset=vocab_start)

    def _need_global(self, what: str) -> None:
        if self.offset is not None:
            raise ValueError(f"{what} needs the global targets, not one shard's local() view")

    def truncated(self, k: int) -> SparseTargets:
        """Top-k targets keeping the ``k`` most likely entries; the rest join the tail."""
        if self.kind != TOPK:
            raise SparseTargetsUnsupported("topk_kd", "a top-k cache (this one is sampled)")
        self._need_global("topk_kd's truncation")
        if k > self.k:
            raise SparseTargetsUnsupported(
                f"topk_kd with k={k}", f"a top-k cache with k >= {k} (this one has k={self.k})"
            )
        if k == self.k:
            return self
        assert self.tail is not None
        rest = self.weights[:, k:].sum(dim=1)
        return replace(
            self, ids=self.ids[:, :k], weights=self.weights[:, :k], tail=self.tail + rest
        )

    def remap(self, orig_to_comp: Tensor) -> SparseTargets:
        """The targets in a compressed student vocabulary (``orig_to_comp``: ``[V]`` int64, the
        compressed id of each original id, ``-1`` for an id with no compressed slot).

        Entries whose ids map to the same slot are merged (weights added). Entries mapped to -1
        are removed and the rest renormalized, as the dense teacher restricted to the kept tokens
        is renormalized: the runtime passes a table with -1 for every dropped token
        (``VocabRestriction.kept_orig_to_comp``), so that the result is the co-located restricted
        head's distribution (a dropped token's mass does not go to its replacement). For top-k
        the tail is assumed to lie on kept tokens (the approximation: the tail's shape is
        unknown; exact when the cache is dense). ``entropy`` is kept as is: the
        sampled forward KL's value is then offset by a constant (gradients unaffected)."""
        self._need_global("remap")
        table = orig_to_comp.to(device=self.ids.device, dtype=torch.long)
        valid = self.ids >= 0
        mapped = torch.where(valid, table[self.ids.clamp(min=0)], -1)
        weights = torch.where(mapped >= 0, self.weights, 0.0)
        ids, weights = merge_duplicates(mapped, weights)
        total = weights.sum(dim=1) + (self.tail if self.tail is not None else 0.0)
        scale = torch.where(total > 0, 1.0 / total, 0.0)
        tail = None if self.tail is None else self.tail * scale
        return replace(self, ids=ids, weights=weights * scale[:, None], tail=tail)


def is_sparse_targets(x: object) -> bool:
    return isinstance(x, SparseTargets)


def merge_duplicates(ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: equal ids merged into one entry (weights summed), -1 entries dropped; the result
    is padded with -1 / 0 to the input width, entries ordered by id."""
    order = ids.sort(dim=1)
    sorted_ids = order.values
    sorted_w = weights.gather(1, order.indices)
    keep = sorted_ids >= 0
    first = torch.ones_like(keep)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first &= keep
    # group number of each entry among this row's distinct valid ids (-1 for invalid entries)
    group = torch.cumsum(first.to(torch.long), dim=1) - 1
    slot = torch.where(keep, group, ids.shape[1] - 1)
    out_w = torch.zeros_like(weights).scatter_add_(1, slot, torch.where(keep, sorted_w, 0.0))
    out_ids = torch.full_like(ids, -1)
    out_ids.scatter_(
        1, torch.where(first, group, ids.shape[1] - 1), torch.where(first, sorted_ids, -1)
    )
    count = first.sum(dim=1, keepdim=True)
    columns = torch.arange(ids.shape[1], device=ids.device)[None, :]
    out_ids = torch.where(columns < count, out_ids, -1)
    out_w = torch.where(columns < count, out_w, 0.0)
    return out_ids, out_w


# ----------------------------------------------------------------------------------------------
# Building targets from vocab-parallel teacher logits


def _teacher_chunks(logits: Tensor, shard: vp.VocabShard):
    plan = vp.chunk_plan(shard, logits.shape[0], logits.shape[1], logits.dtype, logits.is_cuda)
    for start in range(0, plan.num_tokens, plan.chunk):
        yield plan, slice(start, min(start + plan.chunk, plan.num_tokens))


def _check_logits(logits: Tensor, temperature: float) -> None:
    if logits.dim() != 2:
        raise ValueError(f"teacher logits must be [N, V/tp], got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _outputs(logits: Tensor, count: int, what: str, temperature: float):
    """The shared prologue of :func:`from_logits_topk` and :func:`from_logits_sampled`: the
    arguments checked (``what``: how the error names ``count``), and the per-token outputs ids
    (-1), weights (0) and entropy (0), ``[N, count]``, ``[N, count]``, ``[N]``."""
    _check_logits(logits, temperature)
    if count < 1:
        raise ValueError(f"{what} must be >= 1, got {count}")
    n, device = logits.shape[0], logits.device
    return (
        torch.full((n, count), -1, dtype=torch.long, device=device),
        torch.zeros((n, count), dtype=torch.float32, device=device),
        torch.zeros(n, dtype=torch.float32, device=device),
    )


def _scaled_chunks(
    logits: Tensor, shard: vp.VocabShard, temperature: float, dtype: torch.dtype | None = None
):
    """Per chunk of tokens: its plan, its rows and its logits over the real columns divided by
    the temperature, in the plan's accumulation dtype (or ``dtype``)."""
    for plan, rows in _teacher_chunks(logits, shard):
        yield plan, rows, logits[rows, : plan.width].to(dtype or plan.acc) / temperature


def from_logits_topk(
    teacher_logits_local: Tensor, k: int, shard: vp.VocabShard = vp.UNSHARDED, *, temperature: float
) -> SparseTargets:
    """The global top-``k`` of ``q = softmax(t / T)`` over a vocab-sharded ``[N, V/tp]``: every rank
    takes its local top-k, the ``k`` values and ids per token are all-gathered (nothing
    vocabulary-sized crosses ranks) and the global top-k picked; the tail is the exact sum of the
    other columns' probabilities (0 when ``k >= V``), the entropy exact. Same result on every
    rank; ``k`` larger than the real vocabulary pads with id -1 / weight 0."""
    ids_out, w_out, ent_out = _outputs(teacher_logits_local, k, "top-k k", temperature)
    tail_out = torch.zeros_like(ent_out)
    with torch.no_grad():
        for plan, rows, t in _scaled_chunks(teacher_logits_local, shard, temperature):
            width, stats = plan.width, plan.stats
            c = t.shape[0]
            local_k = min(k, width)
            values, index = t.topk(local_k, dim=1)
            index = index + plan.vocab_start
            if local_k < k:
                values = torch.cat([values, values.new_full((c, k - local_k), -math.inf)], dim=1)
                index = torch.cat([index, index.new_full((c, k - local_k), -1)], dim=1)
            if stats.size > 1:
                all_values, all_index = stats.gather(values), stats.gather(index)
                values, pos = all_values.topk(k, dim=1)
                index = all_index.gather(1, pos)
            m = values[:, 0]
            et = (t - m[:, None]).exp()
            local = index - plan.vocab_start
            here = (local >= 0) & (local < width)
            member = torch.zeros_like(et)
            if width:  # scatter_add: an entry of another shard must not clear a kept column
                member.scatter_add_(1, local.clamp(0, width - 1), here.to(et.dtype))
            z_local = et.sum(dim=1)
            tail_local = et.masked_fill(member > 0, 0.0).sum(dim=1)
            et_t = torch.where(et > 0, et * t, 0.0).sum(dim=1)
            z, z_tail, et_t = stats.sum(z_local, tail_local, et_t)
            lse = m + z.log()
            weights = torch.where(index >= 0, (values - lse[:, None]).exp(), 0.0)
            ids_out[rows] = torch.where(index >= 0, index, -1)
            w_out[rows] = weights.float()
            tail_out[rows] = (z_tail / z).float()
            ent_out[rows] = (lse - et_t / z).float()
    return SparseTargets(TOPK, ids_out, w_out, tail_out, ent_out, float(temperature))


def from_logits_sampled(
    teacher_logits_local: Tensor,
    n: int,
    shard: vp.VocabShard = vp.UNSHARDED,
    *,
    temperature: float,
    generator: torch.Generator,
) -> SparseTargets:
    """``n`` draws per token from ``q = softmax(t / T)`` over a vocab-sharded ``[N, V/tp]``, by
    inverse CDF: one uniform ``u`` per draw (the same on every rank: the same generator state),
    the shard chosen from the all-gathered per-rank masses (``tp`` numbers per token), the token
    within it from the shard's own cumulative sum; each draw's id is found on exactly one rank and
    summed over ranks. The draws equal those of one unsharded rank (up to rounding in the
    cumulative sums). Duplicates are merged into weights ``count / n``; the entropy is exact.
    ``generator`` must be on the logits' device and in the same state on every tp rank."""
    ids_out, w_out, ent_out = _outputs(teacher_logits_local, n, "samples per token", temperature)
    device = teacher_logits_local.device
    with torch.no_grad():
        for plan, rows, t in _scaled_chunks(
            teacher_logits_local, shard, temperature, torch.float64
        ):
            width, stats = plan.width, plan.stats
            c = t.shape[0]
            (m,) = stats.max(t.amax(dim=1) if width else t.new_full((c,), -math.inf))
            et = (t - m[:, None]).exp()
            z_local = et.sum(dim=1)
            masses = stats.gather(z_local[:, None])  # [c, tp]
            (et_t,) = stats.sum(torch.where(et > 0, et * t, 0.0).sum(dim=1))
            z = masses.sum(dim=1)
            u = torch.rand((c, n), generator=generator, dtype=torch.float64, device=device)
            x = u * z[:, None]
            before = masses.cumsum(dim=1)
            rank_of = torch.searchsorted(before, x, right=True).clamp(max=stats.size - 1)
            # masses of the ranks before this draw's: offset into the chosen rank's shard
            offset = torch.where(rank_of > 0, before.gather(1, (rank_of - 1).clamp(min=0)), 0.0)
            me = _tp_rank(stats)
            mine = rank_of == me
            ids = torch.zeros((c, n), dtype=torch.long, device=device)
            if width:
                cum = et.cumsum(dim=1)
                within = (x - offset).clamp(min=0.0)
                pos = torch.searchsorted(cum, within, right=True).clamp(max=width - 1)
                # never a zero-probability column (rounding at the very end of the shard)
                ids = torch.where(mine, pos + plan.vocab_start + 1, 0)
            (ids,) = stats.sum(ids)
            ids = ids - 1
            merged_ids, merged_w = merge_duplicates(ids, torch.full((c, n), 1.0 / n, device=device))
            ids_out[rows] = merged_ids
            w_out[rows] = merged_w.float()
            ent_out[rows] = (m + z.log() - et_t / z).float()
    return SparseTargets(SAMPLED, ids_out, w_out, None, ent_out, float(temperature))


def _tp_rank(stats: vk.TensorParallelStats) -> int:
    if stats.group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(stats.group)


# ----------------------------------------------------------------------------------------------
# Losses against the targets


def supports(kind: str, representation: str) -> str | None:
    """``None`` when the divergence ``kind`` (a kernel name: ``forward_kl``, ``soft_ce``,
    ``reverse_kl``, ``jsd``, ``skew_kl``, ``skew_rkl``, ``tvd``, ``topk``, ``mse``...) can be
    computed against ``representation`` (``topk`` or ``sampled``), else what it needs (for the
    preflight's refusal)."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    if kind in _NEEDS:
        return _NEEDS[kind]
    if kind not in DIVERGENCES:
        return f"dense teacher logits ({kind!r} has no sparse form)"
    if representation == SAMPLED and kind not in SAMPLED_DIVERGENCES:
        return (
            "a top-k cache: it is nonlinear in the teacher's probabilities, so sampled targets "
            "give no unbiased estimate (only forward_kl and kd's soft cross entropy are)"
        )
    return None


_Term = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(Q, P, log Q, log P) -> (d, g)`` elementwise (see the module docstring's table)."""


def _log_mix(a: float, log_x: Tensor, log_y: Tensor) -> Tensor:
    """``log(a x + (1 - a) y)``."""
    if a <= 0.0:
        return log_y
    if a >= 1.0:
        return log_x
    return torch.logaddexp(log_x + math.log(a), log_y + math.log1p(-a))


def _term(kind: str, params: dict[str, Any]) -> _Term:
    if kind in ("forward_kl", "topk"):
        return lambda q, p, lq, lp: (q * (lq - lp), -q / p)
    if kind == "soft_ce":
        return lambda q, p, lq, lp: (-q * lp, -q / p)
    if kind == "reverse_kl":
        return lambda q, p, lq, lp: (p * (lp - lq), lp - lq + 1.0)
    if kind == "jsd":
        beta = float(params["beta"])

        def jsd(q, p, lq, lp):
            lm = _log_mix(beta, lq, lp)
            d = beta * q * (lq - lm) + (1.0 - beta) * p * (lp - lm)
            return d, (1.0 - beta) * (lp - lm)

        return jsd
    if kind == "skew_kl":
        alpha = float(params["alpha"])

        def skl(q, p, lq, lp):
            lr = _log_mix(alpha, lq, lp)
            return q * (lq - lr), -(1.0 - alpha) * (lq - lr).exp()

        return skl
    if kind == "skew_rkl":
        alpha = float(params["alpha"])

        def srkl(q, p, lq, lp):
            lr = _log_mix(alpha, lp, lq)
            return p * (lp - lr), lp - lr + 1.0 - alpha * (lp - lr).exp()

        return srkl
    if kind == "tvd":
        return lambda q, p, lq, lp: (0.5 * (p - q).abs(), 0.5 * torch.sign(p - q))
    raise SparseTargetsUnsupported(kind, _NEEDS.get(kind, "dense teacher logits"))


def _masked_term(term: _Term, q: Tensor, p: Tensor, log_p: Tensor, valid: Tensor):
    """``(d, g)`` of the entries where ``valid`` and not both masses 0; 0 elsewhere."""
    tiny = torch.finfo(q.dtype).tiny
    live = valid & ((q > 0) | (p > 0))
    q_safe = torch.where(live, q, 1.0).clamp(min=tiny)
    p_safe = torch.where(live, p, 1.0).clamp(min=tiny)
    lp_safe = torch.where(live, log_p.clamp(min=math.log(tiny)), 0.0)
    d, g = term(q_safe, p_safe, q_safe.log(), lp_safe)
    # Q = 0 terms: Q log Q = 0 (the clamp made it tiny * log tiny, ~1e-36); exact zero below
    zero_q = q <= 0
    if zero_q.any():
        d0, g0 = term(torch.zeros_like(q_safe), p_safe, q_safe.log(), lp_safe)
        d = torch.where(zero_q, _nan_to_zero(d0), d)
        g = torch.where(zero_q, _nan_to_zero(g0), g)
    return torch.where(live, d, 0.0), torch.where(live, g, 0.0)


def _nan_to_zero(x: Tensor) -> Tensor:
    return torch.nan_to_num(x, nan=0.0)


def sparse_kernel(kind: str, targets: SparseTargets, params: dict[str, Any]) -> vk.Kernel:
    """The chunk kernel of ``kind`` against ``targets`` (GLOBAL ids; each rank uses only the
    entries of its slice), for :func:`methods.vocab_parallel.run_chunks` with no teacher logits."""
    linear_kl = kind == "forward_kl" and targets.kind == SAMPLED
    # samples: KL(q || p) = H(q, p) - H(q), the cross entropy estimated, the entropy stored
    term = _term("soft_ce" if linear_kl else kind, params)

    def kernel(ch: vk.Chunk):
        s = ch.s
        acc = s.dtype
        c, width = s.shape
        stored = targets.ids[ch.rows].to(s.device)
        ids = stored + ((targets.offset or 0) - ch.vocab_start)
        here = (ids >= 0) & (ids < width) & (stored >= 0)
        local = ids.clamp(0, max(width - 1, 0))
        q = torch.where(here, targets.weights[ch.rows].to(s.device, acc), 0.0)
        if targets.tail is not None:
            q_tail = targets.tail[ch.rows].to(s.device, acc).clamp(min=0.0)
        else:
            q_tail = torch.zeros(c, dtype=acc, device=s.device)
        (m,) = ch.stats.max(s.amax(dim=1) if width else s.new_full((c,), -math.inf))
        es = torch.sub(s, m[:, None], out=ch.work.take("es", c)).exp_()
        if width:
            s_ids = s.gather(1, local)
            member = ch.work.take("member", c).zero_()
            member.scatter_add_(1, local, here.to(acc))  # (scatter_ could let a foreign entry win)
            # the columns outside the kept ids, summed directly (not sum(es) - kept: that loses
            # the tail's precision when the kept ids hold most of the mass)
            outside = torch.mul(es, member.neg_().add_(1.0), out=ch.work.take("scratch", c))
            tail_local = outside.sum(dim=1)
        else:
            s_ids = torch.zeros_like(q)
            tail_local = torch.zeros(c, dtype=acc, device=s.device)
        z, z_tail = ch.stats.sum(es.sum(dim=1), tail_local)
        lse = m + z.log()
        log_p = s_ids - lse[:, None]
        p = log_p.exp()
        p_tail = z_tail / z
        log_p_tail = torch.where(z_tail > 0, z_tail.log() - z.log(), -math.inf)
        d, g = _masked_term(term, q, p, log_p, here)
        d_sum, c_sum = ch.stats.sum(d.sum(dim=1), (p * g).sum(dim=1))
        d_t, g_t = _masked_term(
            term,
            q_tail[:, None],
            p_tail[:, None],
            log_p_tail[:, None],
            torch.ones_like(here[:, :1]),
        )
        d_t, g_t = d_t[:, 0], g_t[:, 0]
        loss = d_sum + d_t
        c_all = c_sum + p_tail * g_t
        if linear_kl:
            assert targets.entropy is not None
            loss = loss - targets.entropy[ch.rows].to(s.device, acc)
        if not ch.need_grad:
            return loss, None
        grad = es.mul_(((g_t - c_all) / z)[:, None])
        if width:
            grad.scatter_add_(1, local, torch.where(here, p * (g - g_t[:, None]), 0.0))
        return loss, grad

    return kernel


def _resolve(kind: str, targets: SparseTargets, temperature: float, params: dict[str, Any]):
    reason = supports(kind, targets.kind)
    if reason is not None:
        raise SparseTargetsUnsupported(kind, reason)
    if not math.isclose(temperature, targets.temperature, rel_tol=1e-6):
        raise ValueError(
            f"the cached teacher distribution is at temperature {targets.temperature:g} but the "
            f"loss asks for {temperature:g}: a sparse cache cannot be re-tempered exactly (the "
            "tail's shape is unknown, samples were drawn at the cache temperature); build the "
            f"cache at temperature {temperature:g} or distill at {targets.temperature:g}"
        )
    if kind == "forward_kl" and targets.kind == SAMPLED and targets.entropy is None:
        raise SparseTargetsUnsupported(
            "forward_kl", "the teacher's entropy per token (sampled targets without it)"
        )
    if kind == "topk":
        targets = targets.truncated(int(params["k"]))
    return targets


def divergence(
    kind: str,
    student_logits: Any,
    targets: SparseTargets,
    loss_mask: Tensor,
    shard: vp.VocabShard = vp.UNSHARDED,
    *,
    temperature: float = 1.0,
    **params: Any,
) -> Tensor:
    """The masked mean over tokens of divergence ``kind`` between the student and the sparse
    ``targets`` (as :func:`methods.vocab_parallel.divergence`: vocab-parallel, chunked, gradient
    in the forward pass; ``student_logits`` ``[N, V/tp]`` or a
    :class:`methods.fused_head.HeadInput`).

    ``kind``: a kernel name (``forward_kl``, ``soft_ce``, ``reverse_kl``, ``jsd`` (``beta=``),
    ``skew_kl``/``skew_rkl`` (``alpha=``), ``tvd``, ``topk`` (``k=``)). ``temperature`` must be
    the targets' own (see the module docstring). Raises :class:`SparseTargetsUnsupported` for a
    loss the representation cannot give."""
    if targets.num_tokens != student_logits.shape[0]:
        raise ValueError(
            f"sparse targets cover {targets.num_tokens} tokens but the student logits "
            f"{student_logits.shape[0]}"
        )
    targets = _resolve(kind, targets, temperature, params)
    kernel = sparse_kernel(kind, targets, params)
    return vp.divergence(kernel, student_logits, None, loss_mask, shard, temperature=temperature)


def kernel_spec(kernel: vk.Kernel) -> tuple[str, dict[str, Any]]:
    """``(name, params)`` a vocab kernel declares (``kernel.name``, ``kernel.params``)."""
    name = getattr(kernel, "name", None)
    if name is None:
        raise SparseTargetsUnsupported(
            getattr(kernel, "__name__", repr(kernel)), "dense teacher logits (no sparse form)"
        )
    return str(name), dict(getattr(kernel, "params", {}))


def divergence_of_kernel(
    kernel: vk.Kernel,
    student_logits: Any,
    targets: SparseTargets,
    loss_mask: Tensor,
    shard: vp.VocabShard = vp.UNSHARDED,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """:func:`divergence` for the kernel a method passes to
    :func:`methods.vocab_parallel.divergence` (dispatched there when the teacher is sparse)."""
    name, params = kernel_spec(kernel)
    return divergence(
        name, student_logits, targets, loss_mask, shard, temperature=temperature, **params
    )
