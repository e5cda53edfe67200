"""MGSKD (Liu et al. 2022): token-, span- and sample-level structural relations."""

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
    check_hidden,
    is_off,
    logit_taps,
    pair,
    pool,
    s_tap,
    soft_term,
    t_tap,
    token_mask,
)
from methods.intermediate.relations import centered_gram, self_relation, vertex_cosines
from methods.logit_common import at
from methods.schedules import ScheduleLike

E, H = FeatureKind.EMBEDDING, FeatureKind.HIDDEN
Tensor = torch.Tensor


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[b, n, d]`` -> ``[b, R, n, d / R]``."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def token_relations(
    student: Tensor, teacher: Tensor, valid: Tensor, heads: int, anchors: int, neighbors: int
) -> Tensor:
    """MGSKD's token-level structural loss on ``n`` units (tokens or spans) per sample:
    pair-wise interactions ``X_a X_a^T / sqrt(d_r)`` per relation head ``a``, compared by MSE
    over valid unit pairs, plus triplet-wise angles compared by smooth L1: the ``anchors`` units
    receiving the most teacher attention (softmax of its pair interactions, summed over heads and
    queries), and for each the ``neighbors`` units it attends to most; the cosine of the angle at
    the anchor between every two of its neighbors (whole vectors, distinct valid units).

    Args:
        student: ``[b, n, d_s]``; teacher: ``[b, n, d_t]`` (widths may differ).
        valid: ``[b, n]`` bool.
    """
    b, n, _ = student.shape
    pair_mask = (valid.unsqueeze(2) & valid.unsqueeze(1)).unsqueeze(1)  # [b, 1, n, n]
    s_pair = self_relation(split_heads(student, heads))
    t_pair = self_relation(split_heads(teacher.detach(), heads))
    squared = (s_pair - t_pair).pow(2) * pair_mask
    pair_loss = squared.sum() / (heads * pair_mask.sum()).clamp_min(1)

    with torch.no_grad():
        keys = pair_mask.expand_as(t_pair)
        rows = keys.any(-1, keepdim=True)
        attention = torch.softmax(t_pair.masked_fill(~(keys | ~rows), float("-inf")), -1)
        attention = attention * keys
        received = attention.sum(dim=(1, 2))  # [b, n]
        local = attention.sum(1) * (
            1 - torch.eye(n, dtype=attention.dtype, device=attention.device)
        )  # [b, n, n]
        anchor = received.topk(min(anchors, n), dim=-1).indices  # [b, k1]
        rows_of_anchor = local.gather(1, anchor.unsqueeze(-1).expand(-1, -1, n))
        near = rows_of_anchor.topk(min(neighbors, n), dim=-1).indices  # [b, k1, k2]
    vertex, j, k = anchor[:, :, None, None], near[:, :, :, None], near[:, :, None, :]
    s_cos = vertex_cosines(centered_gram(student), vertex, j, k)
    t_cos = vertex_cosines(centered_gram(teacher.detach()), vertex, j, k)
    batch = torch.arange(b, device=valid.device)[:, None, None, None]
    distinct = (j != k) & (j != vertex) & (k != vertex)
    triplet_mask = valid[batch, vertex] & valid[batch, j] & valid[batch, k] & distinct
    smooth = F.smooth_l1_loss(s_cos, t_cos, reduction="none") * triplet_mask
    triplet_loss = smooth.sum() / triplet_mask.sum().clamp_min(1)
    return pair_loss + triplet_loss


def sample_relations(student: Tensor, teacher: Tensor, valid: Tensor, heads: int) -> Tensor:
    """MGSKD's sample-level loss: for every relation head, the cosine of the angle at sample
    ``i`` between samples ``j`` and ``k`` of the batch (``<n(x_j - x_i), n(x_k - x_i)>``, all
    ordered triples of valid samples, degenerate ones being 0 for both), compared by smooth L1,
    mean over heads and triples.

    Args:
        student: ``[b, d_s]`` pooled vectors; teacher: ``[b, d_t]``; valid: ``[b]`` bool.
    """
    student, teacher = student[valid], teacher[valid].detach()
    n = student.shape[0]
    if n == 0:
        return student.sum() * 0.0
    s_heads = split_heads(student.unsqueeze(0), heads)[0]  # [R, n, d_r]
    t_heads = split_heads(teacher.unsqueeze(0), heads)[0]
    index = torch.arange(n, device=student.device)
    vertex, j, k = index[:, None, None], index[None, :, None], index[None, None, :]
    s_cos = vertex_cosines(centered_gram(s_heads), vertex[None], j[None], k[None])
    t_cos = vertex_cosines(centered_gram(t_heads), vertex[None], j[None], k[None])
    return F.smooth_l1_loss(s_cos, t_cos)


