"""Choice data at the task stage: option scores per example group, and the task-stage terms of
GKD's and GLMD's methods on them.

Design
======

Data. A *choice record* is ``{"prompt": str, "options": [str, ...], "label": int | null}`` (a
JSON line; :mod:`gkd_cli.data.choices` reads it, ``data.source: superglue`` with
``data.choices: true`` writes one per task example from the evaluation prompt, the label only with
``data.labels: true``). Each record is a *group*; each of its ``K`` options becomes one example,
``prompt + option_j``, whose targets (loss mask) are the option's tokens alone (no end-of-document
token: the option score is exactly ``log p(option | prompt)`` as ``gkd eval superglue`` scores it).
A group is placed whole into one row of the ``[s, b]`` token grid (its examples one after the
other, attention block-diagonal, positions restarting per example: the row's examples never see
each other), so batching can never split a group across microbatches or data-parallel ranks; a
group longer than ``seq_length`` is refused before the first step. The collated microbatch carries,
per example of the microbatch, its group (numbered ``0 .. G-1`` within the microbatch) and option
index, and per group its label (``-1``: none). The runtime hands them to methods as
``LossContext.choices`` (:class:`ChoiceBatch`).

Scores. :func:`option_scores` turns one model's logits into class scores ``[G, K]``: the sum (or
the mean, length-normalized like lm-evaluation-harness's ``acc_norm`` per token) of
``log p(y_n)`` over each option's target tokens, ``-inf`` where a group has fewer than ``K``
options. ``log p(y)`` of a vocabulary-sharded row is ``z_y - logsumexp(z)`` with the maximum
(all-reduce MAX, no gradient), the sum of exponentials and the label's logit (all-reduce SUM,
identity backward) combined over the tensor-parallel group, so every rank gets the same scores.
Only the option rows are touched: from materialized logits they are gathered, from the fused
head's :class:`~methods.fused_head.HeadInput` their logits are computed (``hidden[rows] @ W^T``,
differentiable), so the fused path stays valid and nothing vocabulary-sized is built for the other
tokens.

Terms (GLMKD, ``distill/distill_model.py`` at commit 8d6cf11, ``GLMStudent.pre_loss``'s
``finetune`` branch, lines 255-277, on the class logits ``(batch_size, class_num)``):

- soft ``ce`` (GLMKD's default, L265-267): ``mean_g sum_k -softmax(t_g/T)_k log_softmax(s_g/T)_k``;
- soft ``kl`` (``--distill_ft_soft_kl``, L262-264): ``T^2 mean_g KL(softmax(t_g/T) || softmax(s_g/T))``;
- soft ``mse`` (``--distill_ft_soft_mse``, L258-260, used by Annealing-KD and Continuation-KD with
  the teacher scaled by ``Phi``): ``mean over groups and options of (s - Phi t)^2``
  (``CustomLoss.mse_loss``: a mean over every element, ``custom_loss.py`` L72-75, L34-53);
- hard (L272-277): the student's cross entropy of the class scores against the label.

``kd``, ``pd``, ``annealing_kd`` and ``continuation_kd`` (:mod:`methods.prediction`) switch to these
when the microbatch has ``ctx.choices``; ``glmd`` distills the whole-vocabulary word prediction at
each group's answer position (the last prompt token, once per group: all options share the prompt)
with no labels; ``glmd_soft`` (:class:`GLMDSoft`) is GLMD's optional third step, the soft cross
entropy at ``T = 1`` between the option-score distributions (GLMKD's readme, "LogitsDistil" step 3:
``--student_model=logitsdistil --distill_ft_soft --logitsdistil_wo_inter`` with the default
``--distill_temperature=1``, ``distill/prepare.py`` L33). GLMD's class scores are the verbalizer
logits at the mask position; for a single-token option those differ from our log-probabilities by
the group's ``logsumexp``, a constant that softmax ignores (the ``ce``/``kl``/hard terms are the
same), but ``mse`` sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from methods.base import LossContext, ModelInfo, Stage, Tap
from methods.schedules import ScheduleLike, value_at

Tensor = torch.Tensor
ClassSoft = Literal["ce", "kl", "mse"]


@dataclass(frozen=True)
class ChoiceBatch:
    """The choice structure of one microbatch (see the module docstring)."""

    group_ids: Tensor
    """``[E]`` int64: the group (``0 .. G-1``, in row order) of each example of the microbatch
    (numbered like ``LossContext.example_ids``)."""
    option_index: Tensor
    """``[E]`` int64: which option of its group each example is (``0 .. K-1``)."""
    labels: Tensor
    """``[G]`` int64: each group's right option, ``-1`` when the data have no label."""

    @property
    def num_groups(self) -> int:
        return int(self.labels.numel())

    @property
    def num_options(self) -> int:
        """``K``: the most options of any group of the microbatch."""
        return int(self.option_index.max().item()) + 1 if self.option_index.numel() else 0

    def to(self, device: torch.device | str) -> ChoiceBatch:
        return ChoiceBatch(
            self.group_ids.to(device), self.option_index.to(device), self.labels.to(device)
        )

    def require_labels(self, method: str) -> Tensor:
        """``labels`` when every group has one, else a ``ValueError`` naming the fix."""
        if self.num_groups and bool((self.labels < 0).any()):
            raise ValueError(
                f"method {method!r} trains on the task's labels (its hard term), but the choice "
                "data have none: set data.labels: true (data.source: superglue) or give every "
                "record a 'label', or set the method's hard_weight: 0"
            )
        return self.labels


