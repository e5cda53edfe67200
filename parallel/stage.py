"""One pipeline stage of a distillation job: the teachers' sources, then the student's layers.

megatron-core's schedules see a single module per stage. :class:`DistillationStage` is that module:

* Each teacher is a :class:`~parallel.teacher_source.TeacherSource`: a co-located megatron slice
  (:class:`~parallel.teacher_source.ColocatedTeacher`) or a cache
  (:class:`~parallel.teacher_source.CachedTeacher`, which sends nothing between stages).
* The activation passed between stages is the concatenation ``[teacher_0 | ... | student]`` along
  the hidden axis (``[s, b, send_width + h]``, each source's ``send_width`` channels first);
  :meth:`set_input_tensor` splits it again. The teacher parts are detached: no gradient flows into
  a teacher, and the zeros sent back for them cost only bandwidth.
* Co-located teachers run under ``torch.no_grad`` in eval mode. They are kept out of this module's
  parameter tree (held in a plain list), so megatron's DDP, the optimizer and checkpoints never
  see them.
* Method modules (``methods.base.HasModules``: projections, policies) are this module's submodule
  ``method_modules`` (see :mod:`parallel.method_modules`), so DDP and the optimizer train them.
* Features requested by the methods are captured by :class:`~parallel.taps.TapRecorder` hooks.
  Loss terms computable on this stage are computed right after the forward; on an intermediate
  stage they are attached to the student's activation with :class:`AttachAuxLoss` (megatron-core's
  MoE aux-loss trick), so features never cross stages. The last stage returns the total loss.

Extension points for methods that change the forward pass (``methods.base.ForwardModifier``; the
runtime's :class:`~parallel.forward_hooks.RuntimeHandles` drives them):

* ``forward_hooks``: callables ``hook(stage, batch)`` run before each microbatch's forward.
* ``batch_multiplier = 2`` (training only): the models run on ``[x; x]``; methods get the features
  of the first half, those of the second half in ``ctx.extras["counterfactual"]``.
* ``embedding_mode``: ``"record"`` keeps the gradient of the student's embedding output per
  microbatch (``embedding_grads``), ``"perturb"`` adds ``embedding_epsilon`` times that gradient,
  normalized per sequence, to the embedding output (gradient-perturbation second pass).
* ``microbatch_index``: the microbatch being computed within the current schedule run.

Output layer and logit losses (:mod:`methods.fused_head`): ``head_path`` is ``"materialized"``
(the output layers build ``[N, V/tp]`` logits, captured as features) or ``"fused"`` (in training
on the last stage, the ``LOGITS`` features are :class:`~methods.fused_head.HeadInput` values and
the losses compute the logits chunk by chunk). :func:`configure_head_path` picks it once per run.

:class:`StepState` is the optimizer step being computed: one small object that the runtime advances
and that the loss context and the forward handles read (nothing reaches into the runtime for it).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from methods import fused_head
from methods.base import FeatureKind, LossContext, Role, Tap
from methods.fused_head import HeadInput
from parallel.memory import PeakTracker
from parallel.taps import TapRecorder
from parallel.teacher_source import ColocatedTeacher, TeacherSource

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

log = logging.getLogger(__name__)


@dataclass
class StepState:
    """The optimizer step being computed: written by the runtime's ``train_step``, read by the loss
    context (``LossContext.step``) and by the forward handles (``ForwardHandles.step()``)."""

    total_steps: int
    """``train.steps``."""
    step: int = 0
    """0-based step being computed (the last one computed between steps)."""


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``activation`` whose backward also back-propagates ``aux_loss`` with gradient
    ``scale`` (1 / num_microbatches, the same scaling the schedule applies to the final loss)."""

    scale: float = 1.0

    @staticmethod
    def forward(ctx, activation: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return activation

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, AttachAuxLoss.scale)