def random_spans(s: int, rate: float, generator: torch.Generator) -> Tensor:
    """``[n_spans, s]`` 0/1 membership of ``max(1, int(s * rate))`` contiguous spans that cover
    ``0 .. s-1``, with random boundaries (GKD's stand-in for the paper's phrase chunks)."""
    count = max(1, min(s, int(s * rate)))
    cuts = (torch.randperm(s - 1, generator=generator)[: count - 1] + 1).sort().values
    bounds = [0, *cuts.tolist(), s]
    membership = torch.zeros(count, s)
    for index, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        membership[index, lo:hi] = 1.0
    return membership


def span_means(hidden: Tensor, mask: Tensor, membership: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of each span's valid tokens: ``[s, b, d]``, ``[s, b]``, ``[n, s]`` ->
    ``([b, n, d] span vectors, [b, n] bool: the span has a valid token)``."""
    membership = membership.to(device=hidden.device, dtype=hidden.dtype)
    summed = torch.einsum("ns,sbd->bnd", membership, hidden * mask.unsqueeze(-1))
    counts = torch.einsum("ns,sb->bn", membership, mask)
    return summed / counts.clamp_min(1).unsqueeze(-1), counts > 0


@dataclass(kw_only=True, frozen=True)
class MGSKDParams:
    layer_map: list[int] | None = None
    """Teacher layer (0-based) for each student layer; default: the uniform mapping."""
    token_levels: int = 3
    """Representations ``0 .. token_levels - 1`` (0 is the embedding output, ``j + 1`` student
    layer ``j``) get the token- and span-level losses, the higher ones the sample-level loss
    (GKD's recipe: 3)."""
    relation_heads: int = 64
    """Heads the hidden states are split into for the pair-wise and sample relations (64); must
    divide both models' hidden sizes."""
    anchors: int = 20
    """k1: units with the most received teacher attention used as triplet anchors (20)."""
    neighbors: int = 20
    """k2: units each anchor attends to most, forming its triplets (20)."""
    span_rate: float = 0.4
    """Spans per token: the sequence is cut into ``int(s * span_rate)`` random contiguous spans,
    redrawn every step (same on all ranks)."""
    seed: int = 0
    """Seed of the random spans."""
    token_weight: ScheduleLike = 1.0
    """Weight of the token-level term (1)."""
    span_weight: ScheduleLike = 1.0
    """Weight of the span-level term (1)."""
    sample_weight: ScheduleLike = 4.0
    """Weight of the sample-level term (4)."""
    soft_weight: ScheduleLike = 1.0
    """Weight of the soft term (MGSKD distills the predictions in a later phase: a step
    schedule on this weight and the others reproduces it)."""
    temperature: ScheduleLike = 1.0
    """Temperature of the soft term (GKD's recipe uses 1)."""
    soft_loss: Literal["ce", "kl"] = "kl"
    """Soft term: T^2 KL (GKD's recipe) or soft cross entropy."""


class MGSKD:
    """Multi-granularity structural KD (Liu et al. 2022, "Multi-Granularity Structural Knowledge
    Distillation for Language Model Compression", ACL, sec. 3): hidden representations at three
    granularities (tokens; spans, the means of contiguous token groups; samples, mean-pooled)
    are compared through their structure, never directly, so the widths may differ: pair-wise
    interactions (MSE) and triplet-wise geometric angles (smooth L1). The lower representations
    (the embedding output and the first layers, ``token_levels``) get the token and span losses,
    the upper ones the sample loss; weights 1 / 1 / 4; plus a soft term on the logits. Each
    representation pair is local to a pipeline stage. Terms: ``token``, ``span``, ``sample``
    (sums over the representations present), ``soft``.
    """

    name: ClassVar[str] = "mgskd"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.TASK})
    paper: ClassVar[str] = "Liu et al. 2022"
    signals: ClassVar[str] = "token, span and sample relations of hidden states, logits"
    Params: ClassVar[type] = MGSKDParams
    requires_single_stage: bool = False

    def __init__(self, params: MGSKDParams | None = None) -> None:
        self.params = params or MGSKDParams()

    @property
    def relates_positions(self) -> bool:
        """Token and span relations relate the positions of a whole sequence (refused with
        ``data.mode: packed``, whose sequences hold several examples)."""
        return self.params.token_levels > 0
        p = self.params
        for field in ("token_levels", "anchors", "neighbors", "relation_heads"):
            if getattr(p, field) < (0 if field == "token_levels" else 1):
                raise ValueError(f"mgskd.{field} must be positive, got {getattr(p, field)}")
        if not 0.0 < p.span_rate <= 1.0:
            raise ValueError(f"mgskd.span_rate must be in (0, 1], got {p.span_rate}")
        self._mapping: tuple[int, ...] | None = None

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        p = self.params
        for role, info in (("teacher", teacher), ("student", student)):
            if info.hidden_size % p.relation_heads:
                raise ValueError(
                    f"mgskd.relation_heads={p.relation_heads} must divide the {role}'s "
                    f"hidden_size {info.hidden_size}; choose a common divisor of both models' "
                    f"widths ({teacher.hidden_size} and {student.hidden_size})"
                )
        self._mapping = layer_mapping.resolve(
            p.layer_map, teacher.num_layers, student.num_layers, where="mgskd.layer_map"
        )
        taps = [s_tap(E), t_tap(E)]
        for j, t in enumerate(self._mapping):
            taps += [s_tap(H, j), t_tap(H, t)]
        return taps + logit_taps(soft=not is_off(p.soft_weight), hard=False)

    def layer_pairs(self, teacher: ModelInfo, student: ModelInfo) -> list[tuple[int, int]]:
        mapping = layer_mapping.resolve(
            self.params.layer_map, teacher.num_layers, student.num_layers, where="mgskd.layer_map"
        )
        return list(enumerate(mapping))

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        p = self.params
        return {
            "token": at(p.token_weight, ctx),
            "span": at(p.span_weight, ctx),
            "sample": at(p.sample_weight, ctx),
            "soft": at(p.soft_weight, ctx),
        }

    def representations(self, features: Mapping[Tap, Tensor]):
        """``(index, student, teacher)`` for the representations on this stage."""
        assert self._mapping is not None
        found = pair(features, s_tap(E), t_tap(E), self.name)
        if found is not None:
            yield 0, *found
        for j, t in enumerate(self._mapping):
            found = pair(features, s_tap(H, j), t_tap(H, t), self.name)
            if found is not None:
                yield j + 1, *found

    def compute(self, features: Mapping[Tap, Tensor], ctx: LossContext) -> dict[str, torch.Tensor]:
        if self._mapping is None:
            raise RuntimeError("mgskd: call taps(teacher, student) before compute()")
        p = self.params
        token, span, sample = [], [], []
        spans = None
        for index, student, teacher in self.representations(features):
            check_hidden(student, "student hidden state")
            student = acc(student)
            teacher = acc(teacher, student.dtype)
            mask = token_mask(ctx, student, student.dtype)
            if index < p.token_levels:
                valid = (mask > 0).t()
                token.append(token_relations(
                    student.transpose(0, 1), teacher.transpose(0, 1), valid,
                    p.relation_heads, p.anchors, p.neighbors,
                ))  # fmt: skip
                if spans is None:
                    generator = layer_mapping.step_generator(ctx.step, seed=p.seed)
                    spans = random_spans(student.shape[0], p.span_rate, generator)
                s_span, span_valid = span_means(student, mask, spans)
                t_span, _ = span_means(teacher, mask, spans)
                span.append(token_relations(
                    s_span, t_span, span_valid, p.relation_heads, p.anchors, p.neighbors
                ))  # fmt: skip
            else:
                s_vec, valid = pool(student, mask, "mean", ctx)
                t_vec, _ = pool(teacher, mask, "mean", ctx)
                sample.append(sample_relations(s_vec, t_vec, valid, p.relation_heads))
        terms = {}
        for name, values in (("token", token), ("span", span), ("sample", sample)):
            if values:
                terms[name] = torch.stack(values).sum()
        if not is_off(p.soft_weight):
            soft = soft_term(features, ctx, temperature=at(p.temperature, ctx), loss=p.soft_loss)
            if soft is not None:
                terms["soft"] = soft
        return terms
