"""Multi-teacher combiners: several frozen teachers in one run (config ``teachers:``), each
combined with any single-teacher method, as GKD does.

A combiner applies a single-teacher method (``method: {name: kd, ...}``; default: the soft loss of
the combiner's paper) to every teacher ``k`` separately (its taps re-indexed to
``Tap.teacher_index = k``, its features handed over as if teacher ``k`` were the only one) and
combines the results by its rule:

========= ============================================================================== ========
name      rule                                                                           paper
========= ============================================================================== ========
tmkd      average of the teachers' terms                                                 Yang et al. 2020
mt_bert   each teacher's terms weighted per token by ``1 / (1 + CE_k)`` (teacher ``k``'s Wu et al. 2021
          cross entropy on the label), summed; plus an MSE between the student's final
          hidden states through a per-teacher projection and each teacher's
uncertainty teachers ordered by size; the student's normalized prediction entropy ``u``   Li et al. 2021
          picks (``route``) or interpolates (``weight``) the teacher per token: ``u = 0``
          the smallest, ``u = 1`` the largest
rl_kd     a policy network per teacher samples which teachers teach each sequence;       Yuan et al. 2021
          REINFORCE with reward = -the student's loss; all teachers (the average) during
          a warm start
dgkd      each teacher kept with probability ``survival`` (0.75) per step, the kept     Son et al. 2021
          teachers' terms summed
========= ============================================================================== ========

Every combiner adds the student's own cross entropy (``hard``, weight ``hard_weight``) once. Terms:
each of the inner method's terms, combined (``soft``, ``kl``, ...); the same per teacher, logged
only (``t0.soft``, ``t1.soft``: weight 0, no gradient); and the combiner's own (``hard``,
``hidden``, ``policy``).

**Per-token weights.** Where a rule weights tokens (mt_bert, uncertainty, rl_kd), teacher ``k``'s
term is the inner method's term computed with its token masks multiplied by ``w_k``, times the mean
of ``w_k`` over the distilled positions: for the usual masked-mean losses this is
``sum_n w_k,n m_n l_k,n / sum_n m_n``, exactly the weighted per-token loss.

TAKD (Mirzadeh et al. 2020, teacher -> assistant -> student) needs no combiner: it is a chain of
single-teacher runs, each run's student checkpoint the next run's ``teacher.checkpoint`` (README).

All randomness (dgkd's drops, rl_kd's actions) is drawn from generators seeded by the step (and the
microbatch), so every rank of a step draws the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from methods.base import (
    FeatureKind,
    ForwardModifier,
    HasModules,
    LossContext,
    ModelInfo,
    Role,
    Stage,
    StageAware,
    Tap,
    TeacherAware,
    WeightsTerms,
)
from methods.logit_common import (
    BOTH_LOGITS,
    STUDENT_LOGITS,
    at,
    hard_term,
    require_labels,
    soft_term,
)
from methods.schedules import ScheduleLike

BOTH_STAGES = frozenset({Stage.PRETRAIN, Stage.TASK})
LOG_ONLY = 0.0
"""Weight of the per-teacher terms: logged, not trained on."""


# ----------------------------------------------------------------------------------------------
# Vocab-parallel per-token statistics (no gradient): statistics-only all-reduces over tp.


@dataclass
class TokenStats:
    """Per-token statistics of vocab-sharded logits, ``[N]`` each."""

    log_normalizer: torch.Tensor
    """``log sum_i exp(x_i / T)`` over the real vocabulary."""
    entropy: torch.Tensor
    """``H(softmax(x / T))`` in nats."""
    max_prob: torch.Tensor
    """Largest probability."""
    cross_entropy: torch.Tensor | None
    """``-log p(label)`` at T = 1 (``None`` without labels)."""


@torch.no_grad()
def token_stats(
    logits: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
    labels: torch.Tensor | None = None,
) -> TokenStats:
    """Statistics of ``logits`` (``[N, V/tp]``, vocab-sharded over ``tp_group``; columns at or
    beyond ``vocab_size`` are padding). Traffic: one MAX and one SUM all-reduce of 1 and 3 numbers
    per token."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    width = max(0, min(logits.shape[1], vocab_size - vocab_start))
    x = logits[:, :width].to(acc)
    if width:
        row_max = x.max(dim=1).values
    else:
        row_max = torch.full((x.shape[0],), -math.inf, dtype=acc, device=x.device)
    if tp_group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = torch.exp(x - row_max[:, None])
    sums = torch.zeros(3, x.shape[0], dtype=acc, device=x.device)
    sums[0] = shifted.sum(dim=1)
    sums[1] = (shifted * x).sum(dim=1)
    if labels is not None:
        local = labels - vocab_start
        inside = (local >= 0) & (local < width)
        picked = (
            x.gather(1, local.clamp(0, max(width - 1, 0)).view(-1, 1)).squeeze(1)
            if width
            else sums[2]
        )
        sums[2] = torch.where(inside, picked, torch.zeros_like(picked))
    if tp_group is not None:
        dist.all_reduce(sums, group=tp_group)
    log_normalizer = row_max + torch.log(sums[0])
    entropy = log_normalizer - sums[1] / sums[0]
    return TokenStats(
        log_normalizer=log_normalizer,
        entropy=entropy,
        max_prob=torch.exp(row_max - log_normalizer),
        cross_entropy=None if labels is None else log_normalizer - sums[2],
    )


