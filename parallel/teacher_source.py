"""Where a teacher's outputs come from: the :class:`TeacherSource` protocol (issue 17).

A distillation stage (:class:`parallel.stage.DistillationStage`) holds one source per teacher.
Per microbatch, on every pipeline stage, a source provides

* its part of the activation sent to the next stage (``send_width`` channels of the
  ``[s, b, sum(widths)]`` concatenation ``[teacher_0 | ... | student]``; 0: it sends nothing),
* the features of its taps on this stage (:meth:`TeacherSource.features`): on the last stage the
  vocab-parallel logits ``[s*b, V/tp]`` (or a :class:`~methods.fused_head.HeadInput`), or
  :class:`~methods.sparse_targets.SparseTargets` in their place,

and it says which features it can offer at all (:meth:`TeacherSource.offers`), so that a method
needing something else is refused before launch (:func:`check_methods_against_sources`).

Implementations:

* :class:`ColocatedTeacher`: today's teacher, a frozen megatron GPTModel slice on this stage run
  under ``no_grad`` in eval mode, its features captured by a :class:`~parallel.taps.TapRecorder`.
  Offers every feature.
* :class:`CachedTeacher`: a teacher cache written by ``gkd cache-teacher``
  (:mod:`gkd_cli.teacher_cache`). No parameters, sends nothing between stages; on the last stage
  it reads the microbatch's samples (``batch["sample_ids"]``: global sample ids, the same at any
  data-parallel size) and offers the teacher's ``LOGITS`` as sparse targets, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from methods.base import FeatureKind, Role, Tap
from parallel.taps import TapRecorder

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel


@runtime_checkable
class TeacherSource(Protocol):
    """What one teacher provides to a pipeline stage (see the module docstring)."""

    index: int
    """The teacher's index (``Tap.teacher_index``)."""
    send_width: int
    """Channels of the activation between stages that belong to this teacher (0: none)."""
    model: GPTModel | None
    """This stage's megatron module of the teacher, or ``None`` (no parameters here)."""

    def attach(self, taps: Iterable[Tap], *, fused: Callable[[], bool]) -> None:
        """Start capturing this teacher's ``taps`` (``fused()``: the fused output-layer path)."""
        ...

    def add_tap(self, tap: Tap) -> None: ...

    def offers(self, tap: Tap) -> bool:
        """Whether this source can provide ``tap`` at all."""
        ...

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        """This teacher's ``send_width`` channels of the received activation (or ``None``)."""
        ...

    def forward(self, inputs: dict, batch: dict, *, training: bool) -> torch.Tensor | None:
        """Run this stage's part for a microbatch: the activation to send on (``None`` when
        ``send_width`` is 0). ``inputs``: the model inputs (``input_ids``, ``position_ids``,
        ``attention_mask``, doubled when the stage doubles the batch); ``batch``: the stage's
        batch (``sample_ids``, masks, ...)."""
        ...

    def features(self) -> dict[Tap, Any]:
        """The features of the microbatch just computed (and forget them)."""
        ...


class ColocatedTeacher:
    """A frozen megatron GPTModel slice on this stage (the teacher as gkd always ran it)."""

    def __init__(self, model: GPTModel, *, index: int, hidden_size: int) -> None:
        self.model: GPTModel | None = model
        self.index = index
        self.send_width = hidden_size
        self.recorder: TapRecorder | None = None

    def attach(self, taps: Iterable[Tap], *, fused: Callable[[], bool]) -> None:
        assert self.model is not None
        self.recorder = TapRecorder(
            self.model, taps, role=Role.TEACHER, teacher_index=self.index, fused=fused
        )

    def add_tap(self, tap: Tap) -> None:
        assert self.recorder is not None
        self.recorder.add(tap)

    def offers(self, tap: Tap) -> bool:
        return True

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        assert self.model is not None
        self.model.set_input_tensor(tensor)

    def forward(self, inputs: dict, batch: dict, *, training: bool) -> torch.Tensor | None:
        assert self.model is not None
        with torch.no_grad():
            return self.model(**inputs)

    def features(self) -> dict[Tap, Any]:
        assert self.recorder is not None
        return self.recorder.pop()


CACHED_FEATURES = frozenset({FeatureKind.LOGITS})
"""What a cached teacher offers: its next-token distribution (as sparse targets) only."""


