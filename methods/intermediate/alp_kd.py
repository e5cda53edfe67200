"""ALP-KD (Passban et al. 2021): each student layer attends over all teacher layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from methods.base import FeatureKind, LossContext, ModelInfo, Stage, Tap
from methods.intermediate.common import (
    Pooling,
    Projections,
    acc,
    all_or_nothing,
    check_hidden,
    hard_term,
    is_off,
    logit_taps,
    pool,
    s_tap,
    sample_mean,
    soft_term,
    t_tap,
    to_teacher_width,
    token_mask,
    width_projection,
)
from methods.logit_common import at
from methods.schedules import ScheduleLike

H = FeatureKind.HIDDEN


def pooled_layers(
    layers: list[torch.Tensor],
    mask: torch.Tensor,
    how: Pooling,
    dtype: torch.dtype,
    ctx: LossContext | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L`` hidden states ``[s, b, h]`` -> ``([b, L, h] pooled vectors, [b] valid samples)``
    (``b`` examples when ``ctx`` carries ``example_ids``)."""
    pooled = [pool(acc(x, dtype), mask, how, ctx) for x in layers]
    return torch.stack([v for v, _ in pooled], dim=1), pooled[0][1]


@dataclass(kw_only=True, frozen=True)
class ALPKDParams:
    pooling: Literal["last", "mean"] = "last"
    """Vector per sample and layer: ``last`` non-padding token (the decoder's counterpart of
    ALP-KD's [CLS]) or ``mean`` over non-padding tokens."""
    alp_weight: ScheduleLike = 0.2
    """Weight of the attention-based layer projection loss (GKD's lambda = 0.2)."""
    soft_weight: ScheduleLike = 0.7
    """Weight of the soft term (0.7)."""
    hard_weight: ScheduleLike = 0.1
    """Weight of the student's own loss (0.1)."""
    temperature: ScheduleLike = 20.0
    """Temperature of the soft term (20)."""
    soft_loss: Literal["ce", "kl"] = "ce"
    """Soft term: soft cross entropy (GKD's recipe) or T^2 KL."""
    seed: int = 0
    """Seed of the width projection's initial weights (only when the widths differ)."""


class ALPKD:
    """Attention-based layer projection (Passban et al. 2021, "ALP-KD: Attention-Based Layer
    Projection for Knowledge Distillation", AAAI, sec. 3, eq. 5-7): for each student layer ``i``
    with pooled vector ``h_i^S``, weights over *all* teacher layers ``alpha_ij =
    softmax_j(h_i^S . h_j^T)``, the fused target ``f_i = sum_j alpha_ij h_j^T`` and the loss
    ``sum_i MSE(h_i^S, f_i)`` (mean over samples and features; the gradient also flows through
    ``alpha``). A student narrower than the teacher is first mapped to its width by a learned
    linear (replicated over tp). Needs every layer of both models on one stage: pp=1.
    Terms: ``alp``, ``soft``, ``hard``.
    """

    name: ClassVar[str] = "alp_kd"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.TASK})
    paper: ClassVar[str] = "Passban et al. 2021"
    signals: ClassVar[str] = "pooled hidden states of all layers, logits, labels"
    Params: ClassVar[type] = ALPKDParams
    requires_single_stage: bool = True

    def __init__(self, params: ALPKDParams | None = None) -> None:
        self.params = params or ALPKDParams()
        self.projections = Projections(self.name, self.params.seed)
        self._layers: tuple[int, int] | None = None

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        p = self.params
        self._layers = (teacher.num_layers, student.num_layers)
        width_projection(self.projections, teacher, student)
        taps = [s_tap(H, j) for j in range(student.num_layers)]
        taps += [t_tap(H, t) for t in range(teacher.num_layers)]
        return taps + logit_taps(soft=not is_off(p.soft_weight), hard=not is_off(p.hard_weight))

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.projections.modules()

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        p = self.params
        return {
            "alp": at(p.alp_weight, ctx),
            "soft": at(p.soft_weight, ctx),
            "hard": at(p.hard_weight, ctx),
        }

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        if self._layers is None:
            raise RuntimeError("alp_kd: call taps(teacher, student) before compute()")
        teacher_layers, student_layers = self._layers
        p = self.params
        terms: dict[str, torch.Tensor] = {}
        students = all_or_nothing(features, [s_tap(H, j) for j in range(student_layers)], self.name)
        teachers = all_or_nothing(features, [t_tap(H, t) for t in range(teacher_layers)], self.name)
        if students is not None and teachers is not None:
            check_hidden(students[0], "student hidden state")
            dtype = acc(students[0]).dtype
            mask = token_mask(ctx, students[0], dtype)
            s_vec, valid = pooled_layers(students, mask, p.pooling, dtype, ctx)  # [b, Ls, h_s]
            t_vec, _ = pooled_layers(teachers, mask, p.pooling, dtype, ctx)  # [b, Lt, h_t]
            s_vec = to_teacher_width(self.projections, s_vec)
            alpha = torch.softmax(torch.matmul(s_vec, t_vec.transpose(1, 2)), dim=-1)
            fused = torch.matmul(alpha, t_vec)  # [b, Ls, h_t]
            per_sample = (s_vec - fused).pow(2).mean(-1).sum(-1)  # sum over student layers
            terms["alp"] = sample_mean(per_sample, valid)
        if not is_off(p.soft_weight):
            soft = soft_term(features, ctx, temperature=at(p.temperature, ctx), loss=p.soft_loss)
            if soft is not None:
                terms["soft"] = soft
        if not is_off(p.hard_weight):
            hard = hard_term(features, ctx, self.name)
            if hard is not None:
                terms["hard"] = hard
        return terms
