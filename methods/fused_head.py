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
Memory: the chunk's workspace (``C x w`` fp32, a few buffers), ``grad_hidden`` (``N x h``) and
``grad_W`` (``V/tp x h``, which the optimizer holds anyway as the parameter's gradient), instead
of the ``N x V/tp`` logits of both models, the logits' gradient and their fp32 copies. Time: the
output layer's three matmuls are the same (forward, input and weight gradients) plus the teacher's
one; a method with two logit terms (``kd``'s soft and hard) recomputes the student's chunk logits
for each term.

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

FUSED_CHUNK_ELEMENTS = 1 << 22
"""Default work size: ``chunk = FUSED_CHUNK_ELEMENTS // (V/tp)`` tokens (clamped to
``FUSED_MIN_CHUNK_TOKENS``), so each fp32 workspace buffer is about 16 MiB whatever the
vocabulary (128 tokens at V/tp = 32k, 32 at 128k). The output weight is read once per chunk for
each of the three matmuls, so chunks are larger than the materialized path's."""
FUSED_MIN_CHUNK_TOKENS = 16

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


def is_head_input(value: object) -> bool:
    return isinstance(value, HeadInput)


# ----------------------------------------------------------------------------------------------
# The fused loss


class _FusedHeadLoss(torch.autograd.Function):
    """Returns the loss; backward scales the input and weight gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, compute: Callable[[], tuple]):
        loss, grad_hidden, grad_weight = compute()
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

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
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output.to(grad_weight.dtype))
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None


def _linear(hidden: Tensor, weight: Tensor) -> Tensor:
    return torch.nn.functional.linear(hidden, weight)


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
    num_tokens, local_vocab = student.shape
    if teacher is not None and tuple(teacher.shape) != (num_tokens, local_vocab):
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} and student logits "
            f"{(num_tokens, local_vocab)} must have the same [N, V/tp] shape"
        )
    if loss_mask.shape != (num_tokens,):
        raise ValueError(f"loss_mask must be [N] = [{num_tokens}], got {tuple(loss_mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if shard.chunk_size is None:
        tokens = max(FUSED_MIN_CHUNK_TOKENS, FUSED_CHUNK_ELEMENTS // max(local_vocab, 1))
        shard = replace(shard, chunk_size=tokens)
    plan = vp.chunk_plan(shard, num_tokens, local_vocab, student.dtype, student.is_cuda)
    width = plan.width
    hidden, weight = student.hidden, student.weight
    want_hidden = torch.is_grad_enabled() and hidden.requires_grad
    want_weight = torch.is_grad_enabled() and weight.requires_grad
    low_precision = weight.dtype in (torch.bfloat16, torch.float16)

    def fetch_teacher(rows: slice) -> Tensor | None:
        if teacher is None:
            return None
        if isinstance(teacher, HeadInput):
            with torch.no_grad():
                t = _linear(teacher.hidden[rows], teacher.weight[:width])
                return t if teacher.transform is None else teacher.transform(t)
        return teacher.detach()[rows, :width]

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

        def fetch(rows: slice) -> tuple[Tensor, Tensor | None]:
            s = _linear(hidden[rows], w)
            if student.transform is not None:
                if need:
                    with torch.enable_grad():
                        x = s.requires_grad_()
                        y = student.transform(x)
                    pending["x"], pending["y"] = x, y
                    s = y.detach()
                else:
                    s = student.transform(s)
            return s, fetch_teacher(rows)

        def emit(rows: slice, grad: Tensor) -> None:
            g = grad.to(hidden.dtype)
            if "y" in pending:  # back through the transform (e.g. masked columns get no gradient)
                (g,) = torch.autograd.grad(pending.pop("y"), pending.pop("x"), g)
            if grad_hidden is not None:
                torch.mm(g, w, out=grad_hidden[rows])
            if grad_weight is not None:
                h = hidden[rows]
                if low_precision:
                    g, h = g.float(), h.float()
                grad_weight[:width].addmm_(g.t(), h)

        loss = vp.run_chunks(
            kernel, plan, loss_mask, temperature, fetch, emit if need else None, hidden.device
        )
        return loss, grad_hidden, grad_weight

    if want_hidden or want_weight:
        return _FusedHeadLoss.apply(hidden, weight, compute)
    return compute()[0]


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
