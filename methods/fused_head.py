"""Fused output layer and loss: the vocabulary logits of teacher and student are never built.

Design
======

On the last pipeline stage a logit-statistics method (every logit divergence, ``glmd``, ``kd``,
``lm``, ``topk_kd``, ...) only needs per-token statistics of ``softmax(hidden @ W_out^T)``. The
runtime (``parallel.stage`` / ``parallel.taps``) therefore stops the output layers short: a forward
pre-hook on each model's ``output_layer`` records the layer's input (the final-norm output) and the
weight it would multiply, and lets the layer run on one token only. The ``LOGITS`` feature a method
receives is then a :class:`HeadInput` instead of a ``[N, V/tp]`` tensor:

- ``hidden``: ``[N, h]``, tokens flattened as the logits would be (``s``-major), replicated over
  tp. For the student it is the output layer's input after megatron's own tensor-parallel region
  (``copy_to_tensor_model_parallel_region``: identity forward, all-reduce of the gradient backward;
  under sequence parallelism ``gather_from_sequence_parallel_region``: all-gather forward,
  reduce-scatter backward), exactly what ``ColumnParallelLinear`` does with its input, so the
  partial input gradients of the vocabulary shards are summed over tp by autograd as today.
- ``weight``: ``[V/tp, h]``, this rank's vocabulary shard of the output weight, the tensor the
  layer was called with: the output layer's own weight, or the tied embedding (on the first stage
  the embedding itself; on the last stage under pipeline parallelism megatron-core's copy, whose
  gradient megatron all-reduces with the embedding's). A teacher restricted to a compressed
  student vocabulary gives ``W[index]`` (the restricted head, ``V'/tp`` rows).
- ``transform``: the stage's feature transform of those logits (masking the padding slots of a
  compressed vocabulary), applied per chunk.

:func:`methods.vocab_parallel.divergence` and :func:`~methods.vocab_parallel.cross_entropy`
accept a :class:`HeadInput` wherever they accept logits and then run :func:`divergence` here. It
walks the tokens in chunks of ``C`` rows and, per chunk:

1. ``s = hidden[rows] @ W[:w]^T`` (``w`` = this rank's real vocabulary columns: padding columns of
   megatron's padded vocabulary are never computed, the same as masking them), in the model dtype
   as megatron's output layer computes it; the teacher's ``t`` the same way under ``no_grad``;
2. the chunk kernel of :mod:`methods.vocab_kernels` (the same kernels, the same tensor-parallel
   statistics: only a few numbers per token cross ranks, as without fusion) gives the per-token
   loss and ``g = d loss / d s`` (``[C, w]``);
3. ``grad_hidden[rows] = g @ W[:w]`` and ``grad_W[:w] += g^T @ hidden[rows]`` (fp32 accumulator
   for bf16/fp16 weights); ``s``, ``t`` and ``g`` are dropped.

The loss is returned through an autograd function whose backward scales the two stored gradients
by the incoming gradient (in place), like ``_PrecomputedGradLoss`` does for materialized logits.
Memory: the chunk's logits buffers (``C x w`` fp32, one for the student and one for the teacher:
the matmuls write into them and the forward KL and cross-entropy kernels overwrite them with the
exponentials and the gradient; the other divergences add a few buffers of the same size; the
default ``C`` comes from a byte budget, :func:`default_chunk`), ``grad_hidden`` (``N x h``) and
``grad_W`` (``V/tp x h``, which the optimizer holds anyway as the parameter's gradient), instead
of the ``N x V/tp`` logits of both models, the logits' gradient and their fp32 copies. Time: the
output layer's three matmuls are the same (forward, input and weight gradients) plus the teacher's
one. A method with several logit terms on the same student head (``kd``'s soft and hard) runs them
in one pass (:func:`divergences`): the student's chunk logits are computed once, the terms'
gradients combined with their weights, and the three matmuls run once for all terms.

Which path runs is decided once per run (:func:`choose_head_path`): fused when every method that
requests ``LOGITS`` taps declares ``fused_head = True`` (:func:`methods.logit_common.logit_method`
declarations, ``lm``), none changes the forward pass, and the output layers have no bias and do
not gather their output; otherwise the materialized path of today. The environment variable
``GKD_FUSED_HEAD=off`` forces the materialized path (for comparisons). Evaluation always
materializes (its scorers read the logits themselves).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from methods import vocab_kernels as vk
from methods import vocab_parallel as vp
from methods.base import FeatureKind, ForwardModifier

Tensor = torch.Tensor

FUSED_CHUNK_BYTES = 16 << 20
"""Default work size on CPU: the chunk's logits buffers (the student's and the teacher's fp32
logits, plus their model-dtype matmul outputs in bf16/fp16) take about this many bytes in all:
64 tokens at V/tp = 32k in fp32 with a teacher, 128 without one (clamped to
``[FUSED_MIN_CHUNK_TOKENS, FUSED_MAX_CHUNK_TOKENS]``, a multiple of 16 tokens). The kernels
overwrite those buffers in place (forward KL, cross entropy) or add a few more of the same size
(the other divergences)."""
FUSED_CHUNK_BYTES_CUDA = 256 << 20
"""The same on GPU (larger matmuls pay off more; 512 tokens at 32k with a teacher)."""
FUSED_MIN_CHUNK_TOKENS = 32
"""Smaller chunks make each of the three matmuls re-read the whole output weight too often."""
FUSED_MAX_CHUNK_TOKENS = 4096

ENV_SWITCH = "GKD_FUSED_HEAD"
"""``off``: never take the fused path (``auto``, the default: whenever the methods allow it)."""

FUSED = "fused"
MATERIALIZED = "materialized"


@dataclass(frozen=True, eq=False)
class HeadInput:
    """The output layer's input and weight standing in for ``[N, V/tp]`` logits (see the module
    docstring). ``shape``, ``dim()``, ``dtype`` and ``device`` answer as the logits would."""

    hidden: Tensor
    """``[N, h]``; gets the gradient (student), or detached (teacher)."""
    weight: Tensor
    """``[V/tp, h]`` this rank's rows of the output weight."""
    transform: Callable[[Tensor], Tensor] | None = None
    """Applied to each ``[C, V/tp]`` chunk of logits (e.g. masking padding slots)."""

    def __post_init__(self) -> None:
        if self.hidden.dim() != 2 or self.weight.dim() != 2:
            raise ValueError(
                f"HeadInput needs hidden [N, h] and weight [V/tp, h], got "
                f"{tuple(self.hidden.shape)} and {tuple(self.weight.shape)}"
            )
        if self.hidden.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"hidden width {self.hidden.shape[1]} != output weight width {self.weight.shape[1]}"
            )

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.hidden.shape[0], self.weight.shape[0]))

    def dim(self) -> int:
        return 2

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def is_cuda(self) -> bool:
        return self.hidden.is_cuda

    @property
    def requires_grad(self) -> bool:
        return self.hidden.requires_grad or self.weight.requires_grad

    def detach(self) -> HeadInput:
        return HeadInput(self.hidden.detach(), self.weight.detach(), self.transform)

    def then(self, fn: Callable[[Tensor], Tensor]) -> HeadInput:
        """This input with ``fn`` applied after the current transform."""
        first = self.transform
        composed = fn if first is None else (lambda x: fn(first(x)))
        return replace(self, transform=composed)

    def logits(self, rows: slice = slice(None)) -> Tensor:
        """The materialized logits of ``rows`` (differentiable): what the output layer would have
        returned, transformed. For tests and for callers that need the tensor itself."""
        out = torch.nn.functional.linear(self.hidden[rows], self.weight)
        return out if self.transform is None else self.transform(out)


