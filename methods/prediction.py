"""Prediction-layer methods of GKD's collection: the student's own LM loss, KD, PD, GLMD,
Annealing-KD and Continuation-KD, each implementing :class:`methods.base.Method` with a
keyword-only parameters dataclass. Those computed from both models' logits alone are declarations
of their terms and weights (:func:`methods.logit_common.logit_method`): KD is the soft term plus
the hard term weighted by ``soft_weight`` and ``hard_weight``, and so on; they share helpers, never
a base class.

All losses are vocab-parallel (:mod:`methods.vocab_parallel`): features are
``Tap(role, LOGITS)`` tensors ``[N, V/tp]`` sharded over ``ctx.tp_group``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from methods import choices as ch
from methods import vocab_kernels as vk
from methods import vocab_parallel as vp
from methods.base import BuildContext, LossContext, ModelInfo, Stage, Tap
from methods.logit_common import (
    BOTH_LOGITS,
    STUDENT_LOGITS,
    at,
    both_logits,
    cross_entropy,
    hard_term,
    logit_method,
    soft_hard_weights,
    soft_loss,
)
from methods.schedules import ScheduleLike

BOTH_STAGES = frozenset({Stage.PRETRAIN, Stage.TASK})
TASK_ONLY = frozenset({Stage.TASK})


def _annealed_mse(
    logits: tuple[torch.Tensor, torch.Tensor], ctx: LossContext, max_temperature: int, margin: float
) -> torch.Tensor:
    """``mean_i max(|z_s,i - Phi z_t,i| - margin, 0)^2`` with Annealing-KD's teacher scale
    ``Phi`` at ``ctx.step``, masked mean over ``ctx.loss_mask``."""
    scale = _annealing_factor(ctx.step, ctx.total_steps, max_temperature)
    kernel = vk.mse_kernel(teacher_scale=scale, margin=margin)
    return vp.divergence(kernel, *logits, ctx.loss_mask, vp.VocabShard.of(ctx))


def _annealing_factor(step: int, total_steps: int, max_temperature: int) -> float:
    """Annealing-KD's teacher scale ``Phi(T) = 1 - (T - 1) / tau_max`` (Jafari et al. 2021),
    with the annealing temperature ``T`` stepping down from ``tau_max`` to 1 as training goes:
    ``T = max(1, ceil((1 - step / total_steps) * tau_max))``, as the GKD implementation does. So
    ``Phi`` rises in ``tau_max`` equal steps from ``1 / tau_max`` to 1."""
    total = max(total_steps, 1)
    remaining = max(total - step, 0) * max_temperature  # exact integer ceil, no float rounding
    temperature = max(1, -(-remaining // total))
    return 1.0 - (temperature - 1) / max_temperature


@dataclass(kw_only=True, frozen=True)
class LMParams:
    """The student's own next-token loss has no parameters."""


class LM:
    """The student's next-token cross entropy on the labels (no teacher): ``-log p_s(y_n)``
    averaged over the tokens of ``loss_mask``. Mixed into distillation as the "hard" term. On
    choice data (``ctx.choices``) the cross entropy of the student's option scores against each
    example's label, as GLMKD fine-tunes on a task (:mod:`methods.choices`)."""

    name: ClassVar[str] = "lm"
    stages: ClassVar[frozenset[Stage]] = BOTH_STAGES
    paper: ClassVar[str] = "next-token cross entropy (language-model loss)"
    signals: ClassVar[str] = "student logits, labels"
    Params: ClassVar[type] = LMParams
    fused_head: ClassVar[bool] = True

    def __init__(self, params: LMParams | None = None) -> None:
        self.params = params or LMParams()

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        return (STUDENT_LOGITS,)

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        if ctx.choices is not None:
            student = features.get(STUDENT_LOGITS)
            if student is None:
                return {}
            labels = ctx.choices.require_labels(self.name)
            return {"ce": ch.class_hard(ctx.option_scores(student), labels)}
        loss = hard_term(features, ctx, self.name)
        return {} if loss is None else {"ce": loss}