class TermTracker:
    """Per-step sums of the (unweighted) loss terms and the total, for logging."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(
        self, terms: dict[str, torch.Tensor], total: torch.Tensor | None, weight: float
    ) -> None:
        for name, value in terms.items():
            self.sums[name] += float(value) * weight
        if total is not None:
            self.sums["loss"] += float(total.detach()) * weight

    def pop(self) -> dict[str, float]:
        sums, self.sums = dict(self.sums), defaultdict(float)
        return sums


class DistillationStage(torch.nn.Module):
    """This rank's slice of the teachers and the student (see module docstring).

    ``context_fn(batch) -> LossContext`` builds the loss context for a microbatch;
    ``compute_fn(features, ctx) -> (total, terms)`` is the method pipeline.
    """

    def __init__(
        self,
        student: GPTModel,
        teachers: Sequence[TeacherSource],
        *,
        taps: Sequence[Tap],
        compute_fn: Callable,
        context_fn: Callable[[dict], LossContext],
        is_last_stage: bool,
        method_modules: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        # megatron's helpers (get_attr_wrapped_model) unwrap ``.module`` to reach the GPTModel.
        self.module = student
        # A plain list: the teachers' modules are not registered as submodules, on purpose.
        self.sources: list[TeacherSource] = list(teachers)
        self.is_last_stage = is_last_stage
        self.compute_fn = compute_fn
        self.context_fn = context_fn
        self.head_path = fused_head.MATERIALIZED
        """``"fused"`` or ``"materialized"`` (see the module docstring; :func:`configure_head_path`)."""
        self.student_taps = TapRecorder(student, taps, role=Role.STUDENT, fused=self.fused_active)
        for source in self.sources:
            source.attach(taps, fused=self.fused_active)
        self.tracker = TermTracker()
        self.memory = PeakTracker()
        """Allocated-bytes high-water mark, sampled after each microbatch's loss (the peak of a
        step: activations, logits and the loss's stored gradient are all alive then)."""
        self.microbatch_weight = 1.0
        self.feature_transforms: dict[Tap, Callable[[torch.Tensor], torch.Tensor]] = {}
        """Applied to captured features before any loss (e.g. masking padding slots of a
        compressed vocabulary)."""
        self.training_transforms: dict[Tap, Callable[[torch.Tensor], torch.Tensor]] = {}
        """Applied only in training (e.g. restricting the teacher's logits to the student's kept
        vocabulary; evaluation scores the teacher on its own vocabulary)."""
        self.forward_hooks: list[Callable] = []
        """Extension point: callables ``hook(stage, batch)`` run before each microbatch's forward
        (methods that change the forward pass install themselves here)."""
        self.method_modules = method_modules
        """Trainable modules of the methods on this stage (a registered submodule), or ``None``."""
        self.batch_multiplier = 1
        """2: training microbatches run as ``[x; x]`` (see the module docstring)."""
        self.microbatch_index = 0
        """Microbatch being computed within the current schedule run (reset by the runtime)."""
        self.embedding_mode: str | None = None
        """``None``, ``"record"`` or ``"perturb"`` (see the module docstring)."""
        self.embedding_epsilon = 0.0
        self.embedding_grads: dict[int, torch.Tensor] = {}
        """``[s, b, h]`` gradient of the student's embedding output per microbatch index."""
        self._embedding_hook = None
        embedding = getattr(student, "embedding", None)
        if getattr(student, "pre_process", False) and embedding is not None:
            self._embedding_hook = embedding.register_forward_hook(self._embedding_output)

    def fused_active(self) -> bool:
        """Whether this forward takes the fused output-layer path (training, last stage)."""
        return (
            self.head_path == fused_head.FUSED
            and self.is_last_stage
            and self.training
            and not self.doubled
        )

    def add_tap(self, tap: Tap) -> None:
        self.student_taps.add(tap)
        for source in self.sources:
            source.add_tap(tap)

    @property
    def teachers(self) -> list[GPTModel]:
        """The megatron modules of the teachers that run on this stage (co-located sources)."""
        return [s.model for s in self.sources if s.model is not None]

    @property
    def teacher_taps(self) -> list[TapRecorder]:
        """The tap recorders of the co-located teachers."""
        return [s.recorder for s in self.sources if isinstance(s, ColocatedTeacher) and s.recorder]

    @property
    def send_width(self) -> int:
        """Channels of the teachers' part of the activation between stages."""
        return sum(s.send_width for s in self.sources)

    @property
    def config(self):
        return self.module.config

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list | tuple):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            for source in self.sources:
                source.set_input_tensor(None)
            self.module.set_input_tensor(None)
            return
        start = 0
        for source in self.sources:
            width = source.send_width
            source.set_input_tensor(input_tensor[..., start : start + width] if width else None)
            start += width
        self.module.set_input_tensor(input_tensor[..., start:])

    def _embedding_output(self, module, args, output):
        if not self.training or self.embedding_mode is None:
            return None
        index = self.microbatch_index
        if self.embedding_mode == "record":
            if output.requires_grad:
                output.register_hook(
                    lambda grad: self.embedding_grads.__setitem__(index, grad.detach())
                )
            return None
        grad = self.embedding_grads.get(index)
        if grad is None:
            return None
        # One direction per sequence: [s, b, h] normalized over (s, h) of each b.
        norm = grad.float().pow(2).sum(dim=(0, 2), keepdim=True).sqrt().clamp_min(1e-12)
        return output + (self.embedding_epsilon * grad.float() / norm).to(output.dtype)

    @property
    def doubled(self) -> bool:
        return self.training and self.batch_multiplier == 2

    def forward(self, batch: dict) -> torch.Tensor:
        for hook in self.forward_hooks:
            hook(self, batch)
        input_ids = batch["input_ids"]
        student_ids = batch.get("student_input_ids", input_ids)
        position_ids = batch["position_ids"]
        attention_mask = batch.get("attention_mask")  # [b, 1, s, s] for packed rows, else None
        if self.doubled:
            input_ids, student_ids, position_ids = (
                torch.cat([x, x]) for x in (input_ids, student_ids, position_ids)
            )
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask])
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        teacher_outputs = []
        for source in self.sources:
            output = source.forward(inputs, batch, training=self.training)
            if output is not None:
                teacher_outputs.append(output)
        student_output = self.module(**{**inputs, "input_ids": student_ids})
        self.microbatch_index += 1

        features: dict[Tap, torch.Tensor] = {}
        for source in self.sources:
            features.update(source.features())
        features.update(self.student_taps.pop())
        transforms = dict(self.feature_transforms)
        if self.training:
            transforms.update(self.training_transforms)
        for tap, transform in transforms.items():
            if tap in features:
                value = features[tap]
                if isinstance(value, HeadInput):  # applied to each chunk of logits
                    features[tap] = value.then(transform)
                else:
                    features[tap] = transform(value)
        ctx = self.context_fn(batch)
        if self.doubled:
            features, ctx.extras["counterfactual"] = split_doubled(
                features, batch["input_ids"].shape[0]
            )
        total, terms = self.compute_fn(features, ctx)
        self.memory.sample()
        del features
        if not terms:
            total = None
        self.tracker.add(terms, total, self.microbatch_weight)

        if self.is_last_stage:
            if total is None:
                # No term here at this step (e.g. SID's or MobileBERT's prediction loss before all
                # layers are unlocked): a zero that still carries the backward to earlier stages,
                # whose auxiliary losses ride on the activations.
                total = student_output.float().sum() * 0.0
            return total
        if total is not None:
            student_output = AttachAuxLoss.apply(student_output, total)
        return torch.cat([*(t.detach() for t in teacher_outputs), student_output], dim=-1)