def _stats_of(logits: torch.Tensor, ctx: LossContext, labels: bool = True) -> TokenStats:
    return token_stats(
        logits, vocab_start=ctx.vocab_start, vocab_size=ctx.vocab_size, tp_group=ctx.tp_group,
        labels=require_labels(ctx, "multi-teacher") if labels else None,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The paper's own soft losses (used when no inner method is configured)


class _SoftLoss:
    """A combiner's default single-teacher term (not registered): ``mse`` (raw-logit MSE),
    ``ce`` (soft cross entropy at T) or ``kl`` (``T^2 KL(p_t^T || p_s^T)``)."""

    name = "soft"
    stages = BOTH_STAGES

    def __init__(self, kind: Literal["mse", "ce", "kl"], temperature: ScheduleLike) -> None:
        self.kind, self.temperature = kind, temperature

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        return BOTH_LOGITS

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        temperature = at(self.temperature, ctx)
        soft = soft_term(
            features, ctx, temperature=temperature, loss=self.kind, mask=ctx.distill_mask
        )
        return {} if soft is None else {"soft": soft}


# ----------------------------------------------------------------------------------------------
# Applying one single-teacher method to every teacher


def _as_teacher(tap: Tap, index: int) -> Tap:
    return dataclasses.replace(tap, teacher_index=index) if tap.role is Role.TEACHER else tap


class PerTeacher:
    """One instance of a single-teacher method per teacher, with re-indexed taps and features."""

    def __init__(self, config: Any, default: Callable[[], Any], *, where: str) -> None:
        if config is not None and not isinstance(config, str | Mapping):
            raise ValueError(
                f"{where}.method must be a method name or a mapping like {{name: kd}}, got {config!r}"
            )
        if isinstance(config, str):
            config = {"name": config}
        if config is not None and "name" not in config:
            raise ValueError(f"{where}.method needs a 'name' (a single-teacher method, e.g. kd)")
        self.config = dict(config) if config is not None else None
        self.default = default
        self.where = where
        self.stage: Stage | None = None
        self.teachers: list[ModelInfo] | None = None
        self.methods: list = []
        self._check(self._build())  # fail at config time on bad parameters

    def _build(self):
        if self.config is None:
            return self.default()
        from methods.registry import build_method  # the registry imports this module

        params = {k: v for k, v in self.config.items() if k not in ("name", "weight")}
        try:
            return build_method(self.config["name"], params)
        except ValueError as err:
            raise ValueError(f"{self.where}.method: {err}") from None

    def _check(self, method) -> None:
        if isinstance(method, TeacherAware):
            raise ValueError(
                f"{self.where}.method: {method.name!r} combines teachers itself; nest no combiners"
            )
        if isinstance(method, ForwardModifier):
            raise ValueError(
                f"{self.where}.method: {method.name!r} changes the forward pass, which is shared by all "
                "teachers; use it as a method of its own"
            )
        if self.stage is not None and self.stage not in method.stages:
            raise ValueError(
                f"{self.where}.method: {method.name!r} does not apply to stage {self.stage.value!r}"
            )

    @property
    def inner_stages(self) -> frozenset[Stage]:
        return self._build().stages if self.config is not None else BOTH_STAGES

    def set_stage(self, stage: Stage) -> None:
        self.stage = stage
        self._check(self._build())

    def set_teachers(self, teachers: Sequence[ModelInfo]) -> None:
        if not teachers:
            raise ValueError(
                f"{self.where} combines teachers, but the run has none; add 'teachers:'"
            )
        self.teachers = list(teachers)
        self.methods = []
        for _ in teachers:
            method = self._build()
            self._check(method)
            if self.stage is not None and isinstance(method, StageAware):
                method.set_stage(self.stage)
            self.methods.append(method)

    def ensure(self, teacher: ModelInfo | None) -> None:
        if self.teachers is None:  # set_teachers was not called: the single teacher of a run
            self.set_teachers([teacher] if teacher is not None else [])

    def taps(self, student: ModelInfo) -> list[Tap]:
        assert self.teachers is not None
        taps: dict[Tap, None] = {}
        for index, (method, info) in enumerate(zip(self.methods, self.teachers, strict=True)):
            taps.update(dict.fromkeys(_as_teacher(t, index) for t in method.taps(info, student)))
        return list(taps)

    def features_for(
        self, features: Mapping[Tap, torch.Tensor], index: int
    ) -> dict[Tap, torch.Tensor]:
        return {
            dataclasses.replace(tap, teacher_index=0) if tap.role is Role.TEACHER else tap: value
            for tap, value in features.items()
            if tap.role is Role.STUDENT or tap.teacher_index == index
        }

    def compute(
        self,
        index: int,
        features: Mapping[Tap, torch.Tensor],
        ctx: LossContext,
        token_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Teacher ``index``'s terms, each multiplied by the method's own term weight; with
        ``token_weights`` ``[N]`` the per-token weighting of the module docstring."""
        assert self.teachers is not None
        method = self.methods[index]
        inner_ctx = dataclasses.replace(ctx, teacher=self.teachers[index])
        scale = 1.0
        if token_weights is not None:
            inner_ctx.loss_mask = ctx.loss_mask * token_weights
            inner_ctx.token_mask = (
                None if ctx.token_mask is None else ctx.token_mask * token_weights
            )
            base = ctx.distill_mask
            scale = (base * token_weights).sum() / base.sum().clamp_min(1e-12)
        terms = method.compute(self.features_for(features, index), inner_ctx)
        weights = method.term_weights(inner_ctx) if isinstance(method, WeightsTerms) else {}
        return {name: value * (weights.get(name, 1.0) * scale) for name, value in terms.items()}

    def modules(self) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {}
        for index, method in enumerate(self.methods):
            if isinstance(method, HasModules):
                out.update(
                    {f"t{index}_{name}": module for name, module in method.modules().items()}
                )
        return out

    def module_layers(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for index, method in enumerate(self.methods):
            layers = getattr(method, "module_layers", None)
            if callable(layers):
                out.update({f"t{index}_{name}": layer for name, layer in layers().items()})
        return out


def _combine(
    parts: Mapping[int, dict[str, torch.Tensor]], factors: Mapping[int, float | torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{term: sum_k factor_k * term_k}`` plus each teacher's term (detached, logged only)."""
    out: dict[str, torch.Tensor] = {}
    for index, terms in parts.items():
        for name, value in terms.items():
            weighted = value * factors[index]
            out[name] = weighted if name not in out else out[name] + weighted
            out[f"t{index}.{name}"] = value.detach()
    return out


def _hard(
    features: Mapping[Tap, torch.Tensor], ctx: LossContext, method: str
) -> dict[str, torch.Tensor]:
    hard = hard_term(features, ctx, method)
    return {} if hard is None else {"hard": hard}


def _model_size(info: ModelInfo) -> int:
    """Approximate parameter count (ordering teachers by size)."""
    h = info.hidden_size
    return info.num_layers * (4 * h * h + 3 * h * info.ffn_hidden_size) + info.padded_vocab_size * h


def _uniform(step: int, seed: int, count: int, salt: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))
    return torch.rand(count, generator=generator, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# The combiners


class _LogOnly(dict):
    """Term weights: 0 for every per-teacher term ``t<k>.<term>``, explicit entries otherwise."""

    def get(self, key, default=None):  # noqa: D102
        if key in self:
            return self[key]
        head = key.split(".", 1)[0]
        if len(head) > 1 and head[0] == "t" and head[1:].isdigit() and "." in key:
            return LOG_ONLY
        return default


@dataclass(kw_only=True, frozen=True)
class TMKDParams:
    method: dict[str, Any] | str | None = None
    """The single-teacher method applied to each teacher, as a methods entry ({name: kd,
    temperature: 2} or just a name); default: TMKD's soft loss, the MSE between raw logits."""
    hard_weight: ScheduleLike = 1.0
    """Weight of the student's own cross entropy on the labels (0 drops it)."""


class TMKD:
    """TMKD (Yang et al. 2020, "Model Compression with Two-stage Multi-teacher Knowledge
    Distillation for Web Question Answering System", WSDM, eq. 4): the student learns from the
    average of its ``K`` teachers, ``L = (1/K) sum_k L_soft(s, t_k) + hard_weight * CE(y, s)``,
    with TMKD's soft loss the MSE between the student's and each teacher's logits (or any
    single-teacher method through ``method``)."""

    name: ClassVar[str] = "tmkd"
    stages: ClassVar[frozenset[Stage]] = BOTH_STAGES
    paper: ClassVar[str] = "Yang et al. 2020 (TMKD)"
    signals: ClassVar[str] = "every teacher's signals of the inner method (default logits), labels"
    Params: ClassVar[type] = TMKDParams

    def __init__(self, params: TMKDParams | None = None) -> None:
        self.params = params or TMKDParams()
        self.inner = PerTeacher(self.params.method, lambda: _SoftLoss("mse", 1.0), where=self.name)

    def set_stage(self, stage: Stage) -> None:
        self.inner.set_stage(stage)

    def set_teachers(self, teachers: Sequence[ModelInfo]) -> None:
        self.inner.set_teachers(teachers)

    def per_teacher_methods(self) -> list[tuple[Any, int]]:
        return [(m, i) for i, m in enumerate(self.inner.methods)]

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        self.inner.ensure(teacher)
        return list(dict.fromkeys([*self.inner.taps(student), STUDENT_LOGITS]))

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.inner.modules()

    def module_layers(self) -> dict[str, int]:
        return self.inner.module_layers()

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return _LogOnly(hard=at(self.params.hard_weight, ctx))

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        count = len(self.inner.methods)
        parts = {k: self.inner.compute(k, features, ctx) for k in range(count)}
        terms = _combine(
            {k: v for k, v in parts.items() if v}, dict.fromkeys(range(count), 1.0 / count)
        )
        if at(self.params.hard_weight, ctx) != 0.0:
            terms.update(_hard(features, ctx, self.name))
        return terms


@dataclass(kw_only=True, frozen=True)
class MTBERTParams:
    method: dict[str, Any] | str | None = None
    """The single-teacher method applied to each teacher, as a methods entry or a name; default:
    MT-BERT's soft cross entropy at ``temperature``."""
    temperature: ScheduleLike = 1.0
    """Temperature of the default soft cross entropy."""
    hidden_weight: ScheduleLike = 1.0
    """Weight of the multi-teacher hidden loss (MSE between the student's final hidden states
    through a learned per-teacher projection and each teacher's); 0 drops it and its projections."""
    hard_weight: ScheduleLike = 1.0
    """Weight of the student's own cross entropy on the labels."""


class MTBERT:
    """MT-BERT (Wu et al. 2021, "One Teacher is Enough? Pre-trained Language Model Distillation
    from Multiple Teachers", Findings of ACL, eqs. 1-3): each teacher's soft loss is weighted per
    token by ``1 / (1 + CE(y, t_k))``, the teacher's own cross entropy on the label (a teacher that
    is wrong on a token teaches it less), and summed over teachers; the multi-teacher hidden loss
    ``sum_k MSE(W_k h_s, h_t_k)`` compares the student's final hidden states (final-norm output),
    through a learned per-teacher projection ``W_k`` to teacher ``k``'s width, with teacher
    ``k``'s; plus the hard loss."""

    name: ClassVar[str] = "mt_bert"
    stages: ClassVar[frozenset[Stage]] = BOTH_STAGES
    paper: ClassVar[str] = "Wu et al. 2021 (MT-BERT)"
    signals: ClassVar[str] = "every teacher's logits and final hidden states, labels"
    Params: ClassVar[type] = MTBERTParams

    def __init__(self, params: MTBERTParams | None = None) -> None:
        self.params = params or MTBERTParams()
        temperature = self.params.temperature
        self.inner = PerTeacher(
            self.params.method, lambda: _SoftLoss("ce", temperature), where=self.name
        )
        self._student: ModelInfo | None = None
        self._projections: dict[str, torch.nn.Module] | None = None

    def set_stage(self, stage: Stage) -> None:
        self.inner.set_stage(stage)

    def set_teachers(self, teachers: Sequence[ModelInfo]) -> None:
        self.inner.set_teachers(teachers)

    def per_teacher_methods(self) -> list[tuple[Any, int]]:
        return [(m, i) for i, m in enumerate(self.inner.methods)]

    @property
    def _hidden(self) -> bool:
        return self.params.hidden_weight != 0.0

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        self.inner.ensure(teacher)
        self._student = student
        taps = [*self.inner.taps(student), STUDENT_LOGITS]
        taps += [
            Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=k)
            for k in range(len(self.inner.methods))
        ]
        if self._hidden:
            taps.append(Tap(Role.STUDENT, FeatureKind.FINAL_NORM))
            taps += [
                Tap(Role.TEACHER, FeatureKind.FINAL_NORM, teacher_index=k)
                for k in range(len(self.inner.methods))
            ]
        return list(dict.fromkeys(taps))

    def modules(self) -> dict[str, torch.nn.Module]:
        out = dict(self.inner.modules())
        if self._hidden:
            if self._projections is None:
                if self._student is None or self.inner.teachers is None:
                    raise RuntimeError("mt_bert.modules() needs taps() first (the model sizes)")
                self._projections = {
                    f"proj_t{k}": torch.nn.Linear(self._student.hidden_size, info.hidden_size)
                    for k, info in enumerate(self.inner.teachers)
                }
            out.update(self._projections)
        return out

    def module_layers(self) -> dict[str, int]:
        layers = self.inner.module_layers()
        if self._hidden:
            layers.update(
                {f"proj_t{k}": -1 for k in range(len(self.inner.methods))}
            )  # final norm: last stage
        return layers

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return _LogOnly(
            hard=at(self.params.hard_weight, ctx), hidden=at(self.params.hidden_weight, ctx)
        )

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        count = len(self.inner.methods)
        parts: dict[int, dict[str, torch.Tensor]] = {}
        for k in range(count):
            teacher_logits = features.get(Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=k))
            weights = None
            if teacher_logits is not None:
                ce = _stats_of(teacher_logits, ctx).cross_entropy
                weights = (1.0 / (1.0 + ce)).to(ctx.loss_mask.dtype)
            result = self.inner.compute(k, features, ctx, weights)
            if result:
                parts[k] = result
        terms = _combine(parts, dict.fromkeys(parts, 1.0))
        student_hidden = features.get(Tap(Role.STUDENT, FeatureKind.FINAL_NORM))
        if self._hidden and student_hidden is not None:
            assert self._projections is not None
            mask = ctx.distill_mask.view(student_hidden.shape[0], student_hidden.shape[1], 1)
            hidden = None
            for k in range(count):
                teacher_hidden = features[
                    Tap(Role.TEACHER, FeatureKind.FINAL_NORM, teacher_index=k)
                ]
                projected = self._projections[f"proj_t{k}"](student_hidden)
                acc = torch.float64 if projected.dtype == torch.float64 else torch.float32
                squared = (projected.to(acc) - teacher_hidden.to(acc)).pow(2) * mask
                value = squared.sum() / (mask.sum().clamp_min(1.0) * teacher_hidden.shape[-1])
                terms[f"t{k}.hidden"] = value.detach()
                hidden = value if hidden is None else hidden + value
            terms["hidden"] = hidden
        if at(self.params.hard_weight, ctx) != 0.0:
            terms.update(_hard(features, ctx, self.name))
        return terms


