"""What the prediction-layer (logit) methods share: taps, feature lookup, and the soft and hard
terms of the papers' soft+hard mixes, written once.

The mixes are weighted terms: a method returns its terms unweighted (``soft``, ``hard``) and
declares their weights with ``term_weights`` (:class:`methods.base.WeightsTerms`); the terms
themselves are one of :data:`SOFT_LOSSES` (:func:`soft_loss`) and the student's own cross entropy
(:func:`hard_term`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from methods import vocab_kernels as vk
from methods import vocab_parallel as vp
from methods.base import FeatureKind, LossContext, ModelInfo, Role, Stage, Tap
from methods.schedules import ScheduleLike, value_at

TEACHER_LOGITS = Tap(Role.TEACHER, FeatureKind.LOGITS)
"""``[N, V/tp]`` teacher logits, vocab-sharded over tp."""
STUDENT_LOGITS = Tap(Role.STUDENT, FeatureKind.LOGITS)
"""``[N, V/tp]`` student logits, vocab-sharded over tp."""
BOTH_LOGITS = (TEACHER_LOGITS, STUDENT_LOGITS)
BOTH_STAGES = frozenset({Stage.PRETRAIN, Stage.TASK})

CHUNK_SIZE_EXTRA = vp.CHUNK_SIZE_EXTRA

SoftLoss = Literal["ce", "kl", "mse"]
SOFT_LOSSES: dict[str, str] = {
    "ce": "soft cross entropy H(p_t^T, p_s^T) (Hinton et al. 2015's soft-target term)",
    "kl": "T^2 KL(p_t^T || p_s^T) (the soft term with Hinton's gradient-scale correction)",
    "mse": "MSE between raw logits, mean over the vocabulary (no temperature)",
}
"""The soft terms of the papers' soft+hard mixes."""


def both_logits(features: Mapping[Tap, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(student, teacher)`` logits when both are on this pipeline stage, else ``None``."""
    student = features.get(STUDENT_LOGITS)
    teacher = features.get(TEACHER_LOGITS)
    if student is None or teacher is None:
        return None
    return student, teacher


def at(value: ScheduleLike, ctx: LossContext) -> float:
    """A plain or scheduled parameter's value at the context's step."""
    return value_at(value, ctx.step, ctx.total_steps)


def require_labels(ctx: LossContext, method: str) -> torch.Tensor:
    if ctx.labels is None:
        raise ValueError(
            f"method {method!r} needs labels (next-token ids) but the runtime gave none; "
            "use a data source with labels or drop the method's hard-label term"
        )
    return ctx.labels


def soft_loss(
    kind: SoftLoss,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    ctx: LossContext,
    temperature: float = 1.0,
) -> torch.Tensor:
    """One of :data:`SOFT_LOSSES` between vocab-sharded logits, masked mean over ``mask``."""
    shard = vp.VocabShard.of(ctx)
    if kind == "mse":
        return vp.divergence(vk.mse_kernel(), student, teacher, mask, shard)
    kernel = vk.soft_ce_kernel if kind == "ce" else vk.forward_kl_kernel
    loss = vp.divergence(kernel, student, teacher, mask, shard, temperature=temperature)
    return loss if kind == "ce" else loss * temperature**2


def soft_term(
    features: Mapping[Tap, torch.Tensor],
    ctx: LossContext,
    *,
    temperature: float,
    loss: SoftLoss,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The soft term on logits (last stage only; ``None`` elsewhere): :func:`soft_loss` over
    ``mask`` (default ``ctx.loss_mask``)."""
    logits = both_logits(features)
    if logits is None:
        return None
    mask = ctx.loss_mask if mask is None else mask
    return soft_loss(loss, *logits, mask, ctx, temperature)


def cross_entropy(student: torch.Tensor, ctx: LossContext, method: str) -> torch.Tensor:
    """The student's next-token cross entropy on ``ctx.labels`` over ``ctx.loss_mask``."""
    labels = require_labels(ctx, method)
    return vp.cross_entropy(student, labels, ctx.loss_mask, vp.VocabShard.of(ctx))


def hard_term(
    features: Mapping[Tap, torch.Tensor], ctx: LossContext, method: str
) -> torch.Tensor | None:
    """The student's next-token cross entropy (last stage only; ``None`` elsewhere)."""
    student = features.get(STUDENT_LOGITS)
    return None if student is None else cross_entropy(student, ctx, method)


def soft_hard_weights(params: Any, ctx: LossContext) -> dict[str, float]:
    """The weights of a soft+hard mix: ``soft_weight`` and ``hard_weight`` of ``params``."""
    return {"soft": at(params.soft_weight, ctx), "hard": at(params.hard_weight, ctx)}


Terms = Callable[
    [Any, tuple[torch.Tensor, torch.Tensor], LossContext, str], dict[str, torch.Tensor]
]
"""``(params, (student, teacher) logits, ctx, method name) -> {term: loss}`` (unweighted)."""


def logit_method(
    cls_name: str,
    *,
    name: str,
    params: type,
    terms: Terms,
    paper: str,
    doc: str,
    stages: frozenset[Stage] = BOTH_STAGES,
    signals: str = "logits",
    weights: Callable[[Any, LossContext], dict[str, float]] | None = None,
    check: Callable[[Any], object] | None = None,
    check_student: Callable[[Any, ModelInfo], None] | None = None,
    fused_head: bool = False,
) -> type:
    """The class of a method computed from both models' logits alone: a declaration of its terms.

    The class has the registry's attributes (``name``, ``stages``, ``paper``, ``signals``,
    ``Params``, the docstring ``doc``), takes ``BOTH_LOGITS`` and, on the stage with the logits,
    returns ``terms(params, (student, teacher), ctx, name)``. ``weights(params, ctx)`` weighs the
    terms (:class:`methods.base.WeightsTerms`, e.g. :func:`soft_hard_weights`); ``check(params)``
    raises ``ValueError`` on bad parameters when the method is built, ``check_student(params,
    student)`` when its taps are asked for. ``fused_head=True`` declares that ``terms`` hands the
    logits only to :mod:`methods.vocab_parallel`'s losses (:mod:`methods.fused_head`)."""

    def __init__(self: Any, params_: Any = None) -> None:
        self.params = params_ or params()
        if check is not None:
            check(self.params)

    def taps(self: Any, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        if check_student is not None:
            check_student(self.params, student)
        return BOTH_LOGITS

    def compute(
        self: Any, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        logits = both_logits(features)
        return {} if logits is None else terms(self.params, logits, ctx, name)

    namespace: dict[str, Any] = {
        "__doc__": doc,
        "__module__": params.__module__,  # declared where its parameters are
        "name": name,
        "stages": stages,
        "paper": paper,
        "signals": signals,
        "Params": params,
        "__init__": __init__,
        "taps": taps,
        "compute": compute,
        "fused_head": fused_head,
    }
    if weights is not None:
        namespace["term_weights"] = lambda self, ctx: weights(self.params, ctx)
    return type(cls_name, (), namespace)