def default_chunk(
    local_vocab: int, dtype: torch.dtype, teacher: object, is_cuda: bool = False
) -> int:
    """Tokens per chunk of the fused path when none is set: ``FUSED_CHUNK_BYTES`` (CPU) or
    ``FUSED_CHUNK_BYTES_CUDA`` over the bytes one token takes in the chunk's logits buffers."""
    models = 1 if teacher is None else 2
    per_token = models * max(local_vocab, 1) * 4
    if dtype in (torch.bfloat16, torch.float16):
        per_token += models * max(local_vocab, 1) * 2
    budget = FUSED_CHUNK_BYTES_CUDA if is_cuda else FUSED_CHUNK_BYTES
    tokens = budget // per_token // 16 * 16
    return max(FUSED_MIN_CHUNK_TOKENS, min(FUSED_MAX_CHUNK_TOKENS, tokens))


def is_head_input(value: object) -> bool:
    return isinstance(value, HeadInput)


# ----------------------------------------------------------------------------------------------
# The fused loss


class _FusedHeadLoss(torch.autograd.Function):
    """Returns the ``[K]`` term losses; backward scales the input and weight gradients computed in
    forward (those of ``sum_k weight_k loss_k``) by the common factor of the incoming gradients,
    which must be proportional to the terms' weights."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, compute: Callable[[], tuple], weights: Tensor):
        losses, grad_hidden, grad_weight = compute()
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.term_weights = weights
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "backward ran twice through a fused head loss; its stored gradients are scaled "
                "in place and freed by the first backward: compute the loss again instead of "
                "retain_graph=True"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        factor = _common_factor(grad_output, ctx.term_weights.to(grad_output))
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(factor.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(factor.to(grad_weight.dtype))
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def _common_factor(grad_output: Tensor, weights: Tensor) -> Tensor:
    """``c`` with ``grad_output == c * weights`` (the terms were added with these weights)."""
    if weights.numel() == 1:
        return grad_output.reshape(()) / weights.reshape(())
    nonzero = weights != 0
    if not bool(nonzero.any()):
        return grad_output.new_zeros(())
    index = int(nonzero.nonzero()[0, 0])
    factor = grad_output[index] / weights[index]
    expected = factor * weights
    if not torch.allclose(grad_output, expected, rtol=1e-4, atol=1e-12 * float(factor.abs())):
        raise RuntimeError(
            "the terms of a fused head loss were combined with weights "
            f"{grad_output.tolist()} (up to a common factor), not the weights "
            f"{weights.tolist()} they were computed with (their gradients are summed in the "
            "forward pass): pass the weights the losses are added with, or set "
            f"{ENV_SWITCH}=off"
        )
    return factor


def _linear(hidden: Tensor, weight: Tensor) -> Tensor:
    return torch.nn.functional.linear(hidden, weight)


@dataclass(frozen=True)
class Term:
    """One logit loss of :func:`divergences`: ``weight`` is the weight the caller adds this
    term's loss with (up to a factor common to all terms)."""

    kernel: vk.Kernel
    teacher: HeadInput | Tensor | None = None
    temperature: float = 1.0
    weight: float = 1.0


