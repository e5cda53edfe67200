"""The runtime's side of ``methods.base.ForwardHandles``: what methods that change the forward pass
(Theseus, DIITO, LRC-BERT) may use, and nothing more.

* ``student_layers`` / ``teacher_layers``: this stage's megatron-core transformer layers by global
  index, for ``register_forward_hook`` / ``register_forward_pre_hook`` (plain torch hooks).
* ``step()``, ``microbatch()``, ``is_training()``, ``seed``: for per-step random draws that every
  rank makes identically.
* ``double_batch()``: :attr:`parallel.stage.DistillationStage.batch_multiplier` = 2.
* ``perturb_embeddings(epsilon)``: the two-pass train step of
  :meth:`parallel.runtime.DistillationRuntime.train_step`.

:class:`RuntimeHandles` reads and sets only what it is given: the
:class:`~parallel.stage.DistillationStage` (layers, microbatch index, training mode, the doubled
batch, the embedding perturbation) and the :class:`~parallel.stage.StepState` that the runtime
advances. :func:`install_forward_modifiers` lends them to every method that asks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from methods.base import ForwardHandles, ForwardModifier
from parallel.stage import DistillationStage, StepState


def _layers_by_index(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return {}
    return {layer.layer_number - 1: layer for layer in decoder.layers}


class RuntimeHandles:
    """``methods.base.ForwardHandles`` over one stage of the runtime (see the module docstring)."""

    student_layers: Mapping[int, torch.nn.Module]
    teacher_layers: Sequence[Mapping[int, torch.nn.Module]]
    seed: int

    def __init__(self, stage: DistillationStage, step_state: StepState, *, seed: int) -> None:
        self._stage = stage
        self._step_state = step_state
        self.student_layers = _layers_by_index(stage.module)
        self.teacher_layers = [_layers_by_index(t) for t in stage.teachers]
        self.seed = seed

    def step(self) -> tuple[int, int]:
        return self._step_state.step, self._step_state.total_steps

    def microbatch(self) -> int:
        return self._stage.microbatch_index

    def is_training(self) -> bool:
        return self._stage.training

    def double_batch(self) -> None:
        self._stage.batch_multiplier = 2

    def perturb_embeddings(self, epsilon: float) -> None:
        if not epsilon > 0:
            raise ValueError(f"embedding perturbation epsilon must be > 0, got {epsilon}")
        self._stage.embedding_epsilon = float(epsilon)


def install_forward_modifiers(
    entries: Iterable, handles: ForwardHandles, *, sequence_parallel: bool
) -> None:
    """``install(handles)`` of every method entry (``name``, ``method``) that is a
    ``methods.base.ForwardModifier``, in pipeline order. Raises ``ValueError`` under sequence
    parallelism, which these methods do not support."""
    for entry in entries:
        if not isinstance(entry.method, ForwardModifier):
            continue
        if sequence_parallel:
            # Their hooks see layer inputs of [s/tp, b, h] (per-sequence norms, token swaps).
            raise ValueError(
                f"method {entry.name!r} changes the forward pass, which gkd does not support "
                "with parallel.sequence_parallel=true; turn sequence_parallel off"
            )
        entry.method.install(handles)
