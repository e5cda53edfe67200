"""Methods that change the forward pass: BERT-of-Theseus, DIITO and LRC-BERT.

They use the runtime's extension points (``methods.base.ForwardModifier``: torch hooks on the
layers the runtime lends them, a doubled microbatch, a gradient-perturbation second pass) instead
of forking the model code, so they run at any tensor/pipeline layout:

* ``theseus``: a forward hook on student layer ``i`` replaces its output, with the step's
  probability, by the output of the frozen teacher block it succeeds run on the same input.
* ``diito``: the microbatch runs doubled, ``[x; x]``; hooks at the aligned teacher and student layers
  overwrite a span of the second copy's hidden states with another sequence's (the interchange
  intervention). The paper's second forward pass is this batched second half: the same weights, one
  pipeline pass.
* ``lrc_bert``: every step is two passes (the runtime's ``perturb_embeddings``): the first records the
  gradient of the loss w.r.t. the student's embedding output, the second trains on embeddings moved
  along it.

Random draws come from generators seeded by the run's seed, the step and the microbatch, so every
rank (and both models) draws the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from methods.base import FeatureKind, ForwardHandles, LossContext, ModelInfo, Role, Stage, Tap
from methods.examples import pool_by_example
from methods.layer_mapping import uniform_layer
from methods.logit_common import (
    BOTH_LOGITS,
    STUDENT_LOGITS,
    TEACHER_LOGITS,
    at,
    cross_entropy,
    hard_term,
    soft_loss,
)
from methods.schedules import Linear, ScheduleLike, value_at

TASK_ONLY = frozenset({Stage.TASK})
PRETRAIN_ONLY = frozenset({Stage.PRETRAIN})
STUDENT_FINAL = Tap(Role.STUDENT, FeatureKind.FINAL_NORM)
TEACHER_FINAL = Tap(Role.TEACHER, FeatureKind.FINAL_NORM)


def _generator(seed: int, step: int, microbatch: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + step * 7919 + microbatch * 104_729 + salt) % (2**63)
    )


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


def _replace_first(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


# ----------------------------------------------------------------------------------------------
# BERT-of-Theseus


@dataclass(kw_only=True, frozen=True)
class TheseusParams:
    replace_rate: ScheduleLike = Linear(start=0.3, end=1.0, until=0.66)
    """Probability that a student layer (successor) is used instead of its teacher block
    (predecessor) at a step: rises linearly from 0.3 to 1 by 66% of training (the paper's
    curriculum)."""
    seed: int = 0
    """Added to the run's seed for the per-step replacement draws."""