@dataclass(kw_only=True, frozen=True)
class UncertaintyParams:
    method: dict[str, Any] | str | None = None
    """The single-teacher method applied to each teacher, as a methods entry or a name; default:
    ``T^2 KL(p_t^T || p_s^T)`` at ``temperature``."""
    temperature: ScheduleLike = 1.0
    """Temperature of the default KL."""
    mode: Literal["weight", "route"] = "weight"
    """``weight``: interpolate between the two teachers nearest to ``u (K - 1)`` (teachers ordered
    by size); ``route``: each token learns from the nearest one only."""
    hard_weight: ScheduleLike = 1.0
    """Weight of the student's own cross entropy on the labels."""


def uncertainty_weights(uncertainty: torch.Tensor, count: int, mode: str) -> torch.Tensor:
    """``[count, N]`` token weights over teachers ordered small to large from ``u`` in [0, 1]:
    position ``u (count - 1)``; ``weight`` splits linearly between the two neighbours, ``route``
    takes the nearest."""
    position = uncertainty.clamp(0.0, 1.0) * (count - 1)
    weights = torch.zeros(
        count, uncertainty.shape[0], dtype=uncertainty.dtype, device=uncertainty.device
    )
    if mode == "route":
        weights.scatter_(0, position.round().long().view(1, -1), 1.0)
        return weights
    low = position.floor().long().clamp(max=count - 1)
    high = (low + 1).clamp(max=count - 1)
    frac = position - low.to(position.dtype)
    weights.scatter_add_(0, low.view(1, -1), (1.0 - frac).view(1, -1))
    weights.scatter_add_(0, high.view(1, -1), frac.view(1, -1))
    return weights


