"""Per-chunk kernels of the vocab-parallel losses (:mod:`methods.vocab_parallel` is the API).

A kernel sees one chunk of tokens (:class:`Chunk`): the tempered student and teacher logits of
this rank's real vocabulary columns, the tensor-parallel statistics collectives, and a workspace of
reusable fp32 buffers. It returns the per-token loss and the gradient of that per-token loss with
respect to the tempered student logits. Gradients are derived in each kernel's docstring; ``p`` is
the student's softmax, ``q`` the teacher's, ``s`` and ``t`` their tempered logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------------
# Collectives on per-token statistics


class TensorParallelStats:
    """All-reduces and gathers of per-token statistics over the tensor-parallel group."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)

    def max(self, *rows: Tensor) -> list[Tensor]:
        """Global row maxima of ``[C]`` local maxima (one all-reduce for all of them)."""
        return self._reduce(rows, dist.ReduceOp.MAX)

    def sum(self, *rows: Tensor) -> list[Tensor]:
        """Global sums of ``[C]`` or ``[C, k]`` local sums (one all-reduce for all of them)."""
        return self._reduce(rows, dist.ReduceOp.SUM)

    def gather(self, values: Tensor) -> Tensor:
        """``[C, k]`` per rank -> ``[C, tp * k]``, rank-major."""
        if self.size == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.size)]
        dist.all_gather(parts, values.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def _reduce(self, rows: tuple[Tensor, ...], op: Any) -> list[Tensor]:
        if self.size == 1:
            return list(rows)
        widths = [1 if r.dim() == 1 else r.shape[1] for r in rows]
        packed = torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)
        dist.all_reduce(packed, op=op, group=self.group)
        out, start = [], 0
        for row, width in zip(rows, widths, strict=True):
            part = packed[:, start : start + width]
            out.append(part.reshape(row.shape))
            start += width
        return out


# ----------------------------------------------------------------------------------------------
# Per-chunk state handed to the kernels


BLOCK_ELEMENTS = 1 << 18
"""Elements of one small row-block buffer (:meth:`Workspace.take_block`): 1 MiB in fp32."""