def divergence(
    kernel: vk.Kernel,
    student: HeadInput,
    teacher: HeadInput | Tensor | None,
    loss_mask: Tensor,
    shard: vp.VocabShard = vp.UNSHARDED,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """:func:`methods.vocab_parallel.divergence` with the logits computed chunk by chunk from
    ``student`` (and ``teacher``) and the gradient sent to the student's hidden states and output
    weight; same arguments, same value."""
    return divergences([Term(kernel, teacher, temperature)], student, loss_mask, shard)[0]


def divergences(
    terms: Sequence[Term],
    student: HeadInput,
    loss_mask: Tensor,
    shard: vp.VocabShard = vp.UNSHARDED,
) -> list[Tensor]:
    """Several logit losses of one student output layer (e.g. ``kd``'s soft and hard terms): the
    student's logits of each chunk are computed once for all terms, their gradients combined with
    the terms' weights in the forward pass, and the three matmuls of the output layer (logits,
    input and weight gradients) run once instead of once per term. The losses are returned one
    per term; backward requires the gradients reaching them to be proportional to the weights
    (as when the caller adds ``sum_k weight_k * loss_k`` to its objective) and raises otherwise."""
    if not terms:
        raise ValueError("divergences needs at least one term")
    num_tokens, local_vocab = student.shape
    teachers = [term.teacher for term in terms if term.teacher is not None]
    for teacher in teachers:
        if tuple(teacher.shape) != (num_tokens, local_vocab):
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} and student logits "
                f"{(num_tokens, local_vocab)} must have the same [N, V/tp] shape"
            )
    if loss_mask.shape != (num_tokens,):
        raise ValueError(f"loss_mask must be [N] = [{num_tokens}], got {tuple(loss_mask.shape)}")
    for term in terms:
        if not term.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {term.temperature}")
    if shard.chunk_size is None:
        some_teacher = teachers[0] if teachers else None
        tokens = default_chunk(local_vocab, student.dtype, some_teacher, student.is_cuda)
        shard = replace(shard, chunk_size=tokens)
    plan = vp.chunk_plan(shard, num_tokens, local_vocab, student.dtype, student.is_cuda)
    width = plan.width
    hidden, weight = student.hidden, student.weight
    want_hidden = torch.is_grad_enabled() and hidden.requires_grad
    want_weight = torch.is_grad_enabled() and weight.requires_grad
    low_precision = weight.dtype in (torch.bfloat16, torch.float16)
    # The chunk's buffers: logits are written into "s" and "t" (fp32; the kernel may overwrite
    # them, see vocab_kernels.Chunk.writable); bf16/fp16 matmuls write into "raw" buffers first.
    work = vk.Workspace(plan.chunk, width, plan.acc, hidden.device)
    raw = vk.Workspace(plan.chunk, width, hidden.dtype, hidden.device)

    def head(x: Tensor, w: Tensor, name: str) -> Tensor:
        """``x @ w^T`` into a workspace buffer (the kernel reads it as fp32 logits)."""
        if x.dtype != w.dtype:
            return _linear(x, w)
        if x.dtype == plan.acc:
            return torch.mm(x, w.t(), out=work.take(name, x.shape[0]))
        if x.dtype == raw.dtype:
            return torch.mm(x, w.t(), out=raw.take(name, x.shape[0]))
        return _linear(x, w)

    def teacher_fetch(teacher: HeadInput | Tensor | None) -> Callable[[slice], Tensor | None]:
        def fetch_teacher(rows: slice) -> Tensor | None:
            if teacher is None:
                return None
            if isinstance(teacher, HeadInput):
                with torch.no_grad():
                    if teacher.transform is None:
                        return head(teacher.hidden[rows], teacher.weight[:width], "t")
                    t = _linear(teacher.hidden[rows], teacher.weight[:width])
                    return teacher.transform(t)
            return teacher.detach()[rows, :width]

        return fetch_teacher

    chunk_terms = [
        vp.ChunkTerm(
            term.kernel,
            term.temperature,
            term.weight,
            teacher_fetch(term.teacher),
            isinstance(term.teacher, HeadInput),
        )
        for term in terms
    ]

    def compute() -> tuple[Tensor, Tensor | None, Tensor | None]:
        need = want_hidden or want_weight
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = None
        if want_weight:
            grad_weight = torch.zeros(
                weight.shape,
                dtype=torch.float32 if low_precision else weight.dtype,
                device=weight.device,
            )
        w = weight[:width]
        pending: dict[str, Tensor] = {}

        def fetch_student(rows: slice) -> Tensor:
            if student.transform is None:
                return head(hidden[rows], w, "s")
            s = _linear(hidden[rows], w)
            if not need:
                return student.transform(s)
            with torch.enable_grad():
                x = s.requires_grad_()
                y = student.transform(x)
            pending["x"], pending["y"] = x, y
            return y.detach()

        def emit(rows: slice, grad: Tensor) -> None:
            transformed = "y" in pending
            # The gradient of the logits in the model dtype, as the materialized path hands it to
            # the output layer (bf16/fp16: rounded into the free raw "s" buffer).
            g = grad
            if grad.dtype != hidden.dtype:
                g = raw.take("s", grad.shape[0]).copy_(grad)
            if transformed:  # back through the transform (e.g. masked columns get no gradient)
                (g,) = torch.autograd.grad(pending.pop("y"), pending.pop("x"), g)
            if grad_hidden is not None:
                torch.mm(g, w, out=grad_hidden[rows])
            if grad_weight is not None:
                h = hidden[rows]
                if low_precision:  # fp32 accumulation of the rounded gradient
                    g = g.float() if transformed else grad.copy_(g)
                    h = h.float()
                grad_weight[:width].addmm_(g.t(), h)

        losses = vp.run_terms(
            chunk_terms,
            plan,
            loss_mask,
            fetch_student,
            emit if need else None,
            hidden.device,
            work=work,
            student_owned=student.transform is None,
        )
        return torch.stack(losses), grad_hidden, grad_weight

    if want_hidden or want_weight:
        weights = torch.tensor([float(term.weight) for term in terms], dtype=torch.float64)
        losses = _FusedHeadLoss.apply(hidden, weight, compute, weights)
    else:
        losses = compute()[0]
    return list(losses.unbind(0))