class Uncertainty:
    """Uncertainty-based dynamic teacher adoption (Li et al. 2021, "Dynamic Knowledge Distillation
    for Pre-trained Language Models", EMNLP, sec. 3.1): the student's normalized prediction entropy
    ``u = H(p_s) / log V`` measures how much it still has to learn on a token; with the teachers
    ordered by size, uncertain tokens learn from the larger teachers and confident ones from the
    smaller (``weight``: linear interpolation at ``u (K - 1)``; ``route``: the nearest teacher).
    ``u`` carries no gradient."""

    name: ClassVar[str] = "uncertainty"
    stages: ClassVar[frozenset[Stage]] = BOTH_STAGES
    paper: ClassVar[str] = "Li et al. 2021 (Dynamic KD)"
    signals: ClassVar[str] = (
        "every teacher's logits (or the inner method's signals), student entropy"
    )
    Params: ClassVar[type] = UncertaintyParams

    def __init__(self, params: UncertaintyParams | None = None) -> None:
        self.params = params or UncertaintyParams()
        temperature = self.params.temperature
        self.inner = PerTeacher(
            self.params.method, lambda: _SoftLoss("kl", temperature), where=self.name
        )

    def set_stage(self, stage: Stage) -> None:
        self.inner.set_stage(stage)

    def set_teachers(self, teachers: Sequence[ModelInfo]) -> None:
        self.inner.set_teachers(teachers)

    def per_teacher_methods(self) -> list[tuple[Any, int]]:
        return [(m, i) for i, m in enumerate(self.inner.methods)]

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        self.inner.ensure(teacher)
        return list(dict.fromkeys([*self.inner.taps(student), STUDENT_LOGITS]))

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.inner.modules()

    def module_layers(self) -> dict[str, int]:
        return self.inner.module_layers()

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return _LogOnly(hard=at(self.params.hard_weight, ctx))

    def order(self) -> list[int]:
        """Teacher indices from the smallest to the largest (ties: config order)."""
        assert self.inner.teachers is not None
        return sorted(
            range(len(self.inner.teachers)), key=lambda k: _model_size(self.inner.teachers[k])
        )

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        student = features.get(STUDENT_LOGITS)
        if student is None:  # the default and logit inner methods run where the logits are
            parts = {
                k: self.inner.compute(k, features, ctx) for k in range(len(self.inner.methods))
            }
            return _combine({k: v for k, v in parts.items() if v}, dict.fromkeys(parts, 1.0))
        entropy = _stats_of(student, ctx, labels=False).entropy
        u = (entropy / math.log(ctx.vocab_size)).to(ctx.loss_mask.dtype)
        order = self.order()
        by_rank = uncertainty_weights(u, len(order), self.params.mode)
        parts = {}
        for rank, k in enumerate(order):
            result = self.inner.compute(k, features, ctx, by_rank[rank])
            if result:
                parts[k] = result
        terms = _combine(parts, dict.fromkeys(parts, 1.0))
        if at(self.params.hard_weight, ctx) != 0.0:
            terms.update(_hard(features, ctx, self.name))
        return terms


