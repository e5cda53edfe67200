"""Vocabulary-parallel, token-chunked logit losses whose gradient is computed in the forward pass.

Every function here takes logits laid out as megatron-core's output layer leaves them on the last
pipeline stage, tokens flattened:

- ``student_logits``: ``[N, V/tp]``, vocab-sharded over ``tp_group`` (rank ``r`` holds the columns
  ``vocab_start .. vocab_start + V/tp``); the only input that receives a gradient.
- ``teacher_logits``: ``[N, V/tp]``, sharded the same way; never receives a gradient.
- ``loss_mask``: ``[N]`` float, replicated over tp; the weight of each token (0.0 = ignored).

Columns at or beyond ``vocab_size`` (the real vocabulary; megatron pads it to a multiple of
128 x tp) are excluded, exactly as if their logits were ``-inf``. Real columns must be finite.

How the memory and the traffic stay small:

- **Nothing vocabulary-sized crosses ranks.** A softmax over a sharded vocabulary needs only two
  per-token statistics from the other shards: the row maximum (all-reduce MAX) and the sum of
  exponentials (all-reduce SUM). The divergences add one to three weighted sums per token
  (e.g. ``sum_i q_i (t_i - s_i)`` for the forward KL). The all-reduces carry a few fp32 numbers
  per token, 4 to 24 bytes in all (20 for the forward KL), whatever V is. Only the top-k kernel
  gathers ``k`` values and indices per token (``k`` is small and independent of V).
- **Tokens are processed in chunks.** The fp32 temporaries (exponentials, log-probabilities) live
  in a workspace of ``chunk_size x V/tp`` reused for every chunk, so the peak is the logits, one
  gradient buffer and the workspace, instead of several ``[N, V]`` tensors. (The gradient buffer,
  as large as the student logits, is the floor: autograd hands it to the output layer anyway.)
- **The gradient is computed in the forward pass.** While the chunk's probabilities are at hand,
  the gradient with respect to the student logits is written (in the input dtype) into one
  ``[N, V/tp]`` buffer; the autograd backward only scales it by the incoming gradient, in place.
  Nothing else is saved for backward.

Statistics are accumulated in fp32 (fp64 when the inputs are fp64, which the tests use to compare
against a reference at 1e-6). Every loss is reduced the same way: the sum over tokens of
``loss_mask * per_token_loss`` divided by ``loss_mask.sum()`` of this microbatch (0 when the mask is
empty), a scalar in the accumulation dtype.

Temperature ``T`` divides both logits before the softmax; the returned value is the divergence at
that temperature (callers multiply by ``T**2`` where their method says so).

There is one entry point, :func:`divergence`, taking a per-chunk kernel of
:mod:`methods.vocab_kernels` (the forward KL, a JSD with its ``beta``, ...) and the layout of the
vocabulary as one :class:`VocabShard` value; :func:`cross_entropy` is the student-only case with
labels. Adding a divergence means adding a kernel.

Both accept a :class:`methods.fused_head.HeadInput` (the output layer's input and weight) in place
of the logits: the fused path computes each chunk's logits from it and never materializes them;
both paths share the chunk loop :func:`run_chunks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from methods import vocab_kernels as vk

if TYPE_CHECKING:
    from methods import fused_head as fused_head_terms
    from methods.base import LossContext

DEFAULT_CHUNK_ELEMENTS = 1 << 20
"""Default work size on CPU: ``chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // (V/tp))`` tokens, so
one fp32 workspace buffer is about 4 MiB (cache-friendly) whatever the vocabulary."""
DEFAULT_CHUNK_ELEMENTS_CUDA = 1 << 22
"""The same on GPU, where fewer, larger kernels pay off (16 MiB per workspace buffer)."""

Tensor = torch.Tensor

CHUNK_SIZE_EXTRA = "logit_chunk_size"
"""Optional ``LossContext.extras`` key: tokens per chunk of the vocab-parallel losses (``int``);
absent or ``None``: the defaults above."""


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's logit columns lie in the vocabulary, and how to walk them.

    Megatron-core's output layer leaves ``[N, V/tp]`` logits on each tensor-parallel rank: rank
    ``r`` holds the global columns ``start .. start + V/tp``; columns at or beyond ``vocab_size``
    (the real vocabulary; megatron pads it) are padding. Built once per loss context
    (:meth:`of`); the default is one unsharded, unpadded vocabulary."""

    start: int = 0
    """First global vocabulary column of this rank's shard."""
    vocab_size: int | None = None
    """Real vocabulary size (``None``: no padding, ``V/tp * tp``)."""
    group: dist.ProcessGroup | None = None
    """Tensor-parallel group of the shards (``None``: the logits are not sharded)."""
    chunk_size: int | None = None
    """Tokens per chunk (``None``: ``DEFAULT_CHUNK_ELEMENTS // (V/tp)``, or
    ``DEFAULT_CHUNK_ELEMENTS_CUDA // (V/tp)`` on GPU)."""

    def __post_init__(self) -> None:
        if self.start < 0 or (self.vocab_size is not None and self.vocab_size <= 0):
            raise ValueError(
                f"need vocab_start >= 0 and vocab_size > 0, got {self.start}, {self.vocab_size}"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 token, got {self.chunk_size}")

    @classmethod
    def of(cls, ctx: LossContext) -> VocabShard:
        """The layout of a loss context's logits (chunk size from ``ctx.extras``)."""
        return cls(ctx.vocab_start, ctx.vocab_size, ctx.tp_group, ctx.extras.get(CHUNK_SIZE_EXTRA))


UNSHARDED = VocabShard()


# ----------------------------------------------------------------------------------------------
# Driver: chunking, masks, temperature, dtype, autograd


class _PrecomputedGradLoss(torch.autograd.Function):
    """Returns the loss; backward scales the gradient computed in forward, in place."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, compute: Callable[[bool], tuple[Tensor, Tensor]]):
        loss, grad = compute(True)
        ctx.stored_grad = grad
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad = ctx.stored_grad
        if grad is None:
            raise RuntimeError(
                "backward ran twice through a vocab-parallel loss; its stored gradient is scaled "
                "in place and freed by the first backward: compute the loss again instead of "
                "retain_graph=True"
            )
        ctx.stored_grad = None
        return grad.mul_(grad_output.to(grad.dtype)), None


def _check_inputs(student, teacher, loss_mask, temperature):
    if student.dim() != 2:
        raise ValueError(f"student_logits must be [N, V/tp], got shape {tuple(student.shape)}")
    if teacher is not None and teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher.shape)} and student_logits {tuple(student.shape)} "
            "must have the same [N, V/tp] shape (same vocabulary and tensor-parallel layout)"
        )
    if loss_mask.shape != student.shape[:1]:
        raise ValueError(
            f"loss_mask must be [N] = [{student.shape[0]}], got {tuple(loss_mask.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tempered(x: Tensor, acc: torch.dtype, inv_temperature: float, out: Tensor) -> Tensor:
    """``x / T`` in the accumulation dtype: a view when nothing changes, else written to ``out``."""
    if x.dtype == acc:
        return x if inv_temperature == 1.0 else torch.mul(x, inv_temperature, out=out)
    out.copy_(x)
    return out if inv_temperature == 1.0 else out.mul_(inv_temperature)


@dataclass(frozen=True)
class ChunkPlan:
    """How one loss walks its ``[N, V/tp]`` logits (:func:`chunk_plan`)."""

    num_tokens: int
    local_vocab: int
    width: int
    """Real vocabulary columns on this rank (the rest are padding)."""
    chunk: int
    """Tokens per chunk."""
    acc: torch.dtype
    """Accumulation dtype."""
    stats: vk.TensorParallelStats
    vocab_start: int
    vocab_size: int


def chunk_plan(
    shard: VocabShard, num_tokens: int, local_vocab: int, dtype: torch.dtype, is_cuda: bool
) -> ChunkPlan:
    """The chunking of ``[num_tokens, local_vocab]`` logits of ``dtype`` laid out as ``shard``."""
    stats = vk.TensorParallelStats(shard.group)
    vocab_size = shard.vocab_size if shard.vocab_size is not None else local_vocab * stats.size
    width = max(0, min(local_vocab, vocab_size - shard.start))
    budget = DEFAULT_CHUNK_ELEMENTS_CUDA if is_cuda else DEFAULT_CHUNK_ELEMENTS
    chunk = shard.chunk_size or max(1, budget // max(width, 1))
    chunk = max(1, min(chunk, num_tokens))
    acc = _accumulation_dtype(dtype)
    return ChunkPlan(num_tokens, local_vocab, width, chunk, acc, stats, shard.start, vocab_size)


Fetch = Callable[[slice], tuple[Tensor, Tensor | None]]
"""``rows -> (student, teacher or None)`` logits of those rows and the real columns ``[n, w]``."""
Emit = Callable[[slice, Tensor], None]
"""``(rows, grad)``: the gradient of the loss w.r.t. the (untempered) student logits ``[n, w]``,
in the accumulation dtype; a workspace buffer, valid until the next chunk."""


@dataclass(frozen=True)
class ChunkTerm:
    """One loss term of :func:`run_terms`: a kernel, its temperature, the weight of its gradient
    in the chunk's combined gradient, and where its teacher logits come from."""

    kernel: vk.Kernel
    temperature: float = 1.0
    weight: float = 1.0
    teacher: Callable[[slice], Tensor | None] | None = None
    """``rows -> [n, w]`` teacher logits of those rows (``None``: a student-only kernel)."""
    teacher_owned: bool = False
    """The teacher logits returned belong to this chunk alone (the kernel may overwrite them)."""


def run_terms(
    terms: list[ChunkTerm],
    plan: ChunkPlan,
    loss_mask: Tensor,
    fetch_student: Callable[[slice], Tensor],
    emit: Emit | None,
    device: torch.device,
    *,
    work: vk.Workspace | None = None,
    student_owned: bool = False,
) -> list[Tensor]:
    """The chunk loop shared by the materialized and the fused (:mod:`methods.fused_head`) paths:
    per term, the masked mean of its kernel's per-token loss. The student's logits of a chunk are
    fetched once for all terms; ``emit`` receives the chunk's gradient, ``sum_k weight_k
    d loss_k / d logits`` (none is computed when ``emit`` is ``None``).

    ``work``: the workspace (``[chunk, width]`` buffers of the accumulation dtype; default a new
    one); ``fetch_student`` may write its logits into its buffer ``"s"``, a teacher into ``"t"``.
    ``student_owned``: the student logits ``fetch_student`` returns belong to this chunk alone (not
    views of a tensor the caller keeps); a kernel may then overwrite them (``Chunk.writable``), as
    it may logits copied into the workspace here (dtype, temperature, or for all but the last of
    several terms)."""
    if not terms:
        raise ValueError("run_terms needs at least one term")
    acc, num_tokens, chunk, width = plan.acc, plan.num_tokens, plan.chunk, plan.width
    need_grad = emit is not None
    mask = loss_mask.detach().to(device=device, dtype=acc)
    count = mask.sum()
    denom = torch.where(count > 0, count, torch.ones_like(count))
    if work is None:
        work = vk.Workspace(chunk, width, acc, device)
    grad_scales = [mask * (term.weight / term.temperature) / denom for term in terms]
    totals = [torch.zeros((), dtype=acc, device=device) for _ in terms]
    last = len(terms) - 1
    for start in range(0, num_tokens, chunk):
        rows = slice(start, min(start + chunk, num_tokens))
        n = rows.stop - rows.start
        s_raw = fetch_student(rows)
        combined: Tensor | None = None
        for k, term in enumerate(terms):
            inv_temperature = 1.0 / term.temperature
            if k == last:
                s = _tempered(s_raw, acc, inv_temperature, work.take("s", n))
                writable = student_owned or s is not s_raw
            else:  # the later terms still need the student's logits: a copy
                s = work.take("s_term", n).copy_(s_raw)
                if inv_temperature != 1.0:
                    s.mul_(inv_temperature)
                writable = True
            t_raw = None if term.teacher is None else term.teacher(rows)
            t = None
            if t_raw is not None:
                t = _tempered(t_raw, acc, inv_temperature, work.take("t", n))
                writable = writable and (term.teacher_owned or t is not t_raw)
            part = vk.Chunk(
                s, t, rows, plan.stats, work, need_grad, plan.vocab_start, plan.vocab_size, writable
            )
            per_token, chunk_grad = term.kernel(part)
            weight = mask[rows]
            totals[k] += torch.where(weight > 0, per_token * weight, 0.0).sum()
            if not need_grad:
                continue
            assert chunk_grad is not None
            scale = grad_scales[k][rows, None]
            if len(terms) == 1:
                combined = chunk_grad.mul_(scale)
            elif combined is None:
                combined = torch.mul(chunk_grad, scale, out=work.take("grad", n))
            else:
                combined.addcmul_(chunk_grad, scale)
        if emit is not None:
            assert combined is not None
            emit(rows, combined)
    return [total / denom for total in totals]


def run_chunks(
    kernel: vk.Kernel,
    plan: ChunkPlan,
    loss_mask: Tensor,
    temperature: float,
    fetch: Fetch,
    emit: Emit | None,
    device: torch.device,
    *,
    work: vk.Workspace | None = None,
    owned: tuple[bool, bool] = (False, False),
) -> Tensor:
    """:func:`run_terms` with one term: ``fetch`` returns the student's and the teacher's logits
    of the rows; ``owned`` says whether each belongs to the chunk alone."""
    teacher: dict[str, Tensor | None] = {}

    def fetch_student(rows: slice) -> Tensor:
        s, teacher["t"] = fetch(rows)
        return s

    term = ChunkTerm(kernel, temperature, 1.0, lambda rows: teacher.pop("t"), owned[1])
    return run_terms(
        [term], plan, loss_mask, fetch_student, emit, device, work=work, student_owned=owned[0]
    )[0]


def divergence(
    kernel: vk.Kernel,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    loss_mask: Tensor,
    shard: VocabShard = UNSHARDED,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """The masked mean over tokens of ``kernel``'s per-token loss, vocab-parallel, with its
    gradient computed in the forward pass.

    Args:
        kernel: a per-chunk kernel of :mod:`methods.vocab_kernels` (``vk.forward_kl_kernel``,
            ``vk.jsd_kernel(beta)``, ...).
        student_logits: ``[N, V/tp]``, vocab-sharded as ``shard`` says; gets the gradient. A
            :class:`methods.fused_head.HeadInput` (the output layer's input and weight) stands in
            for them on the fused path: the logits are then computed chunk by chunk and never
            materialized, and the gradient goes to the hidden states and the weight.
        teacher_logits: ``[N, V/tp]``, sharded the same way; no gradient (``None`` for a
            student-only kernel); a ``HeadInput`` too on the fused path.
        loss_mask: ``[N]`` float token weights, replicated over tp.
        shard: the vocabulary layout of the logits.
        temperature: divides both logits before the softmax.

    Returns:
        Scalar: ``sum_n mask_n loss_n / sum_n mask_n`` (fp32, fp64 for fp64 inputs).
    """
    from methods import sparse_targets

    if isinstance(teacher_logits, sparse_targets.SparseTargets):  # a cached teacher (issue 17)
        return sparse_targets.divergence_of_kernel(
            kernel, student_logits, teacher_logits, loss_mask, shard, temperature=temperature
        )
    if not isinstance(student_logits, Tensor):
        from methods import fused_head

        if fused_head.is_head_input(student_logits):
            return fused_head.divergence(
                kernel, student_logits, teacher_logits, loss_mask, shard, temperature=temperature
            )
    if teacher_logits is not None and not isinstance(teacher_logits, Tensor):
        teacher_logits = teacher_logits.logits()  # type: ignore[attr-defined]
    _check_inputs(student_logits, teacher_logits, loss_mask, temperature)
    num_tokens, local_vocab = student_logits.shape
    plan = chunk_plan(shard, num_tokens, local_vocab, student_logits.dtype, student_logits.is_cuda)
    width = plan.width
    teacher = teacher_logits.detach() if teacher_logits is not None else None

    def fetch(rows: slice) -> tuple[Tensor, Tensor | None]:
        return student_logits[rows, :width], None if teacher is None else teacher[rows, :width]

    def compute(need_grad: bool) -> tuple[Tensor, Tensor | None]:
        grad = torch.empty_like(student_logits) if need_grad else None
        if grad is not None and width < local_vocab:
            grad[:, width:].zero_()

        def emit(rows: slice, chunk_grad: Tensor) -> None:
            assert grad is not None
            grad[rows, :width].copy_(chunk_grad)

        loss = run_chunks(
            kernel,
            plan,
            loss_mask,
            temperature,
            fetch,
            emit if need_grad else None,
            student_logits.device,
        )
        return loss, grad

    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _PrecomputedGradLoss.apply(student_logits, compute)
    return compute(False)[0]


# ----------------------------------------------------------------------------------------------
# The student's own loss


def cross_entropy(
    student_logits: Tensor, labels: Tensor, loss_mask: Tensor, shard: VocabShard = UNSHARDED
) -> Tensor:
    """The student's own next-token cross entropy, vocab-parallel, masked mean.

    Args:
        labels: ``[N]`` global token ids, replicated over tp; any value where ``loss_mask`` is 0.
        Others as :func:`divergence` (no teacher, no temperature).
    """
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"labels must be [N] = [{student_logits.shape[0]}], got {tuple(labels.shape)}"
        )
    return divergence(vk.cross_entropy_kernel(labels), student_logits, None, loss_mask, shard)


def divergences(
    terms: list[fused_head_terms.Term],
    student_logits: Tensor,
    loss_mask: Tensor,
    shard: VocabShard = UNSHARDED,
) -> list[Tensor]:
    """Several losses of the same student logits (:class:`methods.fused_head.Term`: kernel,
    teacher, temperature, weight), one value per term. On the fused path (a ``HeadInput``) the
    student's chunk logits are computed once for all terms and the gradients combined in the
    forward pass (:func:`methods.fused_head.divergences`: the losses must then be added with the
    terms' weights); on logits, one :func:`divergence` per term."""
    if not isinstance(student_logits, Tensor):
        from methods import fused_head

        if fused_head.is_head_input(student_logits):
            return fused_head.divergences(terms, student_logits, loss_mask, shard)
    return [
        divergence(
            term.kernel,
            student_logits,
            term.teacher,  # type: ignore[arg-type]  # a HeadInput teacher: .logits()
            loss_mask,
            shard,
            temperature=term.temperature,
        )
        for term in terms
    ]
