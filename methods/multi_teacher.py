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
          REINFORCE, the reward of a step's selection = -the student's loss measured at
          the next step (after the update); all teachers during a warm start
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

**One class, small rules.** Every combiner is a :class:`Combiner`; what differs is its
:class:`Rule` (the classes ``TMKD`` ... ``DGKD``, which are also the registry's rows): which
teachers teach, with which token weights, and the rule's own terms and modules. A combiner is built
by ``from_context(params, ctx)`` (:class:`methods.base.BuildContext`): it reads ``ctx.teachers`` and
builds its inner method per teacher with ``ctx.build_inner(entry)``, so it needs no registry.

TAKD (Mirzadeh et al. 2020, teacher -> assistant -> student) needs no combiner: it is a chain of
single-teacher runs, each run's student checkpoint the next run's ``teacher.checkpoint`` (README).

All randomness is drawn from generators seeded by the step (dgkd's drops) or by the step and each
sequence's tokens (rl_kd's actions), so every rank of a step draws the same.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.distributed as dist

from methods.base import (
    BuildContext,
    FeatureKind,
    ForwardModifier,
    HasModules,
    HasRuntimeState,
    LossContext,
    ModelInfo,
    Role,
    Stage,
    Tap,
    WeightsTerms,
)
from methods.examples import per_example_mean, pool_by_example
from methods.logit_common import (
    BOTH_LOGITS,
    STUDENT_LOGITS,
    SoftLoss,
    at,
    hard_term,
    require_labels,
    soft_term,
)
from methods.schedules import ScheduleLike

log = logging.getLogger(__name__)

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


def _cross_entropy(logits: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """``-log p(label)`` per token, ``[N]`` (no gradient)."""
    ce = _stats_of(logits, ctx).cross_entropy
    assert ce is not None
    return ce


def _stats_of(logits: torch.Tensor, ctx: LossContext, labels: bool = True) -> TokenStats:
    return token_stats(
        logits, vocab_start=ctx.vocab_start, vocab_size=ctx.vocab_size, tp_group=ctx.tp_group,
        labels=require_labels(ctx, "multi-teacher") if labels else None,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The paper's own soft losses (used when no inner method is configured)


class _SoftLoss:
    """A combiner's default single-teacher term (not registered): one of
    :data:`methods.logit_common.SOFT_LOSSES` over the distilled positions, as term ``soft``."""

    name = "soft"
    stages = BOTH_STAGES

    def __init__(self, kind: SoftLoss, temperature: ScheduleLike) -> None:
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
# The one combiner: a single-teacher method per teacher, combined by a rule


TokenWeights = dict[int, torch.Tensor | None]
"""Teacher index -> its ``[N]`` per-token weights (``None``: unweighted), in computing order; a
teacher left out does not teach this step."""


class Rule(Protocol):
    """A paper's combination rule (the classes below; each is also the registry's row: name, paper,
    parameters). Optional hooks, with their defaults: ``taps(combiner) -> list[Tap]`` (none),
    ``modules(combiner)`` and ``module_layers(combiner)`` (none), ``term_weights(ctx)`` (none),
    ``average`` (False: the teachers' terms are summed, not averaged)."""

    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]]
    default_soft: ClassVar[SoftLoss]
    """The paper's own soft loss, applied to each teacher when ``method`` is not set."""
    params: Any

    def plan(
        self, combiner: Combiner, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> tuple[TokenWeights, dict[str, torch.Tensor]] | None:
        """Which teachers teach, with which token weights, and the rule's own terms (``None``:
        nothing to compute on this stage)."""
        ...


def _as_teacher(tap: Tap, index: int) -> Tap:
    return dataclasses.replace(tap, teacher_index=index) if tap.role is Role.TEACHER else tap


def _inner_entry(config: Any, where: str) -> dict[str, Any] | None:
    """A combiner's ``method`` as a methods entry (``{name: ..., <params>}``), or ``None``."""
    if config is None:
        return None
    if not isinstance(config, str | Mapping):
        raise ValueError(
            f"{where}.method must be a method name or a mapping like {{name: kd}}, got {config!r}"
        )
    entry = {"name": config} if isinstance(config, str) else dict(config)
    if "name" not in entry:
        raise ValueError(f"{where}.method needs a 'name' (a single-teacher method, e.g. kd)")
    entry.pop("weight", None)
    return entry


class Combiner:
    """Any multi-teacher combiner: one instance of a single-teacher method per teacher (its taps
    re-indexed to ``Tap.teacher_index = k``, its features handed over as if teacher ``k`` were the
    only one), combined by a :class:`Rule`, plus the student's own cross entropy (``hard``)."""

    def __init__(
        self,
        rule: Rule,
        methods: Sequence[Any],
        teachers: tuple[ModelInfo, ...],
        student: ModelInfo | None,
    ) -> None:
        self.rule = rule
        self.name = rule.name
        self.stages = rule.stages
        self.params = rule.params
        self.methods = list(methods)
        self.teachers = teachers
        self.student = student

    @classmethod
    def build(cls, rule: Rule, ctx: BuildContext) -> Combiner:
        """``rule``'s combiner over ``ctx.teachers``, each with its own inner method built by
        ``ctx.build_inner``. Without teachers (a parameters check, no run) the inner method is
        built once, checked, and dropped."""
        where = rule.name
        entry = _inner_entry(rule.params.method, where)

        def inner() -> Any:
            if entry is None:
                return _SoftLoss(rule.default_soft, getattr(rule.params, "temperature", 1.0))
            if ctx.build_inner is None:
                raise ValueError(f"{where}.method: the build context has no build_inner")
            try:
                method = ctx.build_inner(entry)
            except ValueError as err:
                raise ValueError(f"{where}.method: {err}") from None
            if isinstance(method, Combiner):
                raise ValueError(
                    f"{where}.method: {method.name!r} combines teachers itself; nest no combiners"
                )
            if isinstance(method, ForwardModifier):
                raise ValueError(
                    f"{where}.method: {entry['name']!r} changes the forward pass, which is shared "
                    "by all teachers; use it as a method of its own"
                )
            if ctx.teachers and ctx.stage not in method.stages:
                raise ValueError(
                    f"{where}.method: {entry['name']!r} does not apply to stage {ctx.stage.value!r}"
                )
            return method

        if not ctx.teachers:
            inner()
            return cls(rule, [], (), ctx.student)
        return cls(rule, [inner() for _ in ctx.teachers], tuple(ctx.teachers), ctx.student)

    def per_teacher_methods(self) -> list[tuple[Any, int]]:
        return [(m, i) for i, m in enumerate(self.methods)]

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        if not self.methods:
            raise ValueError(
                f"{self.name} combines teachers, but the run has none; add 'teachers:'"
            )
        taps: dict[Tap, None] = {}
        for index, (method, info) in enumerate(zip(self.methods, self.teachers, strict=True)):
            taps.update(dict.fromkeys(_as_teacher(t, index) for t in method.taps(info, student)))
        extra = getattr(self.rule, "taps", None)
        return list(dict.fromkeys([*taps, STUDENT_LOGITS, *(extra(self) if extra else [])]))

    def modules(self) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {}
        for index, method in enumerate(self.methods):
            if isinstance(method, HasModules):
                out.update({f"t{index}_{name}": m for name, m in method.modules().items()})
        own = getattr(self.rule, "modules", None)
        return {**out, **(own(self) if own else {})}

    def module_layers(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for index, method in enumerate(self.methods):
            layers = getattr(method, "module_layers", None)
            if callable(layers):
                out.update({f"t{index}_{name}": layer for name, layer in layers().items()})
        own = getattr(self.rule, "module_layers", None)
        return {**out, **(own(self) if own else {})}

    def runtime_state(self) -> dict[str, Any]:
        """The rule's and the inner methods' state between steps (:class:`HasRuntimeState`)."""
        state: dict[str, Any] = {
            f"t{index}": method.runtime_state()
            for index, method in enumerate(self.methods)
            if isinstance(method, HasRuntimeState)
        }
        if isinstance(self.rule, HasRuntimeState):
            state["rule"] = self.rule.runtime_state()
        return state

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        for index, method in enumerate(self.methods):
            if isinstance(method, HasRuntimeState) and f"t{index}" in state:
                method.load_runtime_state(state[f"t{index}"])
        if isinstance(self.rule, HasRuntimeState) and "rule" in state:
            self.rule.load_runtime_state(state["rule"])

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        own = getattr(self.rule, "term_weights", None)
        soft = getattr(self.params, "soft_weight", None)
        return _LogOnly(
            teachers=None if soft is None else at(soft, ctx),
            hard=at(self.params.hard_weight, ctx),
            **(own(ctx) if own else {}),
        )

    def teacher_terms(
        self,
        index: int,
        features: Mapping[Tap, torch.Tensor],
        ctx: LossContext,
        token_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Teacher ``index``'s terms, each multiplied by the method's own term weight; with
        ``token_weights`` ``[N]`` the per-token weighting of the module docstring."""
        method = self.methods[index]
        inner_ctx = dataclasses.replace(ctx, teacher=self.teachers[index])
        scale: float | torch.Tensor = 1.0
        if token_weights is not None:
            inner_ctx.loss_mask = ctx.loss_mask * token_weights
            inner_ctx.token_mask = (
                None if ctx.token_mask is None else ctx.token_mask * token_weights
            )
            base = ctx.distill_mask
            scale = (base * token_weights).sum() / base.sum().clamp_min(1e-12)
        own = {
            dataclasses.replace(tap, teacher_index=0) if tap.role is Role.TEACHER else tap: value
            for tap, value in features.items()
            if tap.role is Role.STUDENT or tap.teacher_index == index
        }
        terms = method.compute(own, inner_ctx)
        weights = method.term_weights(inner_ctx) if isinstance(method, WeightsTerms) else {}
        return {name: value * (weights.get(name, 1.0) * scale) for name, value in terms.items()}

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        plan = self.rule.plan(self, features, ctx)
        if plan is None:
            return {}
        token_weights, own_terms = plan
        factor = 1.0 / len(self.methods) if getattr(self.rule, "average", False) else 1.0
        terms: dict[str, torch.Tensor] = {}
        for index, weights in token_weights.items():
            for name, value in self.teacher_terms(index, features, ctx, weights).items():
                weighted = value * factor
                terms[name] = weighted if name not in terms else terms[name] + weighted
                terms[f"t{index}.{name}"] = value.detach()
        terms.update(own_terms)
        if at(self.params.hard_weight, ctx) != 0.0:
            hard = hard_term(features, ctx, self.name)
            if hard is not None:
                terms["hard"] = hard
        return terms


class _LogOnly(dict):
    """Term weights: 0 for every per-teacher term ``t<k>.<term>``, explicit entries otherwise, and
    ``teachers`` (when given) for the combined teachers' terms (every other name)."""

    def __init__(self, *, teachers: float | None = None, **weights: float) -> None:
        super().__init__(**weights)
        self.teachers = teachers

    def get(self, key, default=None):  # noqa: D102
        if key in self:
            return self[key]
        head = key.split(".", 1)[0]
        if len(head) > 1 and head[0] == "t" and head[1:].isdigit() and "." in key:
            return LOG_ONLY
        return default if self.teachers is None else self.teachers


def _teacher_taps(kind: FeatureKind, count: int) -> list[Tap]:
    return [Tap(Role.TEACHER, kind, teacher_index=k) for k in range(count)]


def _model_size(info: ModelInfo) -> int:
    """The model's parameter count (ordering teachers by size): ``ModelInfo.num_parameters``, the
    one count the planner and the model use."""
    if info.num_parameters <= 0:
        raise ValueError(
            "a teacher's parameter count is unknown (ModelInfo.num_parameters is 0); build "
            "ModelInfo with parallel.model.model_info"
        )
    return info.num_parameters


def _uniform(step: int, seed: int, count: int, salt: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))
    return torch.rand(count, generator=generator, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# The rules (each also the registry's row of its paper)


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
    default_soft: ClassVar[SoftLoss] = "mse"
    average: ClassVar[bool] = True

    @classmethod
    def from_context(cls, params: TMKDParams, ctx: BuildContext) -> Combiner:
        return Combiner.build(cls(params), ctx)

    def __init__(self, params: TMKDParams) -> None:
        self.params = params

    def plan(
        self, combiner: Combiner, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> tuple[TokenWeights, dict[str, torch.Tensor]]:
        return dict.fromkeys(range(len(combiner.methods))), {}


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
    default_soft: ClassVar[SoftLoss] = "ce"

    @classmethod
    def from_context(cls, params: MTBERTParams, ctx: BuildContext) -> Combiner:
        return Combiner.build(cls(params), ctx)

    def __init__(self, params: MTBERTParams) -> None:
        self.params = params
        self.hidden = params.hidden_weight != 0.0
        self._projections: dict[str, torch.nn.Module] | None = None

    def taps(self, combiner: Combiner) -> list[Tap]:
        count = len(combiner.methods)
        taps = _teacher_taps(FeatureKind.LOGITS, count)
        if self.hidden:
            taps += [Tap(Role.STUDENT, FeatureKind.FINAL_NORM)]
            taps += _teacher_taps(FeatureKind.FINAL_NORM, count)
        return taps

    def modules(self, combiner: Combiner) -> dict[str, torch.nn.Module]:
        if not self.hidden:
            return {}
        if self._projections is None:
            student = combiner.student
            if student is None or not combiner.teachers:
                raise RuntimeError("mt_bert.modules() needs the model sizes (BuildContext)")
            self._projections = {
                f"proj_t{k}": torch.nn.Linear(student.hidden_size, info.hidden_size)
                for k, info in enumerate(combiner.teachers)
            }
        return self._projections

    def module_layers(self, combiner: Combiner) -> dict[str, int]:
        count = len(combiner.methods) if self.hidden else 0
        return {f"proj_t{k}": -1 for k in range(count)}  # the final norm: the last stage

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return {"hidden": at(self.params.hidden_weight, ctx)}

    def plan(
        self, combiner: Combiner, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> tuple[TokenWeights, dict[str, torch.Tensor]]:
        count = len(combiner.methods)
        weights: TokenWeights = {}
        for k in range(count):
            teacher_logits = features.get(Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=k))
            weights[k] = None
            if teacher_logits is not None:
                ce = _cross_entropy(teacher_logits, ctx)
                weights[k] = (1.0 / (1.0 + ce)).to(ctx.loss_mask.dtype)
        terms: dict[str, torch.Tensor] = {}
        student_hidden = features.get(Tap(Role.STUDENT, FeatureKind.FINAL_NORM))
        if self.hidden and student_hidden is not None:
            projections = self.modules(combiner)
            mask = ctx.distill_mask.view(student_hidden.shape[0], student_hidden.shape[1], 1)
            hidden: torch.Tensor | None = None
            for k in range(count):
                teacher_hidden = features[
                    Tap(Role.TEACHER, FeatureKind.FINAL_NORM, teacher_index=k)
                ]
                projected = projections[f"proj_t{k}"](student_hidden)
                acc = torch.float64 if projected.dtype == torch.float64 else torch.float32
                squared = (projected.to(acc) - teacher_hidden.to(acc)).pow(2) * mask
                value = squared.sum() / (mask.sum().clamp_min(1.0) * teacher_hidden.shape[-1])
                terms[f"t{k}.hidden"] = value.detach()
                hidden = value if hidden is None else hidden + value
            assert hidden is not None
            terms["hidden"] = hidden
        return weights, terms


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
    default_soft: ClassVar[SoftLoss] = "kl"

    @classmethod
    def from_context(cls, params: UncertaintyParams, ctx: BuildContext) -> Combiner:
        return Combiner.build(cls(params), ctx)

    def __init__(self, params: UncertaintyParams) -> None:
        self.params = params

    @staticmethod
    def order(teachers: Sequence[ModelInfo]) -> list[int]:
        """Teacher indices from the smallest to the largest (ties: config order)."""
        return sorted(range(len(teachers)), key=lambda k: _model_size(teachers[k]))

    def plan(
        self, combiner: Combiner, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> tuple[TokenWeights, dict[str, torch.Tensor]]:
        student = features.get(STUDENT_LOGITS)
        count = len(combiner.methods)
        if student is None:  # the default and logit inner methods run where the logits are
            return dict.fromkeys(range(count)), {}
        entropy = _stats_of(student, ctx, labels=False).entropy
        u = (entropy / math.log(ctx.vocab_size)).to(ctx.loss_mask.dtype)
        by_rank = uncertainty_weights(u, count, self.params.mode)
        order = self.order(combiner.teachers)
        return {k: by_rank[rank] for rank, k in enumerate(order)}, {}


@dataclass(kw_only=True, frozen=True)
class RLKDParams:
    method: dict[str, Any] | str | None = None
    """The single-teacher method applied to each teacher, as a methods entry or a name; default:
    the soft cross entropy at ``temperature`` (GLMKD's recipe: ``--student_model=kd
    --distill_ft_soft``)."""
    temperature: ScheduleLike = 10.0
    """Temperature of the default soft cross entropy (GLMKD's RL-KD recipe: 10)."""
    warmup: float = 0.1
    """Fraction of training that uses every teacher (each weighted ``1 / K``) and trains no policy.
    GLMKD runs this phase as a separate run (``--rl_kd_only_avg``, then a second run with the
    policy); one gkd run does both."""
    policy_weight: ScheduleLike = 1.0
    """Weight of the REINFORCE loss (it trains only the policy networks). GLMKD adds its agent loss
    ``-sum pi(a) r`` (a sum over the batch) to the teachers' term, so it is scaled by
    ``rl_kd_alpha``; gkd's is a mean over sequences (see the class docstring)."""
    soft_weight: ScheduleLike = 0.5
    """Weight of the selected teachers' terms (GLMKD's ``rl_kd_alpha``: 0.5)."""
    hard_weight: ScheduleLike = 0.5
    """Weight of the student's own cross entropy on the labels (GLMKD: 1 - rl_kd_alpha = 0.5)."""
    baseline_decay: float | None = 0.0
    """Decay of the running mean of the slot's past rewards that is subtracted from the reward (a
    REINFORCE baseline: measured before the actions act, it leaves the expected gradient unchanged
    and cuts its variance). 0: the previous step's reward, so the advantage is how much the loss
    fell over the step, free of the training trend that a slower mean lags behind; GLMKD uses no
    baseline: ``null`` reproduces that."""
    seed: int = 0
    """Seed of the action draws (combined with the step and each sequence's tokens)."""


@dataclass
class _Pending:
    """One microbatch slot's selection, kept until the next step measures its reward."""

    step: int
    states: list[torch.Tensor]
    """Each teacher's ``[E, h_k + 3]`` state (detached)."""
    actions: torch.Tensor
    """``[K, E]`` 0/1 actions that were applied."""


class RLKD:
    """Reinforced multi-teacher selection (Yuan et al. 2021, "Reinforced Multi-Teacher Selection
    for Knowledge Distillation", AAAI, sec. 3), as the authors' GLMKD implements it
    (``distill/multi_teacher_model.py``, class ``RL_KD``, lines 282-427 at commit 8d6cf11).

    **Policy.** A policy network per teacher ``k`` maps the state of a sequence (teacher ``k``'s
    final hidden states mean-pooled over the sequence, standing in for GLMKD's frozen base model's
    first-token vector; teacher ``k``'s mean cross entropy on the labels; its mean confidence and
    normalized entropy, summarizing its soft logits) to ``pi_k = sigmoid(w_k . s + b_k) = P(use
    teacher k)``. GLMKD feeds one linear layer with all teachers' features at once (two layers
    summed, l. 399-401); gkd keeps one independent network per teacher.

    **Step t.** Actions ``a_k ~ Bernoulli(pi_k)`` are drawn per sequence (GLMKD l. 402) and the
    student learns from the selected teachers: teacher ``k``'s term on sequence ``j`` is weighted
    ``a_jk / K`` (GLMKD l. 403-404: the mean over (sequence, teacher) of ``a_jk L_jk``; a sequence
    with no teacher selected gets no teacher term). The loss is ``soft_weight`` x that +
    ``hard_weight`` x the student's cross entropy (GLMKD l. 427, ``rl_kd_alpha`` = 0.5). The state
    and the actions are kept (detached) for the next step.

    **Step t + 1: the reward.** The reward of step t's actions is ``r = -`` the student's cross
    entropy measured at step t + 1's forward, i.e. after the update that used them (GLMKD l.
    414-415, ``--rl_kd_reward=1``), and the policy is trained by REINFORCE on the kept state with
    the policy's current weights (GLMKD l. 409-413 recompute ``pi`` the same way):
    ``L_policy = -mean_j (r - b) sum_k log pi(a_jk | s_jk)`` (the paper's policy gradient,
    ``grad log pi`` x reward). GLMKD does not run a second forward of the same batch for the
    reward ("隔代更新不用数据重复使用", l. 409: the update is one generation late so no data is
    reused): its reward is the loss of the next batch. gkd does the same, per microbatch slot:
    the actions of microbatch ``m`` of step t are rewarded with the loss of microbatch ``m`` of
    step t + 1 on the same rank. A re-forward of step t's batch after the update would give each
    sequence a reward on its own tokens (less noise) at the cost of one more student forward per
    step; both estimate the same expected gradient, because the update moves the shared student
    weights that both batches are scored with. The credit is shared: every sequence of a slot
    gets the slot's reward.

    **Differences from GLMKD, with reasons.** (1) ``log pi`` instead of GLMKD's ``pi`` (l. 418
    multiplies the probability itself by the reward; the paper's policy gradient is ``grad log
    pi``). (2) A baseline ``b`` (by default the slot's previous reward, so the advantage is how
    much the loss fell over the step; ``baseline_decay`` > 0: a running mean; GLMKD: none,
    ``baseline_decay: null``): it does not change the expected gradient (``b`` is measured before
    the actions it is subtracted for act) and makes it usable at small batches.
    (3) Warm-up in the same run (``warmup``): every teacher is used, weighted ``1 / K`` (GLMKD's
    ``--rl_kd_only_avg`` run, l. 393), and the policy is not trained on the actions drawn then,
    which were not applied; the first policy loss comes one step after the warm-up ends. (4) The
    mean over sequences instead of GLMKD's sum over (sequence, teacher) pairs in the policy loss.
    GLMKD's "previous step" is the previous forward call (a microbatch, before any update when
    gradients accumulate); gkd's is the previous optimizer step.

    **Layouts and resume.** Draws are keyed by the step and each sequence's tokens, so a sequence
    gets the same action at any tensor/data-parallel layout; a microbatch slot covers the same
    global positions at any data-parallel size (the micro batch size is fixed), so the policy
    loss is the same too. The kept selections and baselines are checkpointed per rank
    (:class:`~methods.base.HasRuntimeState`), so a run resumed at the same layout equals the
    uninterrupted one; resumed at another layout it trains no policy at its first step (logged)
    and continues from the next, so its policy misses that one step's update (the student's update
    of that step is unaffected; later selections can differ from an uninterrupted run's)."""

    name: ClassVar[str] = "rl_kd"
    stages: ClassVar[frozenset[Stage]] = BOTH_STAGES
    paper: ClassVar[str] = "Yuan et al. 2021 (RL-KD)"
    signals: ClassVar[str] = "every teacher's logits and final hidden states, labels"
    Params: ClassVar[type] = RLKDParams
    default_soft: ClassVar[SoftLoss] = "ce"

    @classmethod
    def from_context(cls, params: RLKDParams, ctx: BuildContext) -> Combiner:
        return Combiner.build(cls(params), ctx)

    STATE_STATS = 3
    """Scalars in the state besides the pooled hidden vector: CE, confidence, normalized entropy."""

    def __init__(self, params: RLKDParams) -> None:
        if not 0.0 <= params.warmup <= 1.0:
            raise ValueError(f"rl_kd.warmup must be a fraction in [0, 1], got {params.warmup}")
        if params.baseline_decay is not None and not 0.0 <= params.baseline_decay < 1.0:
            raise ValueError(
                f"rl_kd.baseline_decay must be in [0, 1) or null (no baseline), "
                f"got {params.baseline_decay}"
            )
        self.params = params
        self._policies: dict[str, torch.nn.Linear] | None = None
        self._slot = (-1, 0)
        self.pending: dict[int, _Pending] = {}
        """Microbatch slot -> the selection waiting for its reward."""
        self.baseline: dict[int, float] = {}
        """Microbatch slot -> running mean of its rewards."""
        self._noted_resume = False

    def taps(self, combiner: Combiner) -> list[Tap]:
        count = len(combiner.methods)
        return _teacher_taps(FeatureKind.LOGITS, count) + _teacher_taps(
            FeatureKind.FINAL_NORM, count
        )

    def runtime_state(self) -> dict[str, Any]:
        """The kept selections and the baselines, per microbatch slot (checkpointed per rank)."""
        return {
            "pending": {
                slot: {
                    "step": p.step,
                    "states": [x.cpu() for x in p.states],
                    "actions": p.actions.cpu(),
                }
                for slot, p in self.pending.items()
            },
            "baseline": dict(self.baseline),
        }

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        self.pending = {
            int(slot): _Pending(int(p["step"]), list(p["states"]), p["actions"])
            for slot, p in state.get("pending", {}).items()
        }
        self.baseline = {int(k): float(v) for k, v in state.get("baseline", {}).items()}

    def modules(self, combiner: Combiner) -> dict[str, torch.nn.Module]:
        if self._policies is None:
            if not combiner.teachers:
                raise RuntimeError("rl_kd.modules() needs the teachers' sizes (BuildContext)")
            self._policies = {}
            for k, info in enumerate(combiner.teachers):
                policy = torch.nn.Linear(info.hidden_size + self.STATE_STATS, 1)
                torch.nn.init.zeros_(policy.weight)  # pi = 0.5 for every teacher at the start
                torch.nn.init.zeros_(policy.bias)
                self._policies[f"policy_t{k}"] = policy
        return dict(self._policies)

    def module_layers(self, combiner: Combiner) -> dict[str, int]:
        return {f"policy_t{k}": -1 for k in range(len(combiner.methods))}

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return {
            "policy": at(self.params.policy_weight, ctx),
            "selected": LOG_ONLY,
            "reward": LOG_ONLY,
        }

    def warm(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` is in the warm-up (every teacher used, no policy trained)."""
        return step < self.params.warmup * total_steps

    def _next_slot(self, ctx: LossContext) -> int:
        """This call's microbatch slot within the step (0, 1, ... in schedule order)."""
        step, slot = self._slot
        self._slot = (ctx.step, slot + 1) if step == ctx.step else (ctx.step, 0)
        return self._slot[1]

    def sample(self, probs: torch.Tensor, ctx: LossContext, ids: torch.Tensor) -> torch.Tensor:
        """``[K, E]`` 0/1 actions drawn with probabilities ``probs``: sequence ``e``'s draws come
        from a generator seeded by the step and its label tokens (``ids == e``), the same on every
        rank and at every layout."""
        labels = require_labels(ctx, "rl_kd").reshape(-1).cpu()
        ids = ids.reshape(-1).cpu()
        count, num = probs.shape
        draws = torch.empty(count, num, dtype=torch.float64)
        for e in range(num):
            key = zlib.crc32(labels[ids == e].to(torch.int64).numpy().tobytes())
            seed = (self.params.seed * 1_000_003 + ctx.step * 7919 + key * 104_729) % (2**63)
            draws[:, e] = torch.rand(count, generator=torch.Generator().manual_seed(seed),
                                     dtype=torch.float64)  # fmt: skip
        return (draws.to(probs.device) < probs.double()).to(probs.dtype)

    def probabilities(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[K, E]`` ``pi_k = P(use teacher k)`` from each teacher's ``[E, h_k + 3]`` state."""
        assert self._policies is not None, (
            "rl_kd: the runtime builds the policy modules before the first step"
        )
        return torch.stack(
            [
                torch.sigmoid(policy(state.to(policy.weight))).squeeze(1).float()
                for policy, state in zip(self._policies.values(), states, strict=True)
            ]
        )

    @staticmethod
    def log_prob(probs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``log pi(a)`` elementwise for Bernoulli ``probs`` and 0/1 ``actions``."""
        return actions * torch.log(probs.clamp_min(1e-12)) + (1 - actions) * torch.log(
            (1 - probs).clamp_min(1e-12)
        )

    @staticmethod
    def states(
        features: Mapping[Tap, torch.Tensor], ctx: LossContext, count: int, batch: int
    ) -> list[torch.Tensor]:
        """Each teacher's ``[E, h_k + 3]`` state (no gradient), one row per example
        (``ctx.example_ids``), or per sequence of the microbatch (``E = b``) without them."""
        ids, num = ctx.segment_ids(batch), ctx.num_segments(batch)
        mask = ctx.distill_mask.reshape(-1).float()

        def mean(x: torch.Tensor) -> torch.Tensor:
            return per_example_mean(x.reshape(-1).float(), ids, mask, num)

        out = []
        for k in range(count):
            hidden = features[Tap(Role.TEACHER, FeatureKind.FINAL_NORM, teacher_index=k)].detach()
            logits = features[Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=k)]
            stats = _stats_of(logits, ctx)
            assert stats.cross_entropy is not None
            flat = hidden.float().reshape(-1, hidden.shape[-1])  # [s*b, h]: unambiguous at b = 1
            pooled = pool_by_example(flat, ids, "mean", mask=mask, num_examples=num)[0]
            scalars = torch.stack(
                [
                    mean(stats.cross_entropy),
                    mean(stats.max_prob),
                    mean(stats.entropy) / math.log(ctx.vocab_size),
                ],
                dim=1,
            )
            out.append(torch.cat([pooled, scalars], dim=1).detach())
        return out

    def reinforce(self, slot: int, reward: float, ctx: LossContext) -> torch.Tensor | None:
        """The REINFORCE loss of the selection kept in ``slot`` at the previous step, rewarded with
        ``reward`` (measured now, after that step's update); updates the slot's baseline."""
        pending = self.pending.pop(slot, None)
        previous = self.baseline.get(slot)
        decay = self.params.baseline_decay
        if decay is not None:
            self.baseline[slot] = (
                reward if previous is None else decay * previous + (1 - decay) * reward
            )
        if pending is None or pending.step != ctx.step - 1:
            if (
                pending is None and ctx.step > 0 and not self.warm(ctx.step - 1, ctx.total_steps)
                and not self._noted_resume
            ):  # fmt: skip
                self._noted_resume = True
                log.info(
                    "rl_kd: no selection kept from step %d (a run resumed at another layout: "
                    "selections are restored at the same layout only), so the policy is not "
                    "trained at step %d; it is from the next",
                    ctx.step - 1, ctx.step,
                )  # fmt: skip
            return None
        baseline = 0.0 if decay is None or previous is None else previous
        probs = self.probabilities(pending.states)
        log_prob = self.log_prob(probs, pending.actions.to(probs))  # [K, E]
        return -((reward - baseline) * log_prob.sum(0)).mean()

    def plan(
        self, combiner: Combiner, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> tuple[TokenWeights, dict[str, torch.Tensor]] | None:
        student = features.get(STUDENT_LOGITS)
        if student is None:
            return None
        slot = self._next_slot(ctx)
        count = len(combiner.methods)
        batch = features[Tap(Role.TEACHER, FeatureKind.FINAL_NORM, teacher_index=0)].shape[1]
        ids, num = ctx.segment_ids(batch), ctx.num_segments(batch)
        # The reward of the previous step's selection: -the student's cross entropy now, after the
        # update that used it (GLMKD l. 414-418).
        ce = _cross_entropy(student, ctx).reshape(-1).float()
        label_mask = ctx.loss_mask.reshape(-1).float()
        reward = -float((ce * label_mask).sum() / label_mask.sum().clamp_min(1.0))
        policy_loss = self.reinforce(slot, reward, ctx)
        if self.warm(ctx.step, ctx.total_steps):
            chosen = torch.ones(count, num, device=student.device)
        else:
            states = self.states(features, ctx, count, batch)
            with torch.no_grad():
                probs = self.probabilities(states)
            chosen = self.sample(probs, ctx, ids)
            self.pending[slot] = _Pending(ctx.step, states, chosen)
        share = chosen / count  # GLMKD: the mean over (sequence, teacher) of a_jk L_jk
        real = ids >= 0
        weights: TokenWeights = {
            k: torch.where(real, share[k][ids.clamp_min(0)], 0.0).to(ctx.loss_mask.dtype)
            for k in range(count)
        }  # s-major tokens; padding (id -1) gets no teacher
        if policy_loss is None:
            policy_loss = torch.zeros((), device=student.device)
        return weights, {
            "policy": policy_loss,
            "selected": chosen.mean().detach(),
            "reward": torch.tensor(reward, device=student.device),
        }


@dataclass(kw_only=True, frozen=True)
class DGKDParams:
    method: dict[str, Any] | str | None = None
    """The single-teacher method applied to each teacher, as a methods entry or a name; default:
    the soft cross entropy ``CE(p_t^T, p_s^T)`` at ``temperature`` (GLMKD's DGKD recipe)."""
    temperature: ScheduleLike = 10.0
    """Temperature of the default soft cross entropy (GLMKD's recipe: 10)."""
    survival: float = 0.75
    """Probability that a teacher is kept at a step (DGKD's stochastic learning)."""
    soft_weight: ScheduleLike = 0.5
    """Weight of the surviving teachers' summed terms (GLMKD's recipe: 0.5)."""
    hard_weight: ScheduleLike = 0.5
    """Weight of the student's own cross entropy on the labels (GLMKD's recipe: 0.5)."""
    seed: int = 0
    """Seed of the drops (combined with the step)."""


class DGKD:
    """Densely guided KD (Son et al. 2021, "Densely Guided Knowledge Distillation using Multiple
    Teacher Assistants", ICCV, eq. 3 and sec. 3.3): the teacher and all its assistants (the
    ``teachers:`` of the run) teach the student together, ``L = hard + sum_k d_k L_soft(s, t_k)``,
    where each ``d_k`` is kept (1) with probability ``survival`` and dropped (0) otherwise, drawn
    anew each step (stochastic learning; at least one teacher is kept: the one with the smallest
    draw). Defaults follow the authors' GLMKD recipe (``--avgmt_sum_loss --distill_ft_soft
    --distill_soft_rate=0.5 --distill_hard_rate=0.5 --distill_temperature=10``): soft cross entropy
    at T = 10, teachers' sum weighted 0.5, hard loss 0.5. The paper's own CIFAR setting (KL x T^2
    at T = 4, weights 1) is ``method: {name: kd, soft_loss: kl, temperature: 4, hard_weight: 0},
    soft_weight: 1, hard_weight: 1``."""

    name: ClassVar[str] = "dgkd"
    stages: ClassVar[frozenset[Stage]] = BOTH_STAGES
    paper: ClassVar[str] = "Son et al. 2021 (DGKD)"
    signals: ClassVar[str] = "every teacher's logits (or the inner method's signals), labels"
    Params: ClassVar[type] = DGKDParams
    default_soft: ClassVar[SoftLoss] = "ce"

    @classmethod
    def from_context(cls, params: DGKDParams, ctx: BuildContext) -> Combiner:
        return Combiner.build(cls(params), ctx)

    def __init__(self, params: DGKDParams) -> None:
        if not 0.0 < params.survival <= 1.0:
            raise ValueError(f"dgkd.survival must be in (0, 1], got {params.survival}")
        self.params = params

    def kept(self, step: int, count: int) -> list[bool]:
        """Which of ``count`` teachers survive at ``step`` (the same on every rank)."""
        draws = _uniform(step, self.params.seed, count, salt=17)
        keep = [bool(d < self.params.survival) for d in draws]
        if not any(keep):
            keep[int(draws.argmin())] = True
        return keep

    def plan(
        self, combiner: Combiner, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> tuple[TokenWeights, dict[str, torch.Tensor]]:
        keep = self.kept(ctx.step, len(combiner.methods))
        return {k: None for k, kept in enumerate(keep) if kept}, {}
