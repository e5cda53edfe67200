"""SID (Aguilar et al. 2020): internal representations distilled layer by layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from methods import layer_mapping
from methods.base import FeatureKind, LossContext, ModelInfo, Stage, Tap
from methods.intermediate.common import (
    Projections,
    acc,
    check_equal_heads,
    check_hidden,
    cosine_distance,
    hard_term,
    is_off,
    logit_taps,
    pair,
    pool,
    progressive_phase,
    s_tap,
    scores_mask,
    soft_term,
    t_tap,
    to_teacher_width,
    token_mask,
    width_projection,
)
from methods.intermediate.relations import causal_kl
from methods.logit_common import at
from methods.schedules import ScheduleLike

H, A = FeatureKind.HIDDEN, FeatureKind.ATTENTION_SCORES


@dataclass(kw_only=True, frozen=True)
class SIDParams:
    layer_map: list[int] | None = None
    """Teacher layer (0-based) for each student layer; default: the uniform mapping."""
    pooling: Literal["last", "mean"] = "last"
    """Vector per sample for the cosine term: ``last`` non-padding token (the decoder's
    counterpart of SID's [CLS]) or ``mean`` over non-padding tokens."""
    soft_weight: ScheduleLike = 1.0
    """Weight of the soft term of the final phase."""
    hard_weight: ScheduleLike = 0.0
    """Weight of the student's own loss in the final phase (GKD's recipe uses none)."""
    temperature: ScheduleLike = 1.0
    """Temperature of the soft term (GKD's recipe uses 1)."""
    soft_loss: Literal["ce", "kl"] = "ce"
    """Soft term: soft cross entropy (GKD's recipe) or T^2 KL."""
    seed: int = 0
    """Seed of the width projection's initial weights (only when the widths differ)."""


class SID:
    """Knowledge distillation from internal representations (Aguilar et al. 2020, "Knowledge
    Distillation from Internal Representations", AAAI, sec. 3): for student layer ``j`` and its
    teacher layer, ``KL(A^T || A^S)`` between the attention distributions (per head, causal, mean
    over heads and tokens) plus ``1 - cos(h^S, h^T)`` between pooled hidden states; layers are
    distilled progressively: training is split into ``L + 1`` equal parts, part ``p <= L`` trains
    student layers ``0 .. p-1``, the last part only the prediction layer (soft term, optional hard
    term), as GKD's step-based schedule (``ctx.step / ctx.total_steps``; the paper's
    loss-threshold variant is not offered). Terms: ``attention``, ``cosine`` (sums over the active
    layers on a pipeline stage), ``soft``, ``hard``.
    """

    name: ClassVar[str] = "sid"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.TASK})
    paper: ClassVar[str] = "Aguilar et al. 2020"
    signals: ClassVar[str] = "attention distributions, pooled hidden states (progressive), logits"
    Params: ClassVar[type] = SIDParams
    requires_single_stage: bool = False

    def __init__(self, params: SIDParams | None = None) -> None:
        self.params = params or SIDParams()
        self.projections = Projections(self.name, self.params.seed)
        self._mapping: tuple[int, ...] | None = None

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        check_equal_heads(teacher, student, self.name, "attention distributions")
        p = self.params
        self._mapping = layer_mapping.resolve(
            p.layer_map, teacher.num_layers, student.num_layers, where="sid.layer_map"
        )
        width_projection(self.projections, teacher, student)
        taps = []
        for j, t in enumerate(self._mapping):
            taps += [s_tap(A, j), t_tap(A, t), s_tap(H, j), t_tap(H, t)]
        return taps + logit_taps(soft=not is_off(p.soft_weight), hard=not is_off(p.hard_weight))

    def layer_pairs(self, teacher: ModelInfo, student: ModelInfo) -> list[tuple[int, int]]:
        mapping = layer_mapping.resolve(
            self.params.layer_map, teacher.num_layers, student.num_layers, where="sid.layer_map"
        )
        return list(enumerate(mapping))

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.projections.modules()

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return {"soft": at(self.params.soft_weight, ctx), "hard": at(self.params.hard_weight, ctx)}

    def phase(self, ctx: LossContext) -> int:
        """``1 .. L + 1``: layers ``0 .. phase - 1`` are distilled; ``L + 1``: the predictions."""
        assert self._mapping is not None
        return progressive_phase(ctx.step, ctx.total_steps, len(self._mapping))

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        if self._mapping is None:
            raise RuntimeError("sid: call taps(teacher, student) before compute()")
        phase = self.phase(ctx)
        terms: dict[str, torch.Tensor] = {}
        if phase > len(self._mapping):
            p = self.params
            if not is_off(p.soft_weight):
                soft = soft_term(
                    features, ctx, temperature=at(p.temperature, ctx), loss=p.soft_loss
                )
                if soft is not None:
                    terms["soft"] = soft
            if not is_off(p.hard_weight):
                hard = hard_term(features, ctx, self.name)
                if hard is not None:
                    terms["hard"] = hard
            return terms
        attention, cosine = [], []
        for j in range(phase):
            t = self._mapping[j]
            scores = pair(features, s_tap(A, j), t_tap(A, t), self.name)
            if scores is not None:
                student = acc(scores[0])
                mask = scores_mask(ctx, student, student.dtype)
                teacher = acc(scores[1], student.dtype)
                attention.append(causal_kl(student, teacher, mask, ctx.tp_group))
            hidden = pair(features, s_tap(H, j), t_tap(H, t), self.name)
            if hidden is not None:
                check_hidden(hidden[0], "student hidden state")
                student = acc(hidden[0])
                mask = token_mask(ctx, student, student.dtype)
                s_vec, valid = pool(student, mask, self.params.pooling, ctx)
                t_vec, _ = pool(acc(hidden[1], student.dtype), mask, self.params.pooling, ctx)
                s_vec = to_teacher_width(self.projections, s_vec)
                cosine.append(cosine_distance(s_vec, t_vec, valid))
        if attention:
            terms["attention"] = torch.stack(attention).sum()
        if cosine:
            terms["cosine"] = torch.stack(cosine).sum()
        return terms