@dataclass(kw_only=True, frozen=True)
class KDParams:
    temperature: ScheduleLike = 10.0
    """Softmax temperature T of both models (10 in the GKD examples)."""
    soft_loss: Literal["ce", "kl"] = "ce"
    """Soft term: cross entropy to the teacher's soft targets (as GKD), or KL x T^2 (Hinton's
    gradient-scale correction)."""
    soft_weight: ScheduleLike = 1.0
    """Weight of the soft term."""
    hard_weight: ScheduleLike = 1.0
    """Weight of the hard term (the student's cross entropy on the labels); 0 drops it."""


def _kd_terms(
    params: KDParams, logits: tuple[torch.Tensor, torch.Tensor], ctx: LossContext, name: str
) -> dict[str, torch.Tensor]:
    temperature = at(params.temperature, ctx)
    if ctx.choices is not None:  # task stage on choice data: GLMKD's terms on class scores
        student, teacher = ch.pair_scores(logits, ctx)
        terms = {"soft": ch.class_soft(student, teacher, params.soft_loss, temperature)}
        if params.hard_weight != 0.0:
            labels = ctx.choices.require_labels(name)
            terms["hard"] = ch.class_hard(student, labels)
        return terms
    terms = {"soft": soft_loss(params.soft_loss, *logits, ctx.loss_mask, ctx, temperature)}
    if params.hard_weight != 0.0:
        terms["hard"] = cross_entropy(logits[0], ctx, name)
    return terms


def _kd_terms_one_head_pass(
    params: KDParams, logits: tuple[torch.Tensor, torch.Tensor], ctx: LossContext, name: str
) -> dict[str, torch.Tensor]:
    """:func:`_kd_terms`; on the fused head path the soft and hard terms share one pass over the
    student's output layer (:func:`methods.fused_head.soft_and_hard`, issue 18)."""
    from methods import fused_head
    from methods.logit_common import require_labels

    student = logits[0]
    plain = params.hard_weight == 0.0 or getattr(ctx, "choices", None) is not None
    if plain or not fused_head.is_head_input(student):
        return _kd_terms(params, logits, ctx, name)
    weights = soft_hard_weights(params, ctx)
    soft, hard = fused_head.soft_and_hard(
        params.soft_loss,
        *logits,
        require_labels(ctx, name),
        ctx.loss_mask,
        vp.VocabShard.of(ctx),
        temperature=at(params.temperature, ctx),
        soft_weight=weights["soft"],
        hard_weight=weights["hard"],
    )
    return {"soft": soft, "hard": hard}


KD = logit_method(
    "KD",
    name="kd",
    params=KDParams,
    terms=_kd_terms_one_head_pass,
    weights=soft_hard_weights,
    stages=TASK_ONLY,
    paper="Hinton et al. 2015",
    fused_head=True,
    signals="logits, labels",
    doc="""Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
    Network", sec. 2): ``soft_weight * H(p_t^T, p_s^T) + hard_weight * CE(y, p_s)`` where ``p^T`` is the
    softmax at temperature T (eq. 1); with ``soft_loss: kl`` the soft term is
    ``T^2 KL(p_t^T || p_s^T)``, which keeps its gradient scale independent of T (sec. 2).
    On choice data (``ctx.choices``, task stage) both terms are on each example's option scores
    as GLMKD's fine-tuning does (``distill/distill_model.py`` L255-277): the soft term between
    ``softmax(scores/T)`` of teacher and student (``kl``: times T^2), the hard term the cross
    entropy of the student's scores against the label (:mod:`methods.choices`).""",
)


@dataclass(kw_only=True, frozen=True)
class PDParams:
    temperature: ScheduleLike = 1.0
    """Softmax temperature of the distillation stage (Turc et al. use 1)."""