# ---------------------------------------------------------------------------------------------
# log p(label) of selected rows, vocabulary-parallel


def rows_logits(feature: Any, rows: Tensor) -> Tensor:
    """``[R, V/tp]`` logits of the flat token rows ``rows`` from a ``LOGITS`` feature: the
    materialized ``[N, V/tp]`` logits, or the fused head's ``HeadInput`` (computed for those rows
    only, with the head's transform)."""
    from methods.fused_head import is_head_input

    if is_head_input(feature):
        logits = feature.hidden[rows] @ feature.weight.t()
        return logits if feature.transform is None else feature.transform(logits)
    return feature[rows]  # type: ignore[no-any-return]


def label_logprobs(
    feature: Any,
    labels: Tensor,
    rows: Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
) -> Tensor:
    """``[R]`` ``log softmax(z)[labels[rows]]`` at the flat rows ``rows`` of vocab-sharded logits
    (this rank holds columns ``vocab_start ..``; columns at or beyond ``vocab_size`` are padding),
    equal on every tensor-parallel rank; differentiable with respect to the logits (fp32, fp64
    when the logits are fp64)."""
    from methods.intermediate.common import tp_sum as _tp_sum  # forward SUM, backward identity

    z = rows_logits(feature, rows)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.to(acc)
    columns = torch.arange(z.shape[-1], device=z.device) + vocab_start
    z = z.masked_fill(columns >= vocab_size, float("-inf"))
    peak = z.detach().max(dim=-1).values
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_group)
    exp_sum = _tp_sum(torch.exp(z - peak.unsqueeze(-1)).sum(-1), tp_group)
    target = labels.reshape(-1)[rows].to(z.device) - vocab_start
    local = (target >= 0) & (target < z.shape[-1])
    picked = z.gather(-1, target.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    picked = _tp_sum(torch.where(local, picked, torch.zeros_like(picked)), tp_group)
    return picked - peak - torch.log(exp_sum)


# ---------------------------------------------------------------------------------------------
# option scores


def option_rows(ctx: LossContext) -> Tensor:
    """Flat indices of the positions whose label is an option token (``loss_mask > 0`` inside an
    example of a group)."""
    ids = ctx.segment_ids()
    return torch.nonzero((ctx.loss_mask > 0) & (ids >= 0)).squeeze(1)


def scores_from_token_logprobs(
    choices: ChoiceBatch,
    token_logprobs: Tensor,
    example_of_token: Tensor,
    *,
    normalize: bool = False,
) -> Tensor:
    """``[G, K]`` option scores from per-token ``log p`` values ``[R]`` and the example each token
    belongs to ``[R]``: the sum over each option's tokens (``normalize``: the mean), ``-inf`` for
    the missing options of groups with fewer than ``K``."""
    num_examples = int(choices.group_ids.numel())
    sums = torch.zeros(num_examples, dtype=token_logprobs.dtype, device=token_logprobs.device)
    sums = sums.index_add(0, example_of_token, token_logprobs)
    if normalize:
        counts = torch.zeros_like(sums).index_add(
            0, example_of_token, torch.ones_like(token_logprobs)
        )
        sums = sums / counts.clamp_min(1.0)
    g, k = choices.num_groups, choices.num_options
    scores = torch.full((g, k), float("-inf"), dtype=sums.dtype, device=sums.device)
    group = choices.group_ids.to(sums.device)
    option = choices.option_index.to(sums.device)
    return scores.index_put((group, option), sums)


def option_scores(feature: Any, ctx: LossContext, *, normalize: bool = False) -> Tensor:
    """``[G, K]`` class scores of one model from its ``LOGITS`` feature (``[N, V/tp]`` or a
    ``HeadInput``) on ``ctx.labels`` (the student's vocabulary; a teacher restricted to a
    compressed vocabulary has the same columns): ``sum_n log p(y_n)`` over each option's tokens
    (``normalize``: per token), ``-inf`` for missing options."""
    choices = ctx.choices
    if choices is None:
        raise ValueError("option_scores needs choice data (LossContext.choices)")
    if ctx.labels is None:
        raise ValueError("option_scores needs the option tokens (LossContext.labels)")
    rows = option_rows(ctx)
    logp = label_logprobs(
        feature,
        ctx.labels,
        rows,
        vocab_start=ctx.vocab_start,
        vocab_size=ctx.vocab_size,
        tp_group=ctx.tp_group,
    )
    return scores_from_token_logprobs(choices, logp, ctx.segment_ids()[rows], normalize=normalize)


def group_answer_rows(ctx: LossContext) -> Tensor:
    """``[G]`` flat index of each group's answer position: the last prompt token (whose next
    token is the option's first) of the group's first example. Every option of a group shares the
    prompt and never sees another option, so one position per group stands for all."""
    choices = ctx.choices
    if choices is None:
        raise ValueError("group_answer_rows needs choice data (LossContext.choices)")
    last_prompt, _ = ctx.answer_positions()
    group = choices.group_ids.to(last_prompt.device)
    big = torch.iinfo(torch.long).max
    first = torch.full((choices.num_groups,), big, dtype=torch.long, device=last_prompt.device)
    valid = last_prompt >= 0
    first = first.scatter_reduce(0, group[valid], last_prompt[valid], reduce="amin")
    return first[first < big]


def group_answer_mask(ctx: LossContext) -> Tensor:
    """``[N]`` float mask, 1 at each group's answer position (:func:`group_answer_rows`)."""
    mask = torch.zeros_like(ctx.loss_mask, dtype=torch.float32)
    rows = group_answer_rows(ctx)
    mask[rows.to(mask.device)] = 1.0
    return mask.to(ctx.loss_mask.dtype)


# ---------------------------------------------------------------------------------------------
# terms on class scores [G, K] (GLMKD distill_model.py GLMStudent.pre_loss, finetune branch)


def _valid(*scores: Tensor) -> Tensor:
    mask = torch.isfinite(scores[0])
    for s in scores[1:]:
        mask = mask & torch.isfinite(s)
    return mask


def class_soft(student: Tensor, teacher: Tensor, kind: ClassSoft, temperature: float = 1.0,
               teacher_scale: float = 1.0) -> Tensor:  # fmt: skip
    """The soft term between class scores ``[G, K]`` (``-inf`` missing options), mean over groups:
    ``ce`` ``-sum_k softmax(t/T)_k log_softmax(s/T)_k``; ``kl`` ``T^2 KL(softmax(t/T) ||
    softmax(s/T))``; ``mse`` the mean over present entries of ``(s - teacher_scale t)^2`` (no
    temperature). GLMKD distill_model.py L258-267."""
    teacher = teacher.detach()
    valid = _valid(student, teacher)
    if student.shape[0] == 0:
        return student.sum() * 0.0
    if kind == "mse":
        diff = torch.where(valid, student - teacher_scale * teacher, torch.zeros_like(student))
        return (diff * diff).sum() / valid.sum().clamp_min(1)
    log_s = torch.log_softmax(student / temperature, dim=-1)
    p_t = torch.softmax(teacher / temperature, dim=-1)
    zero = torch.zeros_like(log_s)
    if kind == "ce":
        per_group = -torch.where(valid, p_t * log_s, zero).sum(-1)
        return per_group.mean()
    if kind == "kl":
        log_t = torch.log_softmax(teacher / temperature, dim=-1)
        per_group = torch.where(valid, p_t * (log_t - log_s), zero).sum(-1)
        return per_group.mean() * temperature**2
    raise ValueError(f"soft loss must be ce, kl or mse, got {kind!r}")


def class_hard(student: Tensor, labels: Tensor, *, per_group: bool = False) -> Tensor:
    """The student's cross entropy of its class scores against ``labels`` ``[G]`` (mean over
    groups; ``per_group``: ``[G]``). GLMKD distill_model.py L272-277 (the hard ``loss``)."""
    log_s = torch.log_softmax(student, dim=-1)
    nll = -log_s.gather(-1, labels.to(student.device).unsqueeze(-1)).squeeze(-1)
    return nll if per_group else nll.mean()


def class_mse_per_group(student: Tensor, teacher: Tensor, teacher_scale: float) -> Tensor:
    """``[G]``: each group's mean over its options of ``(s - scale t)^2`` (GLMKD's ``mse_loss``
    with ``keep_batch=True``, as Continuation_KD asks, distill_model.py L2235)."""
    teacher = teacher.detach()
    valid = _valid(student, teacher)
    diff = torch.where(valid, student - teacher_scale * teacher, torch.zeros_like(student))
    return (diff * diff).sum(-1) / valid.sum(-1).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# GLMD's third step


@dataclass(kw_only=True, frozen=True)
class GLMDSoftParams:
    temperature: ScheduleLike = 1.0
    """Softmax temperature of the option-score distributions (GLMD: 1)."""
    normalize: bool = False
    """Score an option by its mean token log-probability instead of the sum (lm-eval's
    ``acc_norm`` per token)."""


class GLMDSoft:
    """GLMD's optional third step (Tan et al. 2023, arXiv 2306.06625, sec. 3; GLMKD readme
    "LogitsDistil" step 3, ``--distill_ft_soft`` at ``--distill_temperature=1``): the soft cross
    entropy ``-sum_k softmax(t/T)_k log softmax(s/T)_k`` between the teacher's and the student's
    distributions over each task example's option scores (``log p(option | prompt)``), mean over
    examples, no labels. Needs choice data (``data.choices: true``) at the task stage."""

    name: ClassVar[str] = "glmd_soft"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.TASK})
    paper: ClassVar[str] = "Tan et al. 2023 (GLMD, third step)"
    signals: ClassVar[str] = "option scores of both models (choice data)"
    Params: ClassVar[type] = GLMDSoftParams
    fused_head: ClassVar[bool] = True
    requires_choices: ClassVar[bool] = True

    def __init__(self, params: GLMDSoftParams | None = None) -> None:
        self.params = params or GLMDSoftParams()

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        from methods.logit_common import BOTH_LOGITS

        return BOTH_LOGITS

    def compute(self, features: Mapping[Tap, Any], ctx: LossContext) -> dict[str, Tensor]:
        if ctx.choices is None:
            raise ValueError(
                "glmd_soft distills option scores and needs choice data: set data.choices: true "
                "(data.source: superglue, data.mode: padded or packed) or give choice records"
            )
        from methods.logit_common import both_logits

        logits = both_logits(features)
        if logits is None:
            return {}
        scores = pair_scores(logits, ctx, self.params.normalize)
        temperature = value_at(self.params.temperature, ctx.step, ctx.total_steps)
        return {"soft": class_soft(*scores, "ce", temperature)}


__all__: Sequence[str] = (
    "ChoiceBatch",
    "GLMDSoft",
    "class_hard",
    "class_soft",
    "label_logprobs",
    "option_scores",
    "scores_from_token_logprobs",
)


def pair_scores(
    logits: tuple[Any, Any], ctx: LossContext, normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """``(student [G, K], teacher [G, K])`` option scores from ``(student, teacher)`` logits (the
    teacher's without gradient)."""
    student, teacher = logits
    with torch.no_grad():
        t = option_scores(teacher, ctx, normalize=normalize)
    return option_scores(student, ctx, normalize=normalize), t


CHOICE_LABEL_METHODS = ("lm", "kd", "continuation_kd")
"""Methods whose task-stage hard term trains on the choice labels."""


def needs_choice_labels(name: str, params: Any) -> bool:
    """Whether method ``name`` with ``params`` trains on choice labels (its hard term is on)."""
    if name not in CHOICE_LABEL_METHODS:
        return False
    weight = getattr(params, "hard_weight", 1.0)
    return not (isinstance(weight, int | float) and weight == 0)
