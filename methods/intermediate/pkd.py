"""Patient KD (Sun et al. 2019): normalized pooled hidden states of every k-th teacher layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from methods import layer_mapping
from methods.base import FeatureKind, LossContext, ModelInfo, Stage, Tap
from methods.intermediate.common import (
    Projections,
    acc,
    check_hidden,
    hard_term,
    is_off,
    logit_taps,
    pair,
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


def pkd_mapping(
    strategy: str, layer_map: Sequence[int] | None, teacher: ModelInfo, student: ModelInfo
) -> tuple[int, ...]:
    """Teacher layer of student layers ``0 .. L_s - 2`` (the last student layer is left to the
    prediction loss): PKD-Skip takes every k-th teacher layer (the uniform mapping), PKD-Last the
    teacher's last ``L_s - 1`` layers before its final one."""
    count = student.num_layers - 1
    if layer_map is not None:
        return layer_mapping.explicit(
            layer_map, teacher.num_layers, student.num_layers, length=count, where="pkd.layer_map"
        )
    if strategy == "last":
        first = teacher.num_layers - student.num_layers
        if first < 0:
            raise ValueError(
                f"pkd.strategy=last needs a teacher at least as deep as the student, got "
                f"{teacher.num_layers} and {student.num_layers} layers; use strategy: skip"
            )
        return tuple(first + j for j in range(count))
    return layer_mapping.uniform(teacher.num_layers, student.num_layers)[:count]


@dataclass(kw_only=True, frozen=True)
class PKDParams:
    strategy: Literal["skip", "last"] = "skip"
    """PKD-Skip (every k-th teacher layer, the uniform mapping) or PKD-Last (the teacher's last
    layers); student layers 0 .. L_s-2 are distilled, the last is left to the prediction loss."""
    layer_map: list[int] | None = None
    """Explicit teacher layer (0-based) for each of the student layers 0 .. L_s-2; overrides
    ``strategy``."""
    pooling: Literal["last", "mean"] = "last"
    """Vector per sample and layer: ``last`` non-padding token (the causal decoder's
    counterpart of PKD's [CLS]) or ``mean`` over non-padding tokens."""
    alpha: ScheduleLike = 0.5
    """Prediction loss ``(1 - alpha) hard + alpha soft`` (GKD uses 0.5)."""
    beta: ScheduleLike = 100.0
    """Weight of the patience (normalized hidden-state) loss (GKD uses 100)."""
    temperature: ScheduleLike = 10.0
    """Temperature of the soft term (GKD uses 10)."""
    soft_loss: Literal["ce", "kl"] = "kl"
    """Soft term: T^2 KL, as GKD's PKD recipe, or the paper's soft cross entropy (eq. 2)."""
    seed: int = 0
    """Seed of the width projection's initial weights (only when the widths differ)."""


class PKD:
    """Patient knowledge distillation (Sun et al. 2019, "Patient Knowledge Distillation for BERT
    Model Compression", EMNLP, eq. 3-4): ``L = (1 - alpha) L_hard + alpha L_soft + beta L_PT`` with
    ``L_PT = sum_j mean_i || h_ij^s / ||h_ij^s|| - h_{i,I(j)}^t / ||h_{i,I(j)}^t|| ||^2``
    over the student layers ``j`` but the last and the samples ``i`` (the squared distance is
    averaged over the hidden dimension, as the public implementation's ``mse_loss``). The
    per-sample vector is the pooled hidden state (see ``pooling``); a student narrower than the
    teacher goes through a learned linear to the teacher's width (replicated over tp). Terms:
    ``patience`` (summed over the layers on a pipeline stage), ``soft``, ``hard``.
    """

    name: ClassVar[str] = "pkd"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.TASK})
    paper: ClassVar[str] = "Sun et al. 2019"
    signals: ClassVar[str] = "pooled hidden states of every k-th teacher layer, logits, labels"
    Params: ClassVar[type] = PKDParams
    requires_single_stage: bool = False

    def __init__(self, params: PKDParams | None = None) -> None:
        self.params = params or PKDParams()
        self.projections = Projections(self.name, self.params.seed)
        self._mapping: tuple[int, ...] | None = None

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        p = self.params
        self._mapping = pkd_mapping(p.strategy, p.layer_map, teacher, student)
        width_projection(self.projections, teacher, student)
        taps = [s_tap(H, j) for j in range(len(self._mapping))]
        taps += [t_tap(H, t) for t in self._mapping]
        return taps + logit_taps(soft=not is_off(p.alpha), hard=self._with_hard())

    def _with_hard(self) -> bool:
        alpha = self.params.alpha
        return not (isinstance(alpha, int | float) and alpha == 1)

    def layer_pairs(self, teacher: ModelInfo, student: ModelInfo) -> list[tuple[int, int]]:
        p = self.params
        return list(enumerate(pkd_mapping(p.strategy, p.layer_map, teacher, student)))

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.projections.modules()

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        alpha = at(self.params.alpha, ctx)
        return {"soft": alpha, "hard": 1.0 - alpha, "patience": at(self.params.beta, ctx)}

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        if self._mapping is None:
            raise RuntimeError("pkd: call taps(teacher, student) before compute()")
        terms = {}
        distances = []
        for j, t in enumerate(self._mapping):
            found = pair(features, s_tap(H, j), t_tap(H, t), self.name)
            if found is None:
                continue
            student, teacher = found
            check_hidden(student, "student hidden state")
            student = acc(student)
            mask = token_mask(ctx, student, student.dtype)
            s_vec, valid = pool(student, mask, self.params.pooling, ctx)
            t_vec, _ = pool(acc(teacher, student.dtype), mask, self.params.pooling, ctx)
            s_vec = F.normalize(to_teacher_width(self.projections, s_vec), dim=-1)
            t_vec = F.normalize(t_vec, dim=-1)
            per_sample = (s_vec - t_vec).pow(2).mean(-1)
            distances.append(sample_mean(per_sample, valid))
        if distances:
            terms["patience"] = torch.stack(distances).sum()
        if not is_off(self.params.alpha):
            soft = soft_term(
                features, ctx, temperature=at(self.params.temperature, ctx),
                loss=self.params.soft_loss,
            )  # fmt: skip
            if soft is not None:
                terms["soft"] = soft
        hard = hard_term(features, ctx, self.name) if self._with_hard() else None
        if hard is not None:
            terms["hard"] = hard
        return terms