def configure_head_path(
    stage: DistillationStage, pipeline: Any, teacher: Any, student: Any
) -> tuple[str, str]:
    """Pick the output-layer path of ``stage`` for ``pipeline``'s methods
    (:func:`methods.fused_head.choose_head_path`; ``teacher``/``student`` are the ``ModelInfo``
    passed to the methods' ``taps``), set ``stage.head_path``, log it, return ``(path, reason)``."""
    path, reason = fused_head.choose_head_path(pipeline, teacher, student)
    if path == fused_head.FUSED:
        problem = fused_head.output_layers_fusable([stage.module, *stage.teachers])
        if problem is not None:
            path, reason = fused_head.MATERIALIZED, problem
    stage.head_path = path
    log.info(fused_head.describe(path, reason))
    return path, reason


def split_doubled(features: dict[Tap, torch.Tensor], b: int) -> tuple[dict, dict]:
    """Split features of a doubled microbatch (``2b`` sequences) into its two halves."""
    first: dict[Tap, torch.Tensor] = {}
    second: dict[Tap, torch.Tensor] = {}
    for tap, value in features.items():
        if tap.kind is FeatureKind.LOGITS:  # [s*2b, V/tp], s-major
            grid = value.view(-1, 2 * b, value.shape[-1])
            first[tap] = grid[:, :b].reshape(-1, value.shape[-1])
            second[tap] = grid[:, b:].reshape(-1, value.shape[-1])
        elif tap.kind in (FeatureKind.ATTENTION_SCORES, FeatureKind.ATTENTION_PROBS):  # [2b, ...]
            first[tap], second[tap] = value[:b], value[b:]
        else:  # [s, 2b, ...]
            first[tap], second[tap] = value[:, :b], value[:, b:]
    return first, second
