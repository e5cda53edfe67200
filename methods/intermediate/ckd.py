"""CKD (Park et al. 2021): word-relation and layer-transforming-relation distillation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from methods import layer_mapping
from methods.base import FeatureKind, LossContext, ModelInfo, Stage, Tap
from methods.intermediate.common import (
    acc,
    all_or_nothing,
    check_hidden,
    hard_term,
    is_off,
    logit_taps,
    s_tap,
    soft_term,
    t_tap,
    token_mask,
)
from methods.intermediate.relations import centered_gram, softmax_relation_kl, vertex_cosines
from methods.logit_common import at
from methods.schedules import ScheduleLike

E, H = FeatureKind.EMBEDDING, FeatureKind.HIDDEN
Tensor = torch.Tensor


def cosine_matrix(x: Tensor) -> Tensor:
    """``[..., n, d]`` -> ``[..., n, n]`` cosine similarities."""
    unit = F.normalize(x, dim=-1)
    return torch.matmul(unit, unit.transpose(-1, -2))


def word_relation_distance(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    """WR distance: per layer and sample, each token's row of cosine similarities to the other
    valid tokens, softmax-normalized, ``KL(teacher || student)``; summed over rows and divided
    by the number of valid ``(i, j)`` token pairs (the authors' normalization).

    Args:
        student: ``[b, L, s, d_s]``; teacher: ``[b, L, s, d_t]``; valid: ``[b, s]`` bool.
    """
    s = valid.shape[1]
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    allowed = (valid.unsqueeze(2) & valid.unsqueeze(1) & ~eye).unsqueeze(1)  # [b, 1, s, s]
    total = softmax_relation_kl(cosine_matrix(student), cosine_matrix(teacher), allowed)
    pairs = (valid.sum(1).to(student.dtype) ** 2).sum() * student.shape[1]
    return total / pairs.clamp_min(1)


def word_relation_angle(student: Tensor, teacher: Tensor, valid: Tensor, window: int) -> Tensor:
    """WR angle: per layer and valid token ``i``, the cosine of the angle at ``x_i`` between
    every two tokens ``a, b`` of the window ``|a - i|, |b - i| <= window // 2`` (inside the
    sequence and valid; ``a = i`` gives 0 for both models), compared by squared error, mean
    over the compared entries. Computed from Gram matrices: ``O(s^2 + s w^2)`` memory per layer.

    Args as :func:`word_relation_distance`.
    """
    b, layers, s, _ = student.shape
    radius = window // 2
    offsets = torch.arange(-radius, radius + 1, device=valid.device)
    positions = torch.arange(s, device=valid.device).unsqueeze(1) + offsets  # [s, w]
    inside = (positions >= 0) & (positions < s)
    index = positions.clamp(0, s - 1)
    vertex = torch.arange(s, device=valid.device)[:, None, None]
    a, c = index[:, :, None], index[:, None, :]
    near = valid[:, index] & inside  # [b, s, w]
    mask = valid[:, :, None, None] & near[:, :, :, None] & near[:, :, None, :]  # [b, s, w, w]
    mask = mask.unsqueeze(1).expand(b, layers, s, window, window).reshape(b * layers, s, -1)

    def cosines(x: Tensor) -> Tensor:
        g = centered_gram(x.reshape(b * layers, s, -1))
        return vertex_cosines(g, vertex[None], a[None], c[None]).reshape(b * layers, s, -1)

    squared = (cosines(student) - cosines(teacher.detach())).pow(2) * mask
    return squared.sum() / mask.sum().clamp_min(1)


def layer_relation_distance(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    """LTR distance: per valid token, the cosine similarities between its representations at
    the ``L`` layers, off-diagonal, softmax-normalized per layer, ``KL(teacher || student)``;
    summed and divided by ``valid tokens x L x L`` (the authors' normalization). Args as
    :func:`word_relation_distance`."""
    layers = student.shape[1]
    s_rel = cosine_matrix(student.permute(0, 2, 1, 3))  # [b, s, L, L]
    t_rel = cosine_matrix(teacher.permute(0, 2, 1, 3))
    eye = torch.eye(layers, dtype=torch.bool, device=valid.device)
    allowed = valid[:, :, None, None] & ~eye
    total = softmax_relation_kl(s_rel, t_rel, allowed)
    return total / (valid.sum() * layers * layers).clamp_min(1)


def layer_relation_angle(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    """LTR angle: per valid token, the cosine of the angle at its layer-``i`` representation
    between those of layers ``j`` and ``k``, all ``L^3`` ordered triples (degenerate ones are 0
    for both), squared error, mean over the valid tokens' triples. Args as
    :func:`word_relation_distance`."""
    b, layers, s, _ = student.shape
    index = torch.arange(layers, device=valid.device)
    vertex, j, k = index[:, None, None], index[None, :, None], index[None, None, :]

    def cosines(x: Tensor) -> Tensor:
        g = centered_gram(x.permute(0, 2, 1, 3).reshape(b * s, layers, -1))
        return vertex_cosines(g, vertex[None], j[None], k[None]).reshape(b, s, -1)

    squared = (cosines(student) - cosines(teacher.detach())).pow(2).sum(-1)
    return (squared * valid).sum() / (valid.sum() * layers**3).clamp_min(1)


@dataclass(kw_only=True, frozen=True)
class CKDParams:
    layer_map: list[int] | None = None
    """Teacher layer (0-based) for each student layer; default: the uniform mapping."""
    window: int = 21
    """Tokens of the word-relation angle window, centered on each token (odd; 21)."""
    wr_distance_weight: ScheduleLike = 1.0
    """Weight of the word-relation distance term (1)."""
    ltr_distance_weight: ScheduleLike = 1.0
    """Weight of the layer-transforming-relation distance term (1)."""
    wr_angle_weight: ScheduleLike = 10.0
    """Weight of the word-relation angle term (10)."""
    ltr_angle_weight: ScheduleLike = 10.0
    """Weight of the layer-transforming-relation angle term (10)."""
    soft_weight: ScheduleLike = 0.9
    """Weight of the soft term (0.9)."""
    hard_weight: ScheduleLike = 0.1
    """Weight of the student's own loss (0.1)."""
    temperature: ScheduleLike = 3.0
    """Temperature of the soft term (3)."""
    soft_loss: Literal["ce", "kl"] = "ce"
    """Soft term: soft cross entropy (GKD's recipe) or T^2 KL."""


class CKD:
    """Contextual knowledge distillation (Park et al. 2021, "Distilling Linguistic Context for
    Language Model Compression", EMNLP, sec. 3, eq. 2-7): structural relations of the hidden
    representations (embedding output and the mapped layers), within each model, so the widths
    may differ: word relations (between tokens of one layer: cosine distances -> KL, and angles
    in a local window -> squared error) and layer-transforming relations (between the layers of
    one token: the same two), weights 1 / 1 / 10 / 10; plus soft (0.9, T = 3) and hard (0.1)
    terms. The layer relations combine all layers: pp=1. Terms: ``wr_distance``, ``wr_angle``,
    ``ltr_distance``, ``ltr_angle``, ``soft``, ``hard``.
    """

    name: ClassVar[str] = "ckd"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.TASK})
    paper: ClassVar[str] = "Park et al. 2021"
    signals: ClassVar[str] = "word and layer-transforming relations of hidden states, logits"
    Params: ClassVar[type] = CKDParams
    requires_single_stage: bool = True
    relates_positions: ClassVar[bool] = True
    """Word relations relate the positions of a whole sequence (refused with ``data.mode:
    packed``, whose sequences hold several examples)."""

    def __init__(self, params: CKDParams | None = None) -> None:
        self.params = params or CKDParams()
        if self.params.window < 1 or self.params.window % 2 == 0:
            raise ValueError(f"ckd.window must be a positive odd number, got {self.params.window}")
        self._mapping: tuple[int, ...] | None = None

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        p = self.params
        self._mapping = layer_mapping.resolve(
            p.layer_map, teacher.num_layers, student.num_layers, where="ckd.layer_map"
        )
        taps = self._student_taps() + self._teacher_taps()
        return taps + logit_taps(soft=not is_off(p.soft_weight), hard=not is_off(p.hard_weight))

    def _student_taps(self) -> list[Tap]:
        assert self._mapping is not None
        return [s_tap(E)] + [s_tap(H, j) for j in range(len(self._mapping))]

    def _teacher_taps(self) -> list[Tap]:
        assert self._mapping is not None
        return [t_tap(E)] + [t_tap(H, t) for t in self._mapping]

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        p = self.params
        return {
            "wr_distance": at(p.wr_distance_weight, ctx),
            "wr_angle": at(p.wr_angle_weight, ctx),
            "ltr_distance": at(p.ltr_distance_weight, ctx),
            "ltr_angle": at(p.ltr_angle_weight, ctx),
            "soft": at(p.soft_weight, ctx),
            "hard": at(p.hard_weight, ctx),
        }

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        if self._mapping is None:
            raise RuntimeError("ckd: call taps(teacher, student) before compute()")
        p = self.params
        terms: dict[str, torch.Tensor] = {}
        students = all_or_nothing(features, self._student_taps(), self.name)
        teachers = all_or_nothing(features, self._teacher_taps(), self.name)
        if students is not None and teachers is not None:
            check_hidden(students[0], "student embedding output")
            dtype = acc(students[0]).dtype
            valid = (token_mask(ctx, students[0], dtype) > 0).t()  # [b, s]
            # [L, s, b, d] -> [b, L, s, d]
            student = torch.stack([acc(x, dtype) for x in students]).permute(2, 0, 1, 3)
            teacher = torch.stack([acc(x, dtype) for x in teachers]).permute(2, 0, 1, 3)
            terms["wr_distance"] = word_relation_distance(student, teacher, valid)
            terms["wr_angle"] = word_relation_angle(student, teacher, valid, p.window)
            terms["ltr_distance"] = layer_relation_distance(student, teacher, valid)
            terms["ltr_angle"] = layer_relation_angle(student, teacher, valid)
        if not is_off(p.soft_weight):
            soft = soft_term(features, ctx, temperature=at(p.temperature, ctx), loss=p.soft_loss)
            if soft is not None:
                terms["soft"] = soft
        if not is_off(p.hard_weight):
            hard = hard_term(features, ctx, self.name)
            if hard is not None:
                terms["hard"] = hard
        return terms