def soft_and_hard(
    kind: str,
    student: HeadInput | Tensor,
    teacher: HeadInput | Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    shard: vp.VocabShard,
    *,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
) -> tuple[Tensor, Tensor]:
    """``kd``'s two terms on one student head: the soft loss ``kind`` (``"ce"``: the soft cross
    entropy at ``temperature``; ``"kl"``: the forward KL at ``temperature`` times ``T^2``;
    ``"mse"``: the squared error of the raw logits) and the hard cross entropy on ``labels``, to
    be added with ``soft_weight`` and ``hard_weight``. On the fused path the student's chunk
    logits are computed once for both (:func:`divergences`)."""
    if labels.shape != (student.shape[0],):
        raise ValueError(f"labels must be [N] = [{student.shape[0]}], got {tuple(labels.shape)}")
    scale = 1.0
    if kind == "mse":
        soft = Term(vk.mse_kernel(), teacher, 1.0, soft_weight)
    elif kind in ("ce", "kl"):
        kernel = vk.soft_ce_kernel if kind == "ce" else vk.forward_kl_kernel
        scale = 1.0 if kind == "ce" else temperature**2
        soft = Term(kernel, teacher, temperature, soft_weight * scale)
    else:
        raise ValueError(f"soft loss must be 'ce', 'kl' or 'mse', got {kind!r}")
    hard = Term(vk.cross_entropy_kernel(labels), None, 1.0, hard_weight)
    soft_loss, hard_loss = vp.divergences([soft, hard], student, loss_mask, shard)  # type: ignore[arg-type]
    return (soft_loss if scale == 1.0 else soft_loss * scale), hard_loss