class Workspace:
    """Named fp32 buffers of ``[chunk_size, width]`` reused for every chunk (no page faults, no
    allocator churn); ``take(name, rows)`` returns a ``[rows, width]`` view."""

    def __init__(self, chunk_size: int, width: int, dtype: torch.dtype, device: torch.device):
        self.chunk_size, self.width, self.dtype, self.device = chunk_size, width, dtype, device
        self.buffers: dict[str, Tensor] = {}

    def take(self, name: str, rows: int) -> Tensor:
        buf = self.buffers.get(name)
        if buf is None:
            buf = torch.empty(self.chunk_size, self.width, dtype=self.dtype, device=self.device)
            self.buffers[name] = buf
        return buf[:rows]

    @property
    def block_rows(self) -> int:
        """Rows of the small buffers of :meth:`take_block` (about 1 MiB each, at most a chunk)."""
        return max(1, min(self.chunk_size, BLOCK_ELEMENTS // max(self.width, 1)))

    def take_block(self, name: str, rows: int) -> Tensor:
        """A ``[rows, width]`` view of a small buffer of :attr:`block_rows` rows, for work done
        a few rows at a time (``rows <= block_rows``)."""
        key = "block:" + name
        buf = self.buffers.get(key)
        if buf is None:
            buf = torch.empty(self.block_rows, self.width, dtype=self.dtype, device=self.device)
            self.buffers[key] = buf
        return buf[:rows]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


@dataclass
class Chunk:
    """One chunk of tokens as a kernel sees it.

    ``s`` and ``t`` are the student and teacher logits of the chunk's rows and real columns, already
    divided by the temperature, in the accumulation dtype: ``[C, w]`` with ``w`` the number of real
    vocabulary columns on this rank. They may be views of the caller's tensors: never modify them
    unless ``writable`` says so.
    """

    s: Tensor
    t_or_none: Tensor | None
    rows: slice
    stats: TensorParallelStats
    work: Workspace
    need_grad: bool
    vocab_start: int
    """Global vocabulary column of this rank's first column."""
    vocab_size: int
    """The real (unpadded) vocabulary size, all shards together."""
    writable: bool = False
    """``s`` and ``t`` are buffers of this chunk alone (not views of the caller's logits): a
    kernel may overwrite them, e.g. with the exponentials or the gradient, instead of using more
    workspace buffers."""

    @property
    def t(self) -> Tensor:
        if self.t_or_none is None:
            raise TypeError("this loss needs teacher logits")
        return self.t_or_none


Kernel = Callable[[Chunk], tuple[Tensor, Tensor | None]]
"""A kernel returns the per-token loss ``[C]`` and, when ``need_grad``, the gradient of that
per-token loss with respect to ``s`` (the tempered logits), ``[C, w]``; it may be a workspace
buffer."""


def named(kernel: Kernel, name: str, **params: Any) -> Kernel:
    """Label a kernel with the divergence it computes (``kernel.name``, ``kernel.params``): what
    :mod:`methods.sparse_targets` reads to compute the same loss against a cached teacher."""
    setattr(kernel, "name", name)  # noqa: B010 (a function attribute mypy would not accept)
    setattr(kernel, "params", params)  # noqa: B010
    return kernel


def _row_max(x: Tensor) -> Tensor:
    if x.shape[1] == 0:  # a shard made only of padding columns
        return x.new_full((x.shape[0],), -math.inf)
    return x.amax(dim=1)


def _rowdot(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``sum_j a_ij b_ij`` through a workspace buffer (faster than einsum on CPU, no allocation)."""
    return torch.mul(a, b, out=out).sum(dim=1)


def _exp_shifted(x: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """``exp(x - shift[:, None])`` into ``out``."""
    return torch.sub(x, shift[:, None], out=out).exp_()


@dataclass
class _Softmax:
    """Both softmaxes of a chunk: ``es = exp(s - m_s)`` (workspace), ``z_s`` its global row sum,
    ``lse_s = m_s + log z_s``; the same for the teacher. ``extra`` holds the globally summed extra
    statistics the caller asked for (computed from ``es``/``et`` before the reduction)."""

    es: Tensor
    et: Tensor
    m_s: Tensor
    m_t: Tensor
    z_s: Tensor
    z_t: Tensor
    extra: list[Tensor]

    @property
    def lse_s(self) -> Tensor:
        return self.m_s + self.z_s.log()

    @property
    def lse_t(self) -> Tensor:
        return self.m_t + self.z_t.log()


def _softmax_pair(ch: Chunk, extra: Callable[[Tensor, Tensor], list[Tensor]] | None = None):
    """Two reductions: the row maxima, then the sums of exponentials plus ``extra(es, et)``."""
    s, t = ch.s, ch.t
    rows = s.shape[0]
    m_s, m_t = ch.stats.max(_row_max(s), _row_max(t))
    es = _exp_shifted(s, m_s, ch.work.take("es", rows))
    et = _exp_shifted(t, m_t, ch.work.take("et", rows))
    local = [es.sum(dim=1), et.sum(dim=1)] + (extra(es, et) if extra else [])
    z_s, z_t, *more = ch.stats.sum(*local)
    return _Softmax(es, et, m_s, m_t, z_s, z_t, more)


def _log_probs(ch: Chunk, sm: _Softmax) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(log_p, log_q, p, q)`` of the chunk; ``p`` and ``q`` overwrite ``es`` and ``et``."""
    rows = ch.s.shape[0]
    log_p = torch.sub(ch.s, sm.lse_s[:, None], out=ch.work.take("log_p", rows))
    log_q = torch.sub(ch.t, sm.lse_t[:, None], out=ch.work.take("log_q", rows))
    p = sm.es.div_(sm.z_s[:, None])
    q = sm.et.div_(sm.z_t[:, None])
    return log_p, log_q, p, q


def _log_mixture(log_a: Tensor, weight_a: float, log_b: Tensor, out: Tensor) -> Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)`` computed in log space (no underflow)."""
    if weight_a <= 0.0:
        return out.copy_(log_b)
    if weight_a >= 1.0:
        return out.copy_(log_a)
    torch.add(log_a, math.log(weight_a), out=out)
    return torch.logaddexp(out, log_b + math.log1p(-weight_a), out=out)


# ----------------------------------------------------------------------------------------------
# Kernels: one per loss. Gradients are with respect to the tempered student logits ``s``.


def _teacher_weighted_gap(ch: Chunk, m_t: Tensor) -> Tensor:
    """``sum_i exp(t_i - m_t) (t_i - s_i)`` per row, a few rows at a time through two small
    buffers (so that ``s`` and ``t`` can then be overwritten with their exponentials)."""
    s, t = ch.s, ch.t
    rows = s.shape[0]
    out = s.new_empty(rows)
    step = ch.work.block_rows
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        et = _exp_shifted(t[lo:hi], m_t[lo:hi], ch.work.take_block("et", hi - lo))
        gap = torch.sub(t[lo:hi], s[lo:hi], out=ch.work.take_block("gap", hi - lo))
        out[lo:hi] = _rowdot(gap, et, out=gap)
    return out


def _forward_kl_in_place(ch: Chunk):
    """:func:`forward_kl_kernel` on writable logits: no chunk-sized buffer besides ``s`` and
    ``t``, which end as the exponentials and the gradient."""
    s, t = ch.s, ch.t
    m_s, m_t = ch.stats.max(_row_max(s), _row_max(t))
    gap = _teacher_weighted_gap(ch, m_t)
    es = s.sub_(m_s[:, None]).exp_()
    et = t.sub_(m_t[:, None]).exp_()
    z_s, z_t, gap = ch.stats.sum(es.sum(dim=1), et.sum(dim=1), gap)
    loss = gap / z_t - (m_t + z_t.log()) + (m_s + z_s.log())
    if not ch.need_grad:
        return loss, None
    grad = es.mul_((1.0 / z_s)[:, None])
    grad.addcmul_(et, (-1.0 / z_t)[:, None])
    return loss, grad


def forward_kl_kernel(ch: Chunk):
    """KL(q || p) = sum_i q_i (t_i - s_i) - lse_t + lse_s; d/ds = p - q."""
    if ch.writable:
        return _forward_kl_in_place(ch)
    rows = ch.s.shape[0]
    scratch = ch.work.take("scratch", rows)

    def weighted_gap(es: Tensor, et: Tensor) -> list[Tensor]:
        return [_rowdot(torch.sub(ch.t, ch.s, out=scratch), et, out=scratch)]

    sm = _softmax_pair(ch, weighted_gap)
    (gap,) = sm.extra
    loss = gap / sm.z_t - sm.lse_t + sm.lse_s
    if not ch.need_grad:
        return loss, None
    grad = sm.es.mul_((1.0 / sm.z_s)[:, None])
    grad.addcmul_(sm.et, (-1.0 / sm.z_t)[:, None])
    return loss, grad


def reverse_kl_kernel(ch: Chunk):
    """KL(p || q) = sum_i p_i (s_i - t_i) - lse_s + lse_t; d/ds_j = p_j (log p_j/q_j - KL)."""
    rows = ch.s.shape[0]
    gap = torch.sub(ch.s, ch.t, out=ch.work.take("gap", rows))
    scratch = ch.work.take("scratch", rows)
    sm = _softmax_pair(ch, lambda es, et: [_rowdot(es, gap, out=scratch)])
    (weighted,) = sm.extra
    shift = sm.lse_s - sm.lse_t
    loss = weighted / sm.z_s - shift
    if not ch.need_grad:
        return loss, None
    p = sm.es.div_(sm.z_s[:, None])
    return loss, p.mul_(gap.sub_((shift + loss)[:, None]))


def _check_unit(value: float, where: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {value}")


def jsd_kernel(beta: float) -> Kernel:
    """Generalized JSD as TRL's GKD trainer defines it (Agarwal et al. 2024, arXiv 2306.13649):
    ``m = beta q + (1 - beta) p``, ``JSD = beta KL(q || m) + (1 - beta) KL(p || m)``.
    d/dp_i = (1 - beta) log(p_i / m_i) (the other terms cancel), so
    d/ds_j = (1 - beta) p_j (log(p_j / m_j) - KL(p || m)).

    As in TRL, ``beta = 0`` is exactly the forward KL and ``beta = 1`` the reverse KL (the mixture
    formula itself vanishes at both ends; near them it behaves like ``beta`` times the forward KL,
    resp. ``1 - beta`` times the reverse KL)."""
    _check_unit(beta, "jsd beta")
    if beta == 0.0:
        return forward_kl_kernel
    if beta == 1.0:
        return reverse_kl_kernel

    def kernel(ch: Chunk):
        rows = ch.s.shape[0]
        sm = _softmax_pair(ch)
        log_p, log_q, p, q = _log_probs(ch, sm)
        log_m = _log_mixture(log_q, beta, log_p, out=ch.work.take("log_m", rows))
        scratch = ch.work.take("scratch", rows)
        kl_qm = _rowdot(q, torch.sub(log_q, log_m, out=scratch), out=scratch)
        log_p_over_m = log_p.sub_(log_m)
        kl_pm = _rowdot(p, log_p_over_m, out=scratch)
        kl_qm, kl_pm = ch.stats.sum(kl_qm, kl_pm)
        loss = beta * kl_qm + (1.0 - beta) * kl_pm
        if not ch.need_grad:
            return loss, None
        grad = p.mul_(log_p_over_m.sub_(kl_pm[:, None]))
        return loss, grad.mul_(1.0 - beta)

    return named(kernel, "jsd", beta=beta)


def skew_kl_kernel(alpha: float) -> Kernel:
    """Skew KL (Ko et al. 2024, DistiLLM, arXiv 2402.03898): ``r = alpha q + (1-alpha) p``,
    ``SKL = KL(q || r)``. d/dp_i = -(1 - alpha) q_i / r_i, so
    d/ds_j = (1 - alpha) p_j (sum_i p_i q_i / r_i - q_j / r_j). ``alpha = 0`` is the forward KL."""
    _check_unit(alpha, "skew alpha")

    def kernel(ch: Chunk):
        rows = ch.s.shape[0]
        sm = _softmax_pair(ch)
        log_p, log_q, p, q = _log_probs(ch, sm)
        log_r = _log_mixture(log_q, alpha, log_p, out=ch.work.take("log_m", rows))
        scratch = ch.work.take("scratch", rows)
        kl = _rowdot(q, torch.sub(log_q, log_r, out=scratch), out=scratch)
        q_over_r = log_q.sub_(log_r).exp_()
        p_q_over_r = _rowdot(p, q_over_r, out=scratch)
        kl, p_q_over_r = ch.stats.sum(kl, p_q_over_r)
        if not ch.need_grad:
            return kl, None
        grad = p.mul_(q_over_r.sub_(p_q_over_r[:, None]))
        return kl, grad.mul_(alpha - 1.0)

    return named(kernel, "skew_kl", alpha=alpha)


def skew_reverse_kl_kernel(alpha: float) -> Kernel:
    """Skew reverse KL (DistiLLM, arXiv 2402.03898): ``r = alpha p + (1-alpha) q``,
    ``SRKL = KL(p || r)``. d/dp_i = log(p_i / r_i) + 1 - alpha p_i / r_i, so with
    ``g_i = log(p_i / r_i) - alpha p_i / r_i``: d/ds_j = p_j (g_j - sum_i p_i g_i).
    ``alpha = 0`` is the reverse KL."""
    _check_unit(alpha, "skew alpha")

    def kernel(ch: Chunk):
        rows = ch.s.shape[0]
        sm = _softmax_pair(ch)
        log_p, log_q, p, _ = _log_probs(ch, sm)
        log_r = _log_mixture(log_p, alpha, log_q, out=ch.work.take("log_m", rows))
        log_p_over_r = log_p.sub_(log_r)
        scratch = ch.work.take("scratch", rows)
        kl = _rowdot(p, log_p_over_r, out=scratch)
        p_over_r = torch.exp(log_p_over_r, out=log_r)
        p2_over_r = _rowdot(p, p_over_r, out=scratch)
        kl, p2_over_r = ch.stats.sum(kl, p2_over_r)
        if not ch.need_grad:
            return kl, None
        g = log_p_over_r.add_(p_over_r, alpha=-alpha)
        return kl, p.mul_(g.sub_((kl - alpha * p2_over_r)[:, None]))

    return named(kernel, "skew_rkl", alpha=alpha)


def tvd_kernel(ch: Chunk):
    """TVD = 0.5 sum_i |p_i - q_i|; with ``g = 0.5 sign(p - q)``: d/ds_j = p_j (g_j - sum p g)."""
    rows = ch.s.shape[0]
    sm = _softmax_pair(ch)
    p = sm.es.div_(sm.z_s[:, None])
    q = sm.et.div_(sm.z_t[:, None])
    diff = torch.sub(p, q, out=ch.work.take("scratch", rows))
    sign = torch.sign(diff, out=ch.work.take("sign", rows))
    abs_sum = _rowdot(diff, sign, out=diff)
    p_sign = _rowdot(p, sign, out=q)
    abs_sum, p_sign = ch.stats.sum(abs_sum, p_sign)
    loss = 0.5 * abs_sum
    if not ch.need_grad:
        return loss, None
    return loss, p.mul_(sign.sub_(p_sign[:, None])).mul_(0.5)


def soft_ce_kernel(ch: Chunk):
    """H(q, p) = -sum_i q_i log p_i = lse_s - sum_i q_i s_i; d/ds = p - q."""
    rows = ch.s.shape[0]
    scratch = ch.work.take("scratch", rows)
    sm = _softmax_pair(ch, lambda es, et: [_rowdot(et, ch.s, out=scratch)])
    (weighted,) = sm.extra
    loss = sm.lse_s - weighted / sm.z_t
    if not ch.need_grad:
        return loss, None
    grad = sm.es.mul_((1.0 / sm.z_s)[:, None])
    return loss, grad.addcmul_(sm.et, (-1.0 / sm.z_t)[:, None])


def mse_kernel(teacher_scale: float = 1.0, margin: float = 0.0) -> Kernel:
    """Mean over the real vocabulary of ``h(s - c t)^2`` with ``h(d) = max(|d| - margin, 0)``
    (plain squared error at margin 0, as ``F.mse_loss`` over the vocabulary). Raw logits are
    compared: run it at temperature 1."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")

    def kernel(ch: Chunk):
        vocab_size = ch.vocab_size
        rows = ch.s.shape[0]
        diff = torch.sub(ch.s, ch.t, alpha=teacher_scale, out=ch.work.take("gap", rows))
        if margin > 0.0:
            sign = torch.sign(diff, out=ch.work.take("sign", rows)) if ch.need_grad else None
            diff.abs_().sub_(margin).clamp_(min=0.0)
            if sign is not None:
                sign.mul_(diff)
        else:
            sign = diff
        scratch = ch.work.take("scratch", rows)
        (total,) = ch.stats.sum(_rowdot(diff, diff, out=scratch))
        loss = total / vocab_size
        if not ch.need_grad:
            return loss, None
        assert sign is not None
        return loss, sign.mul_(2.0 / vocab_size)

    return named(kernel, "mse", teacher_scale=teacher_scale, margin=margin)


def cross_entropy_kernel(labels: Tensor) -> Kernel:
    """CE = lse_s - s_y; d/ds = p - onehot(y). ``labels``: ``[N]`` global ids."""

    def kernel(ch: Chunk):
        s = ch.s
        rows, width = s.shape
        local = labels[ch.rows].to(torch.long) - ch.vocab_start
        here = (local >= 0) & (local < width)
        index = local.clamp(0, max(width - 1, 0)).unsqueeze(1)
        m_s = ch.stats.max(_row_max(s))[0]
        if width:
            target_local = s.gather(1, index).squeeze(1) * here
        else:
            target_local = s.new_zeros(rows)
        es = _exp_shifted(s, m_s, s if ch.writable else ch.work.take("es", rows))
        z_s, target = ch.stats.sum(es.sum(dim=1), target_local)
        loss = m_s + z_s.log() - target
        if not ch.need_grad:
            return loss, None
        grad = es.div_(z_s[:, None])
        if width:
            grad.scatter_add_(1, index, -here.to(grad.dtype).unsqueeze(1))
        return loss, grad

    return named(kernel, "cross_entropy")


def topk_kernel(k: int) -> Kernel:
    """KL over ``k + 1`` buckets: the teacher's top-k tokens one by one plus one bucket with all
    the remaining mass, for both distributions. With ``b(j)`` the bucket of token ``j`` and
    ``P_b``/``Q_b`` the bucket masses: d/ds_j = p_j (1 - Q_b(j) / P_b(j)), i.e. ``p_j - q_j`` for
    a top-k token and ``p_j (1 - Q_tail / P_tail)`` for a tail token.

    Top-k across shards: each rank takes its local top-k, all ranks gather those ``k`` values and
    global indices, and pick the global top-k (the same on every rank). TP traffic: an all-gather
    of ``k`` values and indices per token plus one all-reduce of ``k + 3`` numbers."""

    def check(vocab_size: int) -> None:
        if not 1 <= k <= vocab_size:
            raise ValueError(f"top-k k must be in [1, vocab_size={vocab_size}], got {k}")

    if k < 1:
        raise ValueError(f"top-k k must be >= 1, got {k}")

    def kernel(ch: Chunk):
        check(ch.vocab_size)
        s, t = ch.s, ch.t
        rows, width = t.shape
        local_k = min(k, width)
        values, index = t.topk(local_k, dim=1)
        index = index + ch.vocab_start
        if local_k < k:  # pad a narrow shard with entries that never win the global top-k
            values = torch.cat([values, values.new_full((rows, k - local_k), -math.inf)], dim=1)
            index = torch.cat([index, index.new_full((rows, k - local_k), -1)], dim=1)
        if ch.stats.size > 1:
            all_values = ch.stats.gather(values)
            all_index = ch.stats.gather(index)
            values, pos = all_values.topk(k, dim=1)
            index = all_index.gather(1, pos)
        m_t = values[:, 0]  # the global top-1 is the row maximum
        (m_s,) = ch.stats.max(_row_max(s))
        local = index - ch.vocab_start
        here = (local >= 0) & (local < width)
        local = local.clamp(0, max(width - 1, 0))
        es = _exp_shifted(s, m_s, ch.work.take("es", rows))
        et = _exp_shifted(t, m_t, ch.work.take("et", rows))
        if width:
            here_f = here.to(s.dtype)
            s_top_local = s.gather(1, local) * here_f
            member = ch.work.take("member", rows).zero_().scatter_add_(1, local, here_f) > 0
            es.masked_fill_(member, 0.0)
            et.masked_fill_(member, 0.0)
        else:
            here_f = torch.zeros_like(values)
            s_top_local = torch.zeros_like(values)
        z_s_tail, z_t_tail, s_top = ch.stats.sum(es.sum(dim=1), et.sum(dim=1), s_top_local)
        e_s_top = (s_top - m_s[:, None]).exp()
        e_t_top = (values - m_t[:, None]).exp()
        z_s = z_s_tail + e_s_top.sum(dim=1)
        z_t = z_t_tail + e_t_top.sum(dim=1)
        log_p_top = s_top - (m_s + z_s.log())[:, None]
        log_q_top = values - (m_t + z_t.log())[:, None]
        q_top = log_q_top.exp()
        p_tail = z_s_tail / z_s
        q_tail = z_t_tail / z_t
        tail_term = torch.where(q_tail > 0, q_tail * (q_tail.log() - p_tail.log()), 0.0)
        loss = (q_top * (log_q_top - log_p_top)).sum(dim=1) + tail_term
        if not ch.need_grad:
            return loss, None
        tail_coef = torch.where(p_tail > 0, 1.0 - q_tail / p_tail, 0.0)
        grad = es.mul_((tail_coef / z_s)[:, None])
        if width:
            grad.scatter_add_(1, local, (log_p_top.exp() - q_top) * here_f)
        return loss, grad

    return named(kernel, "topk", k=k)


for _kernel, _name in (
    (forward_kl_kernel, "forward_kl"),
    (reverse_kl_kernel, "reverse_kl"),
    (tvd_kernel, "tvd"),
    (soft_ce_kernel, "soft_ce"),
):
    named(_kernel, _name)