@dataclass(kw_only=True, frozen=True)
class RLKDParams:
    method: dict[str, Any] | str | None = None
    """The single-teacher method applied to each teacher, as a methods entry or a name; default:
    the soft cross entropy at ``temperature``."""
    temperature: ScheduleLike = 1.0
    """Temperature of the default soft cross entropy."""
    warmup: float = 0.1
    """Fraction of training that uses all teachers (their average) while the policy learns."""
    policy_weight: ScheduleLike = 1.0
    """Weight of the REINFORCE loss (it trains only the policy networks)."""
    hard_weight: ScheduleLike = 1.0
    """Weight of the student's own cross entropy on the labels."""
    seed: int = 0
    """Seed of the action draws (combined with the step and microbatch)."""


class RLKD:
    """Reinforced multi-teacher selection (Yuan et al. 2021, "Reinforced Multi-Teacher Selection
    for Knowledge Distillation", AAAI, sec. 3): a policy network per teacher ``k`` maps the state
    of a sequence (teacher ``k``'s final hidden states mean-pooled over the sequence, standing in
    for the frozen encoder's first-token vector; its mean cross entropy on the labels; its mean
    confidence and normalized entropy, summarizing its soft logits) to ``pi_k = P(use teacher k)``
    and samples the action. Each sequence learns from the average of its selected teachers (all
    when none is), and the policy is trained by REINFORCE, ``-sum_k (r - mean r) log pi(a_k)``,
    with reward ``r`` = -the student's cross entropy on the sequence (eq. 9). During the first
    ``warmup`` of training every teacher is used (the average) while the policy already learns."""

    name: ClassVar[str] = "rl_kd"
    stages: ClassVar[frozenset[Stage]] = BOTH_STAGES
    paper: ClassVar[str] = "Yuan et al. 2021 (RL-KD)"
    signals: ClassVar[str] = "every teacher's logits and final hidden states, labels"
    Params: ClassVar[type] = RLKDParams

    STATE_STATS = 3
    """Scalars in the state besides the pooled hidden vector: CE, confidence, normalized entropy."""

    def __init__(self, params: RLKDParams | None = None) -> None:
        self.params = params or RLKDParams()
        if not 0.0 <= self.params.warmup <= 1.0:
            raise ValueError(f"rl_kd.warmup must be a fraction in [0, 1], got {self.params.warmup}")
        temperature = self.params.temperature
        self.inner = PerTeacher(
            self.params.method, lambda: _SoftLoss("ce", temperature), where=self.name
        )
        self._policies: dict[str, torch.nn.Module] | None = None
        self._draw = (-1, 0)

    def set_stage(self, stage: Stage) -> None:
        self.inner.set_stage(stage)

    def set_teachers(self, teachers: Sequence[ModelInfo]) -> None:
        self.inner.set_teachers(teachers)

    def per_teacher_methods(self) -> list[tuple[Any, int]]:
        return [(m, i) for i, m in enumerate(self.inner.methods)]

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        self.inner.ensure(teacher)
        count = len(self.inner.methods)
        taps = [*self.inner.taps(student), STUDENT_LOGITS]
        taps += [Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=k) for k in range(count)]
        taps += [Tap(Role.TEACHER, FeatureKind.FINAL_NORM, teacher_index=k) for k in range(count)]
        return list(dict.fromkeys(taps))

    def modules(self) -> dict[str, torch.nn.Module]:
        if self._policies is None:
            if self.inner.teachers is None:
                raise RuntimeError("rl_kd.modules() needs taps() first (the teachers' sizes)")
            self._policies = {}
            for k, info in enumerate(self.inner.teachers):
                policy = torch.nn.Linear(info.hidden_size + self.STATE_STATS, 1)
                torch.nn.init.zeros_(policy.weight)  # pi = 0.5 for every teacher at the start
                torch.nn.init.zeros_(policy.bias)
                self._policies[f"policy_t{k}"] = policy
        return {**self.inner.modules(), **self._policies}

    def module_layers(self) -> dict[str, int]:
        return {
            **self.inner.module_layers(),
            **{f"policy_t{k}": -1 for k in range(len(self.inner.methods))},
        }

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return _LogOnly(
            hard=at(self.params.hard_weight, ctx),
            policy=at(self.params.policy_weight, ctx),
            selected=LOG_ONLY,
        )

    def _generator(self, ctx: LossContext) -> torch.Generator:
        step, micro = self._draw
        self._draw = (ctx.step, micro + 1) if step == ctx.step else (ctx.step, 0)
        seed = (self.params.seed * 1_000_003 + ctx.step * 7919 + self._draw[1] * 104_729) % (2**63)
        return torch.Generator().manual_seed(seed)

    def sample(self, probs: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        """``[K, b]`` 0/1 actions drawn with probabilities ``probs`` (the same on every tp rank)."""
        draws = torch.rand(probs.shape, generator=self._generator(ctx), dtype=torch.float64)
        return (draws.to(probs.device) < probs.double()).to(probs.dtype)

    def states(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext, batch: int
    ) -> list[torch.Tensor]:
        """Each teacher's ``[b, h_k + 3]`` state (no gradient)."""
        mask = ctx.distill_mask.view(-1, batch)  # [s, b]
        count = mask.sum(0).clamp_min(1.0)
        out = []
        for k in range(len(self.inner.methods)):
            hidden = features[Tap(Role.TEACHER, FeatureKind.FINAL_NORM, teacher_index=k)].detach()
            stats = _stats_of(features[Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=k)], ctx)
            pooled = (hidden.float() * mask[..., None]).sum(0) / count[:, None]

            def mean(x: torch.Tensor) -> torch.Tensor:
                return (x.view(-1, batch).float() * mask).sum(0) / count

            scalars = torch.stack(
                [
                    mean(stats.cross_entropy),
                    mean(stats.max_prob),
                    mean(stats.entropy) / math.log(ctx.vocab_size),
                ],
                dim=1,
            )
            out.append(torch.cat([pooled, scalars], dim=1))
        return out

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        student = features.get(STUDENT_LOGITS)
        if student is None:
            return {}
        assert self._policies is not None, (
            "rl_kd: the runtime builds the policy modules before the first step"
        )
        count = len(self.inner.methods)
        hidden = features[Tap(Role.TEACHER, FeatureKind.FINAL_NORM, teacher_index=0)]
        batch = hidden.shape[1]
        states = self.states(features, ctx, batch)
        policy = self._policies
        probs = torch.stack(
            [torch.sigmoid(policy[f"policy_t{k}"](s.to(policy[f"policy_t{k}"].weight.dtype))).squeeze(1).float()
             for k, s in enumerate(states)]
        )  # [K, b]  # fmt: skip
        actions = self.sample(probs.detach(), ctx)  # [K, b]
        warm = ctx.step < self.params.warmup * ctx.total_steps
        chosen = torch.ones_like(actions) if warm else actions
        none = chosen.sum(0) == 0
        chosen = torch.where(none[None, :], torch.ones_like(chosen), chosen)
        share = chosen / chosen.sum(0, keepdim=True)  # [K, b], the average of the selected teachers
        parts = {}
        for k in range(count):
            tokens = (
                share[k].to(ctx.loss_mask.dtype).repeat(ctx.loss_mask.shape[0] // batch)
            )  # s-major tokens
            result = self.inner.compute(k, features, ctx, tokens)
            if result:
                parts[k] = result
        terms = _combine(parts, dict.fromkeys(parts, 1.0))
        # REINFORCE: reward = -the student's cross entropy per sequence, baseline = the batch mean.
        ce = _stats_of(student, ctx).cross_entropy.view(-1, batch).float()
        label_mask = ctx.loss_mask.view(-1, batch).float()
        reward = -(ce * label_mask).sum(0) / label_mask.sum(0).clamp_min(1.0)
        advantage = reward - reward.mean()
        log_prob = actions * torch.log(probs.clamp_min(1e-12)) + (1 - actions) * torch.log(
            (1 - probs).clamp_min(1e-12)
        )
        terms["policy"] = -(advantage[None, :] * log_prob).sum(0).mean()
        terms["selected"] = chosen.mean().detach()
        if at(self.params.hard_weight, ctx) != 0.0:
            terms.update(_hard(features, ctx, self.name))
        return terms


@dataclass(kw_only=True, frozen=True)
class DGKDParams:
    method: dict[str, Any] | str | None = None
    """The single-teacher method applied to each teacher, as a methods entry or a name; default:
    ``T^2 KL(p_t^T || p_s^T)`` at ``temperature``."""
    temperature: ScheduleLike = 4.0
    """Temperature of the default KL."""
    survival: float = 0.75
    """Probability that a teacher is kept at a step (DGKD's stochastic learning)."""
    hard_weight: ScheduleLike = 1.0
    """Weight of the student's own cross entropy on the labels."""
    seed: int = 0
    """Seed of the drops (combined with the step)."""


class DGKD:
    """Densely guided KD (Son et al. 2021, "Densely Guided Knowledge Distillation using Multiple
    Teacher Assistants", ICCV, eq. 3 and sec. 3.3): the teacher and all its assistants (the
    ``teachers:`` of the run) teach the student together, ``L = hard + sum_k d_k L_soft(s, t_k)``,
    where each ``d_k`` is kept (1) with probability ``survival`` and dropped (0) otherwise, drawn
    anew each step (stochastic learning; at least one teacher is kept: the one with the smallest
    draw)."""

    name: ClassVar[str] = "dgkd"
    stages: ClassVar[frozenset[Stage]] = BOTH_STAGES
    paper: ClassVar[str] = "Son et al. 2021 (DGKD)"
    signals: ClassVar[str] = "every teacher's logits (or the inner method's signals), labels"
    Params: ClassVar[type] = DGKDParams

    def __init__(self, params: DGKDParams | None = None) -> None:
        self.params = params or DGKDParams()
        if not 0.0 < self.params.survival <= 1.0:
            raise ValueError(f"dgkd.survival must be in (0, 1], got {self.params.survival}")
        temperature = self.params.temperature
        self.inner = PerTeacher(
            self.params.method, lambda: _SoftLoss("kl", temperature), where=self.name
        )

    def set_stage(self, stage: Stage) -> None:
        self.inner.set_stage(stage)

    def set_teachers(self, teachers: Sequence[ModelInfo]) -> None:
        self.inner.set_teachers(teachers)

    def per_teacher_methods(self) -> list[tuple[Any, int]]:
        return [(m, i) for i, m in enumerate(self.inner.methods)]

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        self.inner.ensure(teacher)
        return list(dict.fromkeys([*self.inner.taps(student), STUDENT_LOGITS]))

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.inner.modules()

    def module_layers(self) -> dict[str, int]:
        return self.inner.module_layers()

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return _LogOnly(hard=at(self.params.hard_weight, ctx))

    def kept(self, step: int) -> list[bool]:
        """Which teachers survive at ``step`` (the same on every rank)."""
        count = len(self.inner.methods)
        draws = _uniform(step, self.params.seed, count, salt=17)
        keep = [bool(d < self.params.survival) for d in draws]
        if not any(keep):
            keep[int(draws.argmin())] = True
        return keep

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        keep = self.kept(ctx.step)
        parts = {k: self.inner.compute(k, features, ctx) for k, kept in enumerate(keep) if kept}
        terms = _combine({k: v for k, v in parts.items() if v}, dict.fromkeys(parts, 1.0))
        if at(self.params.hard_weight, ctx) != 0.0:
            terms.update(_hard(features, ctx, self.name))
        return terms