# ----------------------------------------------------------------------------------------------
# Choosing the path


def allows_fused_head(method: object) -> bool:
    """A method's declaration: ``fused_head = True`` means it passes its ``LOGITS`` features only
    to :mod:`methods.vocab_parallel`'s losses (never reads them itself)."""
    return bool(getattr(method, "fused_head", False))


def requests_logits(method: Any, teacher: Any, student: Any) -> bool:
    taps = method.taps(teacher, student) if hasattr(method, "taps") else ()
    return any(tap.kind is FeatureKind.LOGITS for tap in taps)


def choose_head_path(
    pipeline: Any, teacher: Any, student: Any, *, requested: str | None = None
) -> tuple[str, str]:
    """``(path, reason)``: ``"fused"`` when every method of ``pipeline`` that requests logits
    allows the fused head (``pipeline.entries``' methods; a pipeline object without entries
    decides by its own ``fused_head`` attribute) and none changes the forward pass, else
    ``"materialized"``. ``requested``: ``"off"`` forces the materialized path (default: the
    ``GKD_FUSED_HEAD`` environment variable, else ``"auto"``)."""
    requested = (requested or os.environ.get(ENV_SWITCH, "auto")).strip().lower()
    if requested not in ("auto", "off"):
        raise ValueError(f"{ENV_SWITCH} must be 'auto' or 'off', got {requested!r}")
    if requested == "off":
        return MATERIALIZED, f"{ENV_SWITCH}=off"
    entries = list(getattr(pipeline, "entries", ()))
    if not entries:
        if not requests_logits(pipeline, teacher, student):
            return MATERIALIZED, "no method requests logits"
        if allows_fused_head(pipeline):
            return FUSED, "the pipeline declares fused_head"
        return MATERIALIZED, "the pipeline does not declare fused_head"
    users = [e for e in entries if requests_logits(e.method, teacher, student)]
    if not users:
        return MATERIALIZED, "no method requests logits"
    blocking = [e.name for e in users if not allows_fused_head(e.method)]
    blocking += [e.name for e in entries if isinstance(e.method, ForwardModifier)]
    if blocking:
        return (
            MATERIALIZED,
            f"method(s) {', '.join(sorted(set(blocking)))} need materialized logits",
        )
    return FUSED, f"every logit method allows it ({', '.join(e.name for e in users)})"


def output_layers_fusable(models: Iterable[torch.nn.Module]) -> str | None:
    """``None`` when every model's output layer (where present) can be fused, else the reason."""
    for model in models:
        layer = getattr(model, "output_layer", None)
        if layer is None:
            continue
        if getattr(layer, "bias", None) is not None:
            return "an output layer has a bias"
        if getattr(layer, "gather_output", False):
            return "an output layer gathers its output over tp"
    return None


def describe(path: str, reason: str) -> str:
    return f"output layer + logit losses: {path} path ({reason})"


__all__: Sequence[str] = (
    "FUSED",
    "MATERIALIZED",
    "HeadInput",
    "choose_head_path",
    "divergence",
    "is_head_input",
    "output_layers_fusable",
)