class Theseus:
    """BERT-of-Theseus (Xu et al. 2020, "BERT-of-Theseus: Compressing BERT by Progressive Module
    Replacing", EMNLP, eqs. 4-7 and the replacement scheduler of sec. 3.3): the teacher's
    ``L_t`` layers form ``L_s`` blocks of ``L_t / L_s`` layers; at each step, each student layer
    ``i`` is used with probability ``p`` (Bernoulli ``r_i``), else teacher block ``i`` runs on the same
    input in its place (frozen weights, gradients flow through the hidden states), and the mixed
    model is trained with the hard loss only. ``p`` rises linearly from 0.3 to 1 by 66% of training,
    after which the student runs alone (GLMKD's recipe: ``--theseus_replacing_rate=0.3
    --theseus_not_replaced_steps=0.66 --distill_ft_hard``). Needs equal hidden sizes and head
    widths. GLMKD starts the student from the truncated teacher (``--student_truncate_tn=0``; gkd:
    ``student.checkpoint`` = the teacher's, ``student.init_layers: first`` or ``every:K``), so the
    teacher blocks first receive the teacher's own embeddings; from a random student they receive
    a random embedding's output. Value test with a deeper teacher of other weights:
    ``tests/unit/test_methods_theseus.py``."""

    name: ClassVar[str] = "theseus"
    stages: ClassVar[frozenset[Stage]] = TASK_ONLY
    paper: ClassVar[str] = "Xu et al. 2020 (BERT-of-Theseus)"
    signals: ClassVar[str] = "teacher layers (as modules), student logits, labels"
    Params: ClassVar[type] = TheseusParams
    needs_teacher: ClassVar[bool] = True

    def __init__(self, params: TheseusParams | None = None) -> None:
        self.params = params or TheseusParams()
        self.teacher: ModelInfo | None = None
        self.student: ModelInfo | None = None
        self.handles: ForwardHandles | None = None

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        if teacher.hidden_size != student.hidden_size:
            raise ValueError(
                f"theseus puts teacher layers in the student's place, so the widths must match: "
                f"teacher.hidden_size={teacher.hidden_size} != student.hidden_size={student.hidden_size}"
            )
        if (
            teacher.hidden_size // teacher.num_attention_heads
            != student.hidden_size // student.num_attention_heads
        ):
            raise ValueError(
                "theseus needs equal head widths (hidden_size / num_attention_heads) in teacher and "
                "student (they share the rotary embedding); match the num_attention_heads"
            )
        if teacher.num_layers % student.num_layers:
            raise ValueError(
                f"theseus replaces blocks of teacher.num_layers / student.num_layers layers: "
                f"{teacher.num_layers} is not a multiple of {student.num_layers}"
            )
        self.teacher, self.student = teacher, student
        return (STUDENT_LOGITS,)

    def use_student(self, step: int, total_steps: int) -> list[bool]:
        """Per student layer: ``True`` when the student layer runs at ``step`` (same on all ranks)."""
        assert self.student is not None
        rate = min(max(value_at(self.params.replace_rate, step, total_steps), 0.0), 1.0)
        seed = (self.handles.seed if self.handles is not None else 0) + self.params.seed
        draws = torch.rand(
            self.student.num_layers, generator=_generator(seed, step, 0, 31), dtype=torch.float64
        )
        return [bool(d < rate) for d in draws]

    def install(self, handles: ForwardHandles) -> None:
        if self.teacher is None or self.student is None:
            raise RuntimeError("theseus.install needs taps() first (the model sizes)")
        if not handles.teacher_layers:
            raise ValueError(
                "theseus needs a teacher (its layers stand in for the student's); add a teacher"
            )
        self.handles = handles
        block = self.teacher.num_layers // self.student.num_layers
        teacher_layers = handles.teacher_layers[0]
        for index, layer in handles.student_layers.items():
            predecessors = [teacher_layers[t] for t in range(index * block, (index + 1) * block)]
            layer.register_forward_hook(self._hook(index, predecessors), with_kwargs=True)

    def _hook(self, index: int, predecessors: list[torch.nn.Module]):
        def hook(module, args, kwargs, output):
            handles = self.handles
            if handles is None or not handles.is_training():
                return None
            if self.use_student(*handles.step())[index]:
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            result = output
            for layer in predecessors:
                result = (
                    layer(*args[1:], hidden_states=hidden, **rest)
                    if args
                    else layer(hidden_states=hidden, **rest)
                )
                hidden = _first(result)
            return _replace_first(output, hidden)

        return hook

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        loss = hard_term(features, ctx, self.name)
        return {} if loss is None else {"hard": loss}


# ----------------------------------------------------------------------------------------------
# DIITO


@dataclass(kw_only=True, frozen=True)
class DIITOParams:
    temperature: ScheduleLike = 2.0
    """Softmax temperature of the soft KL and of the intervention cross entropy."""
    soft_weight: ScheduleLike = 0.25
    """Weight of ``T^2 KL(p_t || p_s)`` (alpha_ce; GLMKD's DIITO recipe: 0.25 for each of the
    four terms, where DistilBERT's own weights are 5/2/1)."""
    hard_weight: ScheduleLike = 0.25
    """Weight of the student's LM cross entropy (alpha_mlm)."""
    cosine_weight: ScheduleLike = 0.25
    """Weight of ``1 - cos`` between the final hidden states (alpha_cos; needs equal widths, 0 drops it)."""
    iit_weight: ScheduleLike = 0.25
    """Weight of the interchange-intervention cross entropy (alpha_causal_ce)."""
    span: float = 0.3
    """Fraction of the sequence whose hidden states are swapped (consecutive tokens)."""
    student_layer: int | None = None
    """Student layer whose output is intervened on (0-based); default: the middle one. The aligned
    teacher layer ends the teacher block it stands for (uniform mapping)."""
    seed: int = 0
    """Added to the run's seed for the span draws."""