class CachedTeacher:
    """A teacher read from a cache (``gkd cache-teacher``): no parameters, nothing sent between
    stages; on the last stage, in training, the ``LOGITS`` feature is the microbatch's
    :class:`~methods.sparse_targets.SparseTargets` (``read(sample_ids) -> SparseTargets``, e.g.
    :meth:`gkd_cli.teacher_cache.CacheReader.read` with the sequence length bound).

    Evaluation (validation) offers nothing: the cache holds the training samples only, so the
    teacher's validation loss is not reported for a cached teacher."""

    def __init__(
        self,
        read: Callable[[Sequence[int]], Any],
        *,
        index: int,
        is_last_stage: bool,
        device: torch.device | None = None,
    ) -> None:
        self.read = read
        self.index = index
        self.send_width = 0
        self.model: GPTModel | None = None
        self.is_last_stage = is_last_stage
        self.device = device
        self.taps: set[Tap] = set()
        self._pending: dict[Tap, Any] = {}
        self.transform: Callable[[Any], Any] | None = None
        """Applied to the targets read (e.g. ``SparseTargets.remap`` for a compressed student
        vocabulary)."""

    def attach(self, taps: Iterable[Tap], *, fused: Callable[[], bool]) -> None:
        for tap in taps:
            self.add_tap(tap)

    def add_tap(self, tap: Tap) -> None:
        if tap.role is Role.TEACHER and tap.teacher_index == self.index:
            self.taps.add(tap)

    def offers(self, tap: Tap) -> bool:
        return tap.kind in CACHED_FEATURES

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        return None

    def forward(self, inputs: dict, batch: dict, *, training: bool) -> torch.Tensor | None:
        tap = Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=self.index)
        if not (self.is_last_stage and training and tap in self.taps):
            return None
        ids = batch.get("sample_ids")
        if ids is None:
            raise ValueError(
                "a cached teacher needs the global sample ids of each microbatch "
                "(batch['sample_ids']); the data loader of gkd distill provides them"
            )
        ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
        rows = int(inputs["input_ids"].shape[0])
        if rows != len(ids):
            raise ValueError(
                f"the microbatch runs {rows} sequences for {len(ids)} samples (a method doubles "
                "the batch or changes the inputs); such methods need a co-located teacher, not "
                "a cached one"
            )
        targets = self.read(ids)
        if self.device is not None:
            targets = targets.to(self.device)
        if self.transform is not None:
            targets = self.transform(targets)
        self._pending = {tap: targets}
        return None

    def features(self) -> dict[Tap, Any]:
        pending, self._pending = self._pending, {}
        return pending


def unsupported_features(taps: Iterable[Tap], offers: Callable[[Tap], bool]) -> list[Tap]:
    """The teacher taps in ``taps`` that a source (``offers``) cannot provide."""
    return [t for t in taps if t.role is Role.TEACHER and not offers(t)]


def describe_need(tap: Tap) -> str:
    """How a message names what a method needs of the teacher."""
    kind = tap.kind.value
    return f"{kind}[{tap.layer}]" if tap.layer is not None else kind


class TeacherForward:
    """The teacher alone, forward only, on this rank's TP/PP/DP slot (``gkd cache-teacher``).

    The teacher runs as the single model of a :class:`~parallel.stage.DistillationStage` (no
    other teacher, no optimizer), stepped by megatron-core's forward-only schedules, so every
    layout the distillation runs also runs here. On the last stage ``on_logits(logits, batch)``
    gets each microbatch's vocab-parallel logits ``[s*b, V/tp]`` (s-major) and its batch
    (``tokens``, ``sample_ids``)."""

    def __init__(
        self,
        *,
        ctx: Any,
        spec: Any,
        seq_length: int,
        precision: Any,
        on_logits: Callable[[torch.Tensor, dict], None],
    ) -> None:
        from parallel.components import build_teacher
        from parallel.model import detect_accelerators
        from parallel.stage import DistillationStage

        self.ctx = ctx
        self.seq_length = seq_length
        self.on_logits = on_logits
        self.model = build_teacher(
            spec,
            precision=precision,
            sequence_parallel=ctx.sequence_parallel,
            use_te=detect_accelerators().transformer_engine,
        )
        self.tap = Tap(Role.STUDENT, FeatureKind.LOGITS)  # the teacher is this stage's model
        self.stage = DistillationStage(
            self.model,
            [],
            taps=[self.tap],
            compute_fn=self._compute,
            context_fn=self._context,
            is_last_stage=ctx.is_last_stage,
        )
        self.stage.eval()
        self.hidden_size = spec.arch.hidden_size

    @staticmethod
    def _context(batch: dict) -> Any:
        return batch  # the compute function reads the batch itself (sample ids)

    def _compute(self, features: dict, batch: dict):
        if self.tap in features:
            self.on_logits(features[self.tap], batch)
        return None, {}

    def _forward_step(self, data_iterator, model):
        micro = next(data_iterator)
        tokens = micro["tokens"].to(self.ctx.device, non_blocking=True)
        inputs = tokens[:, :-1]
        b, s = inputs.shape
        batch = {
            "input_ids": inputs,
            "position_ids": torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s),
            "attention_mask": None,
            "sample_ids": micro["sample_ids"],
        }
        return model(batch), _passthrough

    @torch.no_grad()
    def run(self, microbatches: Sequence[dict]) -> None:
        """Forward ``microbatches`` (each ``tokens [b, s+1]`` and ``sample_ids [b]``, all of one
        ``b``) through the pipeline."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not microbatches:
            return
        b = int(microbatches[0]["tokens"].shape[0])
        s = self.seq_length // self.ctx.tp if self.ctx.sequence_parallel else self.seq_length

        def shapes(recv, send):
            shape = (s, b, self.hidden_size)
            return [shape], [shape]

        self.stage.microbatch_index = 0
        get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(microbatches),
            model=[self.stage],
            num_microbatches=len(microbatches),
            seq_length=self.seq_length,
            micro_batch_size=b,
            forward_only=True,
            adjust_tensor_shapes_fn=shapes if self.ctx.pp > 1 else None,
        )
        self.stage.tracker.pop()


def _passthrough(output: torch.Tensor):
    return output, {}