class PD:
    """Pre-trained distillation (Turc et al. 2019, "Well-Read Students Learn Better: On the
    Importance of Pre-training Compact Models", arXiv 1908.08962):
    first pre-train the compact student with its own LM loss and no teacher (pretrain stage: term
    ``lm``), then distill on task data with the soft cross entropy to the teacher's predictions,
    ``-sum_i p_t,i log p_s,i`` (task stage: term ``soft``, at T = 1). On choice data the soft cross
    entropy is between the option-score distributions (GLMKD readme "PD" step 2,
    ``--distill_ft_soft --distill_temperature=1``; :mod:`methods.choices`)."""

    name: ClassVar[str] = "pd"
    stages: ClassVar[frozenset[Stage]] = BOTH_STAGES
    paper: ClassVar[str] = "Turc et al. 2019"
    signals: ClassVar[str] = "logits (task stage); student logits, labels (pretrain stage)"
    Params: ClassVar[type] = PDParams
    fused_head: ClassVar[bool] = True

    def __init__(self, params: PDParams | None = None, *, stage: Stage | None = None) -> None:
        self.params = params or PDParams()
        self.stage = stage

    @classmethod
    def from_context(cls, params: PDParams, ctx: BuildContext) -> PD:
        """PD built for the run's stage: its taps depend on it."""
        return cls(params, stage=ctx.stage)

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        # The pre-training stage runs without a teacher: do not make the runtime compute one.
        return (STUDENT_LOGITS,) if self.stage == Stage.PRETRAIN else BOTH_LOGITS

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        if ctx.stage == Stage.PRETRAIN:
            student = features.get(STUDENT_LOGITS)
            return {} if student is None else {"lm": cross_entropy(student, ctx, self.name)}
        logits = both_logits(features)
        if logits is None:
            return {}
        temperature = at(self.params.temperature, ctx)
        if ctx.choices is not None:  # GLMKD's PD recipe: --distill_ft_soft at T=1 on class scores
            return {"soft": ch.class_soft(*ch.pair_scores(logits, ctx), "ce", temperature)}
        return {"soft": soft_loss("ce", *logits, ctx.loss_mask, ctx, temperature)}


def _glmd_mask(ctx: LossContext) -> torch.Tensor:
    """GLMD's positions: every non-padding position, or each choice group's answer position."""
    return ch.group_answer_mask(ctx) if ctx.choices is not None else ctx.distill_mask


@dataclass(kw_only=True, frozen=True)
class GLMDParams:
    temperature: ScheduleLike = 15.0
    """Softmax temperature T of both models (GLMD uses 15); the KL is multiplied by T^2."""


GLMD = logit_method(
    "GLMD",
    name="glmd",
    params=GLMDParams,
    terms=lambda p, logits, ctx, name: {
        "kl": soft_loss("kl", *logits, _glmd_mask(ctx), ctx, at(p.temperature, ctx))
    },
    paper="Tan et al. 2023 (GLMD)",
    fused_head=True,
    signals="all vocabulary logits at every non-pad position",
    doc="""GLMD's word-prediction distillation (Tan et al. 2023, "Are Intermediate Layers and Labels
    Really Necessary? A General Language Model Distillation Method", arXiv 2306.06625), its loss
    ``T^2 KL(p_t^T || p_s^T)`` over
    the whole vocabulary at every non-padding position (``ctx.token_mask``, else ``loss_mask``),
    with no hard labels and no intermediate layers, in both the pre-training and the task stage.
    On choice data (``ctx.choices``, task stage) only at each task example's answer position
    (the last prompt token, once per example whatever its number of options), where GLM predicts
    the answer word: no option text and no label is distilled. The paper's optional third step,
    a soft cross entropy on option scores, is the method ``glmd_soft``.""",
)


@dataclass(kw_only=True, frozen=True)
class AnnealingKDParams:
    max_temperature: int = 7
    """tau_max: the teacher scale rises in tau_max steps from 1/tau_max to 1 (GKD uses 7)."""


