"""Universal-KD (Wu et al. 2021): attention over projected teacher layers, KL between projections."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from methods.base import FeatureKind, LossContext, ModelInfo, Stage, Tap
from methods.intermediate.common import (
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
    token_mask,
)
from methods.logit_common import at
from methods.schedules import ScheduleLike

H = FeatureKind.HIDDEN


@dataclass(kw_only=True, frozen=True)
class UniversalKDParams:
    projection_size: int = 0
    """Width of the common space the layers are projected to (0: the student's hidden size, as
    GKD's default)."""
    pooling: Literal["last", "mean"] = "last"
    """Vector per sample and layer: ``last`` non-padding token (the decoder's counterpart of
    [CLS]) or ``mean`` over non-padding tokens (GKD's ``avg`` option)."""
    intermediate_weight: ScheduleLike = 0.5
    """Weight of the intermediate-layer KL (GKD's gamma = 0.5)."""
    soft_weight: ScheduleLike = 0.5
    """Weight of the soft term on the logits (0.5)."""
    hard_weight: ScheduleLike = 0.0
    """Weight of the student's own loss (GKD's recipe uses none)."""
    temperature: ScheduleLike = 1.0
    """Temperature of the soft term."""
    soft_loss: Literal["ce", "kl"] = "kl"
    """Soft term: T^2 KL (GKD's recipe) or soft cross entropy."""
    seed: int = 0
    """Seed of the projections' initial weights."""


class UniversalKD:
    """Universal-KD (Wu et al. 2021, "Universal-KD: Attention-based Output-Grounded Intermediate
    Layer Knowledge Distillation", EMNLP, sec. 3), as the GKD implementation realizes it: the
    pooled vector of every intermediate layer (all layers but the last) of both models goes
    through its own learned linear (no bias) into a common space, ``u_i^S`` and ``u_j^T``; each
    student layer attends over the teacher layers, ``alpha_ij = softmax_j(u_i^S . u_j^T)``, and
    the loss is ``sum_i KL(softmax(sum_j alpha_ij u_j^T) || softmax(u_i^S))`` (softmax over the
    projected features; mean over samples). The teacher-side projections are trained by this loss
    too. The projections act on hidden states (replicated over tp): plain ``torch.nn.Linear``.
    Needs every layer on one stage: pp=1. Terms: ``intermediate``, ``soft``, ``hard``.
    """

    name: ClassVar[str] = "universal_kd"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.TASK})
    paper: ClassVar[str] = "Wu et al. 2021 (Universal-KD)"
    signals: ClassVar[str] = "projected pooled hidden states of all layers, logits"
    Params: ClassVar[type] = UniversalKDParams
    requires_single_stage: bool = True

    def __init__(self, params: UniversalKDParams | None = None) -> None:
        self.params = params or UniversalKDParams()
        if self.params.projection_size < 0:
            raise ValueError(
                f"universal_kd.projection_size must be >= 0, got {self.params.projection_size}"
            )
        self.projections = Projections(self.name, self.params.seed)
        self._layers: tuple[int, int] | None = None

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        p = self.params
        if teacher.num_layers < 2 or student.num_layers < 2:
            raise ValueError(
                "universal_kd distills the intermediate layers (all but the last), so both models "
                f"need at least 2 layers; got teacher {teacher.num_layers}, student "
                f"{student.num_layers}"
            )
        self._layers = (teacher.num_layers - 1, student.num_layers - 1)
        size = p.projection_size or student.hidden_size
        specs = {f"student_{j}": (student.hidden_size, size, False) for j in range(self._layers[1])}
        specs |= {
            f"teacher_{t}": (teacher.hidden_size, size, False) for t in range(self._layers[0])
        }
        self.projections.declare(specs)
        taps = [s_tap(H, j) for j in range(self._layers[1])]
        taps += [t_tap(H, t) for t in range(self._layers[0])]
        return taps + logit_taps(soft=not is_off(p.soft_weight), hard=not is_off(p.hard_weight))

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.projections.modules()

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        p = self.params
        return {
            "intermediate": at(p.intermediate_weight, ctx),
            "soft": at(p.soft_weight, ctx),
            "hard": at(p.hard_weight, ctx),
        }

    def _project(self, layers, prefix: str, mask, dtype, ctx=None):
        vectors, valid = [], None
        for index, hidden in enumerate(layers):
            vec, valid = pool(acc(hidden, dtype), mask, self.params.pooling, ctx)
            vectors.append(self.projections.apply(f"{prefix}_{index}", vec))
        return torch.stack(vectors, dim=1), valid  # [b, L, size]

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        if self._layers is None:
            raise RuntimeError("universal_kd: call taps(teacher, student) before compute()")
        teacher_layers, student_layers = self._layers
        p = self.params
        terms: dict[str, torch.Tensor] = {}
        students = all_or_nothing(features, [s_tap(H, j) for j in range(student_layers)], self.name)
        teachers = all_or_nothing(features, [t_tap(H, t) for t in range(teacher_layers)], self.name)
        if students is not None and teachers is not None:
            check_hidden(students[0], "student hidden state")
            dtype = acc(students[0]).dtype
            mask = token_mask(ctx, students[0], dtype)
            u_s, valid = self._project(students, "student", mask, dtype, ctx)
            u_t, _ = self._project(teachers, "teacher", mask, dtype, ctx)
            alpha = torch.softmax(torch.matmul(u_s, u_t.transpose(1, 2)), dim=-1)
            target = torch.matmul(alpha, u_t)  # [b, Ls, size]
            log_q = torch.log_softmax(target, dim=-1)
            log_p = torch.log_softmax(u_s, dim=-1)
            per_sample = (log_q.exp() * (log_q - log_p)).sum(-1).sum(-1)
            terms["intermediate"] = sample_mean(per_sample, valid)
        if not is_off(p.soft_weight):
            soft = soft_term(features, ctx, temperature=at(p.temperature, ctx), loss=p.soft_loss)
            if soft is not None:
                terms["soft"] = soft
        if not is_off(p.hard_weight):
            hard = hard_term(features, ctx, self.name)
            if hard is not None:
                terms["hard"] = hard
        return terms
