"""RAIL-KD (Haidar et al. 2022): randomly drawn teacher layers, concatenated and projected."""

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
THIRD = 1.0 / 3.0


@dataclass(kw_only=True, frozen=True)
class RailKDParams:
    projection_size: int = 128
    """Width both concatenations are projected to before normalizing (RAIL-KD's u = 128)."""
    redraw_every: int = 1
    """Steps between redraws of the teacher layers (RAIL-KD redraws each epoch: set this to the
    number of steps per epoch)."""
    seed: int = 0
    """Seed of the layer draws and of the projections' initial weights."""
    pooling: Literal["last", "mean"] = "mean"
    """Vector per sample and layer: ``mean`` over non-padding tokens (RAIL-KD mean-pools) or the
    ``last`` non-padding token."""
    intermediate_weight: ScheduleLike = THIRD
    """Weight of the intermediate-layer term (1/3)."""
    soft_weight: ScheduleLike = THIRD
    """Weight of the soft term (1/3)."""
    hard_weight: ScheduleLike = THIRD
    """Weight of the student's own loss (1/3)."""
    temperature: ScheduleLike = 10.0
    """Temperature of the soft term (GKD's recipe uses 10)."""
    soft_loss: Literal["ce", "kl"] = "ce"
    """Soft term: soft cross entropy (GKD's recipe) or T^2 KL."""


class RailKD:
    """RAndom Intermediate Layer KD (Haidar et al. 2022, "RAIL-KD: RAndom Intermediate Layer
    Mapping for Knowledge Distillation", Findings of NAACL, sec. 3, concatenated variant): every
    ``redraw_every`` steps, ``m = L_s - 1`` distinct teacher layers are drawn among its
    ``L_t - 1`` intermediate ones and sorted; the mean-pooled hidden states of those and of the
    student's ``m`` intermediate layers are concatenated per sample, each side goes through its
    own learned linear to ``projection_size``, is L2-normalized, and the loss is the squared
    distance ``||u_s - u_t||^2`` averaged over samples. The draw is seeded by the step, so all
    ranks agree. Both projections are trained (plain ``torch.nn.Linear`` on hidden states, which
    are replicated over tp). Needs all layers on one stage: pp=1. Terms: ``intermediate``,
    ``soft``, ``hard``.
    """

    name: ClassVar[str] = "rail_kd"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.TASK})
    paper: ClassVar[str] = "Haidar et al. 2022"
    signals: ClassVar[str] = "mean-pooled hidden states of random teacher layers, logits, labels"
    Params: ClassVar[type] = RailKDParams
    requires_single_stage: bool = True

    def __init__(self, params: RailKDParams | None = None) -> None:
        self.params = params or RailKDParams()
        if self.params.redraw_every < 1:
            raise ValueError(
                f"rail_kd.redraw_every must be >= 1 step, got {self.params.redraw_every}"
            )
        if self.params.projection_size < 1:
            raise ValueError(
                f"rail_kd.projection_size must be >= 1, got {self.params.projection_size}"
            )
        self.projections = Projections(self.name, self.params.seed)
        self._layers: tuple[int, int] | None = None

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        p = self.params
        count = student.num_layers - 1
        if count < 1 or teacher.num_layers - 1 < count:
            raise ValueError(
                f"rail_kd matches the student's {count} intermediate layers with as many "
                f"distinct teacher intermediate layers; it needs a student with >= 2 layers and "
                f"a deeper teacher, got student {student.num_layers}, teacher "
                f"{teacher.num_layers} layers"
            )
        self._layers = (teacher.num_layers - 1, count)
        self.projections.declare({
            "student": (count * student.hidden_size, p.projection_size, True),
            "teacher": (count * teacher.hidden_size, p.projection_size, True),
        })  # fmt: skip
        taps = [s_tap(H, j) for j in range(count)]
        taps += [t_tap(H, t) for t in range(teacher.num_layers - 1)]
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

    def teacher_layers_at(self, step: int) -> tuple[int, ...]:
        """The teacher layers matched with the student's intermediate layers at ``step``."""
        if self._layers is None:
            raise RuntimeError("rail_kd: call taps(teacher, student) before compute()")
        candidates, count = self._layers
        return layer_mapping.random_sorted(
            candidates, count, step=step, seed=self.params.seed,
            redraw_every=self.params.redraw_every,
        )  # fmt: skip

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        chosen = self.teacher_layers_at(ctx.step)
        p = self.params
        terms: dict[str, torch.Tensor] = {}
        students = all_or_nothing(features, [s_tap(H, j) for j in range(len(chosen))], self.name)
        teachers = all_or_nothing(features, [t_tap(H, t) for t in chosen], self.name)
        if students is not None and teachers is not None:
            check_hidden(students[0], "student hidden state")
            dtype = acc(students[0]).dtype
            mask = token_mask(ctx, students[0], dtype)
            s_cat = torch.cat([pool(acc(x, dtype), mask, p.pooling, ctx)[0] for x in students], -1)
            t_cat = torch.cat([pool(acc(x, dtype), mask, p.pooling, ctx)[0] for x in teachers], -1)
            _, valid = pool(students[0], mask, p.pooling, ctx)
            u_s = F.normalize(self.projections.apply("student", s_cat), dim=-1)
            u_t = F.normalize(self.projections.apply("teacher", t_cat), dim=-1)
            terms["intermediate"] = sample_mean((u_s - u_t).pow(2).sum(-1), valid)
        if not is_off(p.soft_weight):
            soft = soft_term(features, ctx, temperature=at(p.temperature, ctx), loss=p.soft_loss)
            if soft is not None:
                terms["soft"] = soft
        if not is_off(p.hard_weight):
            hard = hard_term(features, ctx, self.name)
            if hard is not None:
                terms["hard"] = hard
        return terms