def _annealing_term(
    params: Any, logits: tuple[torch.Tensor, torch.Tensor], ctx: LossContext
) -> torch.Tensor:
    if ctx.choices is None:
        return _annealed_mse(logits, ctx, params.max_temperature, margin=0.0)
    # GLMKD Annealing_KD.pre_loss (distill_model.py L2134-2140): mse(s, Phi t) on class scores.
    phi = _annealing_factor(ctx.step, ctx.total_steps, params.max_temperature)
    return ch.class_soft(*ch.pair_scores(logits, ctx), "mse", teacher_scale=phi)


def _check_annealing(where: str) -> Callable[[Any], None]:
    def check(params: Any) -> None:
        if params.max_temperature < 1:
            raise ValueError(f"{where}.max_temperature must be >= 1, got {params.max_temperature}")
        if getattr(params, "margin", 0.0) < 0:
            raise ValueError(f"{where}.margin must be >= 0, got {params.margin}")

    return check


AnnealingKD = logit_method(
    "AnnealingKD",
    name="annealing_kd",
    params=AnnealingKDParams,
    terms=lambda p, logits, ctx, name: {"mse": _annealing_term(p, logits, ctx)},
    check=_check_annealing("annealing_kd"),
    fused_head=True,
    stages=TASK_ONLY,
    paper="Jafari et al. 2021",
    doc="""Annealing KD (Jafari et al. 2021, "Annealing Knowledge Distillation", EACL, arXiv
    2104.07163), its first phase's loss ``||z_s - Phi(T) z_t||^2`` between raw logits, ``Phi(T) = 1 - (T - 1) / tau_max`` with ``T``
    stepping down from ``tau_max`` to 1 over training (mean over the vocabulary, as GKD's
    ``F.mse_loss``). The paper's second phase (hard labels only, no teacher) is a separate run
    with the ``lm`` method. On choice data (``ctx.choices``) the MSE is between the option scores,
    mean over examples and options, as GLMKD's Annealing_KD on class logits
    (``distill_model.py`` L2134-2140, ``--distill_ft_soft_mse``).""",
)


@dataclass(kw_only=True, frozen=True)
class ContinuationKDParams:
    max_temperature: int = 10
    """tau_max of the annealed teacher scale ``Phi``, as in annealing_kd (GLMKD's recipe: 10)."""
    margin: float = 1.0
    """Per-sample threshold of the soft term, relative to ``Phi``: a sample whose soft MSE is at
    most ``margin x Phi`` contributes nothing (GLMKD's recipe: 1)."""
    psi_denominator: float = 1.333
    """The hard weight is ``psi = step / (psi_denominator x steps)`` (GLMKD: 1.333)..."""
    psi_switch: float = 0.666
    """... until ``psi_switch`` of training, after which ``psi = 1``: hard loss only (GLMKD:
    0.666)."""


def continuation_psi(step: int, total_steps: int, denominator: float, switch: float) -> float:
    """Continuation KD's hard-loss weight ``psi`` (the soft weight is ``1 - psi``): linear from 0
    at ``step / (denominator x total)``, then 1 once ``step > switch x total`` (GLMKD's
    Continuation_KD.pre_loss with ``--continuation_kd_psi_denominator=1.333
    --continuation_kd_psi_sep=0.666``: 0 -> 0.5 over the first two thirds, then 1)."""
    total = max(total_steps, 1)
    if step > switch * total:
        return 1.0
    return min(step / (denominator * total), 1.0)


def _check_continuation(params: Any) -> None:
    _check_annealing("continuation_kd")(params)
    if params.psi_denominator <= 0:
        raise ValueError(
            f"continuation_kd.psi_denominator must be > 0, got {params.psi_denominator}"
        )
    if not 0.0 <= params.psi_switch <= 1.0:
        raise ValueError(f"continuation_kd.psi_switch must be in [0, 1], got {params.psi_switch}")