class DIITO:
    """DIITO, causal distillation by interchange intervention training (Wu et al. 2022, "Causal
    Distillation for Language Models", NAACL, sec. 3): DistilBERT's objective,
    ``T^2 KL(p_t^T || p_s^T)``, ``CE(y, p_s)`` and ``1 - cos(h_s, h_t)`` on the final hidden states,
    plus the interchange-intervention objective: in teacher and student alike, the hidden states of
    a span of ``span`` x the sequence at an aligned layer are replaced by those of another sequence
    (the next one in the microbatch; with one sequence, its own states ``span`` positions earlier),
    and the student's counterfactual prediction is trained to the teacher's with a soft cross
    entropy at T. The counterfactual run is the second half of a doubled microbatch (one pipeline
    pass, not a second pass). Weights: 0.25 each, as the authors' GLMKD recipe for GKD
    (``--diito_alpha_mlm=0.25 --diito_alpha_ce=0.25 --diito_alpha_causal_ce=0.25
    --diito_alpha_cos=0.25``, T = 2)."""

    name: ClassVar[str] = "diito"
    stages: ClassVar[frozenset[Stage]] = PRETRAIN_ONLY
    paper: ClassVar[str] = "Wu et al. 2022 (causal distillation, DIITO)"
    signals: ClassVar[str] = (
        "logits, final hidden states, intervened hidden states of an aligned layer, labels"
    )
    Params: ClassVar[type] = DIITOParams

    def __init__(self, params: DIITOParams | None = None) -> None:
        self.params = params or DIITOParams()
        if not 0.0 < self.params.span < 1.0:
            raise ValueError(f"diito.span must be a fraction in (0, 1), got {self.params.span}")
        self.layers: tuple[int, int] | None = None
        self.handles: ForwardHandles | None = None

    def _cosine(self) -> bool:
        return self.params.cosine_weight != 0.0

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        if self._cosine() and teacher.hidden_size != student.hidden_size:
            raise ValueError(
                f"diito's cosine term compares final hidden states of equal width, but "
                f"teacher.hidden_size={teacher.hidden_size} != student.hidden_size={student.hidden_size}; "
                "set cosine_weight: 0 or match the widths"
            )
        layer = self.params.student_layer
        if layer is None:
            layer = max(student.num_layers // 2 - 1, 0)
        if not 0 <= layer < student.num_layers:
            raise ValueError(f"diito.student_layer={layer} is outside 0..{student.num_layers - 1}")
        self.layers = (uniform_layer(layer, teacher.num_layers, student.num_layers), layer)
        taps = list(BOTH_LOGITS)
        if self._cosine():
            taps += [TEACHER_FINAL, STUDENT_FINAL]
        return taps

    def install(self, handles: ForwardHandles) -> None:
        if self.layers is None:
            raise RuntimeError("diito.install needs taps() first (the aligned layers)")
        if not handles.teacher_layers:
            raise ValueError("diito needs a teacher; add one")
        self.handles = handles
        handles.double_batch()
        teacher_layer, student_layer = self.layers
        for layers, index in (
            (handles.student_layers, student_layer),
            (handles.teacher_layers[0], teacher_layer),
        ):
            if index in layers:
                layers[index].register_forward_hook(self._intervene)

    def span_mask(self, length: int, step: int, microbatch: int) -> torch.Tensor:
        """``[length]`` bool: the swapped positions of this step's microbatch."""
        width = max(1, round(self.params.span * length))
        seed = (self.handles.seed if self.handles is not None else 0) + self.params.seed
        start = int(
            torch.randint(
                0, length - width + 1, (1,), generator=_generator(seed, step, microbatch, 53)
            )
        )
        mask = torch.zeros(length, dtype=torch.bool)
        mask[start : start + width] = True
        return mask

    def _intervene(self, module, args, output):
        handles = self.handles
        if handles is None or not handles.is_training():
            return None
        hidden = _first(output)  # [s, 2b, h]
        length, doubled = hidden.shape[0], hidden.shape[1]
        b = doubled // 2
        base, counterfactual = hidden[:, :b], hidden[:, b:]
        if b > 1:
            source = base.roll(shifts=-1, dims=1)  # sequence j takes sequence j+1's states
        else:
            source = base.roll(shifts=max(1, round(self.params.span * length)), dims=0)
        mask = self.span_mask(length, handles.step()[0], handles.microbatch()).to(hidden.device)
        swapped = torch.where(mask.view(-1, 1, 1), source, counterfactual)
        return _replace_first(output, torch.cat([base, swapped], dim=1))

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return {
            "soft": at(self.params.soft_weight, ctx),
            "hard": at(self.params.hard_weight, ctx),
            "cos": at(self.params.cosine_weight, ctx),
            "iit": at(self.params.iit_weight, ctx),
        }

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        student, teacher = features.get(STUDENT_LOGITS), features.get(TEACHER_LOGITS)
        if student is None or teacher is None:
            return {}
        temperature = at(self.params.temperature, ctx)
        mask = ctx.distill_mask
        terms = {
            "soft": soft_loss("kl", student, teacher, mask, ctx, temperature),
            "hard": cross_entropy(student, ctx, self.name),
        }
        if self._cosine() and STUDENT_FINAL in features:
            hs, ht = features[STUDENT_FINAL].float(), features[TEACHER_FINAL].float()
            cos = F.cosine_similarity(hs, ht, dim=-1).reshape(-1)
            terms["cos"] = ((1.0 - cos) * mask).sum() / mask.sum().clamp_min(1.0)
        counterfactual = ctx.extras.get("counterfactual")
        if counterfactual and STUDENT_LOGITS in counterfactual:
            terms["iit"] = soft_loss(
                "ce", counterfactual[STUDENT_LOGITS], counterfactual[TEACHER_LOGITS], mask, ctx,
                temperature,
            )  # fmt: skip
        return terms


# ----------------------------------------------------------------------------------------------
# LRC-BERT


@dataclass(kw_only=True, frozen=True)
class LRCBERTParams:
    temperature: ScheduleLike = 1.1
    """Softmax temperature of the soft cross entropy."""
    soft_weight: ScheduleLike = 1.0
    """Weight of the soft cross entropy to the teacher."""
    hard_weight: ScheduleLike = 3.0
    """Weight of the student's own cross entropy on the labels."""
    contrastive_weight: ScheduleLike = 1.0
    """Weight of the contrastive loss on intermediate representations."""
    tau: float = 1.0
    """Temperature of the softmax over cosine similarities."""
    epsilon: float = 1.0
    """Size of the gradient perturbation of the embedding output (L2 norm per sequence); 0 turns
    the second pass off."""


class LRCBERT:
    """LRC-BERT (Fu et al. 2021, "LRC-BERT: Latent-representation Contrastive Knowledge Distillation
    for Natural Language Understanding", AAAI, eqs. 3-6 and sec. 3.3): for each student layer ``l``
    and the teacher layer ending the block it stands for, the student's sequence representation
    (hidden states mean-pooled over the sequence) is projected to the teacher's width by a learned
    ``W_l`` and trained to be closer in cosine to the teacher's representation of the same sequence
    than to the teacher's representations of the other sequences of the batch (negatives gathered
    over data parallelism): ``-log softmax_j(cos(W_l z_s,i, z_t,j) / tau)[i]``; plus soft cross
    entropy (T = 1.1) and 3 x the hard loss. Training is gradient-perturbed: each step first computes
    the gradient of the loss w.r.t. the embedding output, then trains on embeddings moved by
    ``epsilon`` along the normalized gradient."""

    name: ClassVar[str] = "lrc_bert"
    stages: ClassVar[frozenset[Stage]] = TASK_ONLY
    paper: ClassVar[str] = "Fu et al. 2021 (LRC-BERT)"
    signals: ClassVar[str] = (
        "hidden states of mapped layers, logits, labels; embedding-output gradient"
    )
    Params: ClassVar[type] = LRCBERTParams

    def __init__(self, params: LRCBERTParams | None = None) -> None:
        self.params = params or LRCBERTParams()
        if self.params.tau <= 0:
            raise ValueError(f"lrc_bert.tau must be > 0, got {self.params.tau}")
        if self.params.epsilon < 0:
            raise ValueError(f"lrc_bert.epsilon must be >= 0, got {self.params.epsilon}")
        self.pairs: list[tuple[int, int]] = []
        self.sizes: tuple[int, int] | None = None
        self._projections: dict[str, torch.nn.Module] | None = None

    def layer_pairs(self, teacher: ModelInfo, student: ModelInfo) -> list[tuple[int, int]]:
        """``(student, teacher)`` pairs: every student layer with the end of its teacher block."""
        return [
            (s, uniform_layer(s, teacher.num_layers, student.num_layers))
            for s in range(student.num_layers)
        ]

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        self.pairs = self.layer_pairs(teacher, student)
        self.sizes = (teacher.hidden_size, student.hidden_size)
        taps = list(BOTH_LOGITS)
        for s, t in self.pairs:
            taps += [
                Tap(Role.TEACHER, FeatureKind.HIDDEN, t),
                Tap(Role.STUDENT, FeatureKind.HIDDEN, s),
            ]
        return taps

    def modules(self) -> dict[str, torch.nn.Module]:
        if self._projections is None:
            if self.sizes is None:
                raise RuntimeError("lrc_bert.modules() needs taps() first (the model sizes)")
            teacher_width, student_width = self.sizes
            self._projections = {
                f"proj_l{s}": torch.nn.Linear(student_width, teacher_width) for s, _ in self.pairs
            }
        return dict(self._projections)

    def module_layers(self) -> dict[str, int]:
        return {f"proj_l{s}": s for s, _ in self.pairs}

    def install(self, handles: ForwardHandles) -> None:
        if self.params.epsilon > 0:
            handles.perturb_embeddings(self.params.epsilon)

    def term_weights(self, ctx: LossContext) -> dict[str, float]:
        return {
            "soft": at(self.params.soft_weight, ctx),
            "hard": at(self.params.hard_weight, ctx),
            "contrastive": at(self.params.contrastive_weight, ctx),
        }

    def contrastive(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        mask: torch.Tensor,
        projection: torch.nn.Module,
        dp_group: dist.ProcessGroup | None,
        example_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One layer pair's loss. ``student`` ``[s, b, h_s]`` and ``teacher`` ``[s, b, h_t]``,
        replicated over tp; ``mask`` ``[s*b]``. Samples are the rows, or the examples of
        ``example_ids`` (``[s*b]``, -1 on padding) when given; negatives come from every
        sample of the data-parallel group (ranks may hold different numbers of examples)."""
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        if example_ids is None:
            weights = mask.view(student.shape[0], student.shape[1], 1).to(student.dtype)
            count = weights.sum(0).clamp_min(1.0)
            z_s = projection((student * weights).sum(0) / count).to(acc)  # [b, h_t]
            z_t = (
                ((teacher * weights.to(teacher.dtype)).sum(0) / count.to(teacher.dtype))
                .detach()
                .to(acc)
            )
        else:
            z_s = projection(pool_by_example(student, example_ids, "mean", mask=mask)[0]).to(acc)
            z_t = pool_by_example(teacher, example_ids, "mean", mask=mask)[0].detach().to(acc)
        offset = 0
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            world = dist.get_world_size(dp_group)
            sizes_t = torch.tensor([z_t.shape[0]], dtype=torch.long, device=z_t.device)
            all_sizes = [torch.zeros_like(sizes_t) for _ in range(world)]
            dist.all_gather(all_sizes, sizes_t, group=dp_group)
            sizes = [int(x.item()) for x in all_sizes]
            padded = torch.zeros(max(sizes), z_t.shape[1], dtype=z_t.dtype, device=z_t.device)
            padded[: z_t.shape[0]] = z_t
            gathered = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(gathered, padded.contiguous(), group=dp_group)
            offset = sum(sizes[: dist.get_rank(dp_group)])
            z_t = torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)])
        sims = (
            F.cosine_similarity(z_s[:, None, :], z_t[None, :, :], dim=-1) / self.params.tau
        )  # [b, B]
        target = torch.arange(z_s.shape[0], device=sims.device) + offset
        return F.cross_entropy(sims, target)

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        contrastive = None
        for s, t in self.pairs:
            student = features.get(Tap(Role.STUDENT, FeatureKind.HIDDEN, s))
            teacher = features.get(Tap(Role.TEACHER, FeatureKind.HIDDEN, t))
            if student is None or teacher is None:
                continue
            assert self._projections is not None, (
                "lrc_bert: the runtime builds the projections first"
            )
            value = self.contrastive(
                student,
                teacher,
                ctx.distill_mask,
                self._projections[f"proj_l{s}"],
                ctx.dp_group,
                ctx.example_ids,
            )
            contrastive = value if contrastive is None else contrastive + value
        if contrastive is not None:
            terms["contrastive"] = contrastive
        student, teacher = features.get(STUDENT_LOGITS), features.get(TEACHER_LOGITS)
        if student is not None and teacher is not None:
            temperature = at(self.params.temperature, ctx)
            terms["soft"] = soft_loss("ce", student, teacher, ctx.distill_mask, ctx, temperature)
            terms["hard"] = cross_entropy(student, ctx, self.name)
        return terms