def per_sample_annealed_mse(
    logits: tuple[torch.Tensor, torch.Tensor], ctx: LossContext, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([E] per-sample MSE, [E] bool has tokens)``: for each sample (example; each row without
    example ids), the mean over its ``loss_mask`` tokens and the real vocabulary of
    ``(z_s - scale z_t)^2``. Vocab-parallel: each rank sums its own columns, and the per-token
    sums are added over the tensor-parallel group (forward all-reduce, backward identity)."""
    from methods.intermediate.common import tp_sum

    student, teacher = logits
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    diff = student.to(acc) - scale * teacher.to(acc)
    columns = torch.arange(diff.shape[-1], device=diff.device) + ctx.vocab_start
    diff = diff.masked_fill(columns >= ctx.vocab_size, 0.0)
    per_token = tp_sum((diff * diff).sum(-1), ctx.tp_group) / ctx.vocab_size  # [N]
    ids = ctx.segment_ids()
    count = ctx.num_segments()
    weights = ctx.loss_mask.to(acc) * (ids >= 0).to(acc)
    index = ids.clamp_min(0)
    sums = torch.zeros(count, dtype=acc, device=diff.device).index_add(
        0, index, per_token * weights
    )
    tokens = torch.zeros(count, dtype=acc, device=diff.device).index_add(0, index, weights)
    return sums / tokens.clamp_min(1.0), tokens > 0


def _continuation_terms(
    params: ContinuationKDParams,
    logits: tuple[torch.Tensor, torch.Tensor],
    ctx: LossContext,
    name: str,
) -> dict[str, torch.Tensor]:
    phi = _annealing_factor(ctx.step, ctx.total_steps, params.max_temperature)
    if ctx.choices is not None:  # GLMKD Continuation_KD.pre_loss on class scores (L2230-2246)
        labels = ctx.choices.require_labels(name)
        student, teacher = ch.pair_scores(logits, ctx)
        per_group = ch.class_mse_per_group(student, teacher, phi)
        hinge = per_group * (per_group.detach() > params.margin * phi)
        return {"soft": hinge.mean(), "hard": ch.class_hard(student, labels)}
    per_sample, valid = per_sample_annealed_mse(logits, ctx, phi)
    # GLMKD: loss_soft x (loss_soft > margin x Phi), a hinge per sample, then the batch mean.
    active = (per_sample.detach() > params.margin * phi) & valid
    soft = (per_sample * active).sum() / valid.sum().clamp_min(1)
    return {"soft": soft, "hard": cross_entropy(logits[0], ctx, name)}


def _continuation_weights(params: ContinuationKDParams, ctx: LossContext) -> dict[str, float]:
    psi = continuation_psi(ctx.step, ctx.total_steps, params.psi_denominator, params.psi_switch)
    return {"soft": 1.0 - psi, "hard": psi}


ContinuationKD = logit_method(
    "ContinuationKD",
    name="continuation_kd",
    params=ContinuationKDParams,
    terms=_continuation_terms,
    weights=_continuation_weights,
    check=_check_continuation,
    stages=TASK_ONLY,
    paper="Jafari et al. 2022",
    signals="logits, labels",
    doc="""Continuation KD (Jafari et al. 2022, "Continuation KD: Improved Knowledge Distillation
    through the Lens of Continuation Optimization", EMNLP Findings, arXiv 2212.05998), as the
    authors of GKD implement it (GLMKD's Continuation_KD): the annealed teacher target ``Phi z_t``
    of Annealing KD (``Phi`` rising in ``tau_max`` steps from ``1/tau_max`` to 1), a soft MSE per
    sample ``m_i = mean over its tokens and the vocabulary of (z_s - Phi z_t)^2`` that counts
    only when it exceeds the margin, ``soft = mean_i m_i 1[m_i > margin Phi]`` (samples already
    close to the annealed teacher are left alone), and the hard cross entropy, mixed as
    ``(1 - psi) soft + psi hard`` with ``psi = step / (1.333 steps)`` rising to 0.5 over the first
    two thirds of training and 1 after (the objective continues from the smooth teacher-matching
    one to the task loss). A sample is an example in example-aware batches (``data.mode: padded |
    packed``), a sequence row otherwise. On choice data (``ctx.choices``) a sample is a task
    example and both terms are on its option scores (GLMKD distill_model.py L2230-2246 with
    ``--distill_ft_soft_mse --distill_ft_hard``).""",
)
