"""Feature taps: capture only the requested tensors of a megatron-core GPTModel with forward hooks.

A :class:`TapRecorder` is attached to one model (teacher or student) on one pipeline stage. It
registers hooks only for the requested taps whose module lives on this stage, stores each captured
tensor for the current microbatch, and hands them over with :meth:`TapRecorder.pop` (which also
forgets them, so nothing outlives the microbatch).

Where each kind is captured (megatron-core 0.16 module names):

* ``embedding``: output of ``model.embedding`` (first stage only).
* ``hidden[l]``: first element of the output of ``decoder.layers[i]`` whose ``layer_number - 1 == l``.
* ``query/key/value[l]``: the arguments of that layer's ``self_attention.core_attention``.
* ``attention_scores[l]`` / ``attention_probs[l]``: input / output of
  ``core_attention.scale_mask_softmax`` (megatron's local spec; Transformer Engine's fused
  attention never materializes them, so the runtime uses the local spec when they are requested).
* ``final_norm``: output of ``decoder.final_layernorm`` (last stage).
* ``logits``: output of ``output_layer``, ``[s, b, V/tp]`` flattened to ``[s*b, V/tp]`` (last stage).
  On the fused path (``fused()`` true, see :mod:`methods.fused_head`) a forward pre-hook captures
  a :class:`~methods.fused_head.HeadInput` instead (the layer's input, through megatron's own
  tensor-parallel region, and the weight it was called with) and lets the layer run on one token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from methods.base import FeatureKind, Role, Tap
from methods.fused_head import HeadInput

ATTENTION_KINDS = frozenset(
    {
        FeatureKind.ATTENTION_SCORES,
        FeatureKind.ATTENTION_PROBS,
        FeatureKind.QUERY,
        FeatureKind.KEY,
        FeatureKind.VALUE,
    }
)


def check_taps_for_recompute(taps: Sequence[Tap], recompute: str) -> None:
    """Features captured inside a recomputed region would carry no gradient: refuse them."""
    student = [t for t in taps if t.role is Role.STUDENT and t.kind is not FeatureKind.LOGITS]
    if recompute == "full" and student:
        raise ValueError(
            f"train.recompute=full recomputes whole student layers, so student features "
            f"({', '.join(map(str, student[:3]))}) would be captured without gradients; "
            "use train.recompute=selective or none with intermediate-layer methods"
        )
    if recompute == "selective":
        inside = [t for t in student if t.kind in ATTENTION_KINDS]
        if inside:
            raise ValueError(
                f"train.recompute=selective recomputes core attention, where {inside[0]} is captured; "
                "use train.recompute=none with attention-based methods"
            )


class TapUnavailable(ValueError):
    """A requested feature cannot be captured from this model."""


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


def _sequence_parallel(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "sequence_parallel", False))


def gather_sequence(value: torch.Tensor) -> torch.Tensor:
    """``[s/tp, b, h]`` (sequence parallelism) -> ``[s, b, h]``, as the features are documented.
    Every tp rank then holds the whole sequence and computes the same loss, as without sequence
    parallelism; the backward keeps this rank's slice of the (identical) gradients, no sum."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=False)


RESTRICTED_ROWS_ATTR = "gkd_restricted_rows"
"""Attribute of an output layer whose training forward computes only the rows ``W[index]`` of its
weight (``parallel.components.restrict_head``): the fused path restricts the weight the same way."""


def head_input(module: torch.nn.Module, args: tuple, kwargs: dict, *, role: Role) -> HeadInput:
    """What megatron's ``ColumnParallelLinear`` output layer would multiply: its input (after the
    layer's tensor-parallel region: all-gather over the sequence under sequence parallelism, else
    an identity whose backward all-reduces over tp) flattened to ``[s*b, h]``, and its weight."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    hidden: torch.Tensor = args[0] if args else kwargs["input_"]
    weight = kwargs.get("weight") if "weight" in kwargs else (args[1] if len(args) > 1 else None)
    if weight is None:
        weight = module.weight
    assert isinstance(weight, torch.Tensor)
    group = getattr(module, "tp_group", None)
    if role is Role.TEACHER:
        hidden, weight = hidden.detach(), weight.detach()
    if getattr(module, "sequence_parallel", False):
        hidden = gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True, group=group
        )
    elif role is Role.STUDENT:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    rows = getattr(module, RESTRICTED_ROWS_ATTR, None)
    if rows is not None:  # the fused path runs in training only, where the head is restricted
        weight = weight.index_select(0, rows)
    return HeadInput(hidden.reshape(-1, hidden.shape[-1]), weight)


class TapRecorder:
    """Hooks for ``taps`` (those of ``role``/``teacher_index``) on ``model``'s modules on this stage.

    ``fused()`` (default: never) says whether the current forward takes the fused output-layer
    path: ``LOGITS`` taps then capture a :class:`~methods.fused_head.HeadInput`."""

    def __init__(
        self,
        model: torch.nn.Module,
        taps: Iterable[Tap],
        *,
        role: Role,
        teacher_index: int = 0,
        fused: Callable[[], bool] | None = None,
    ):
        self.role = role
        self.fused = fused or (lambda: False)
        self.captured: dict[Tap, torch.Tensor] = {}
        self._handles: list = []
        self.teacher_index = teacher_index
        self._model = model
        self._decoder = getattr(model, "decoder", None)
        self._layers = {}
        if self._decoder is not None:
            self._layers = {layer.layer_number - 1: layer for layer in self._decoder.layers}
        self.local_layers = sorted(self._layers)
        self.taps: set[Tap] = set()
        for tap in taps:
            self.add(tap)

    def add(self, tap: Tap) -> None:
        """Start capturing ``tap`` (ignored when it belongs to another model or is present)."""
        mine = tap.role is self.role and (
            self.role is Role.STUDENT or tap.teacher_index == self.teacher_index
        )
        if mine and tap not in self.taps:
            self.taps.add(tap)
            self._register(self._model, self._decoder, self._layers, tap)

    # ------------------------------------------------------------------ registration
    def _store(self, tap: Tap, value: torch.Tensor) -> None:
        self.captured[tap] = value

    def _output_hook(self, tap: Tap, transform=None):
        def hook(module, args, output):
            value = _first(output)
            self._store(tap, transform(value) if transform else value)

        return hook

    def _register(self, model, decoder, layers, tap: Tap) -> None:
        kind = tap.kind
        # Under sequence parallelism the activations between layers are [s/tp, b, h].
        sequence = gather_sequence if _sequence_parallel(model) else None
        if kind is FeatureKind.EMBEDDING:
            if getattr(model, "pre_process", False):
                self._handles.append(
                    model.embedding.register_forward_hook(self._output_hook(tap, sequence))
                )
            return
        if kind is FeatureKind.FINAL_NORM:
            norm = getattr(decoder, "final_layernorm", None) if decoder is not None else None
            if getattr(model, "post_process", False) and norm is not None:
                self._handles.append(norm.register_forward_hook(self._output_hook(tap, sequence)))
            return
        if kind is FeatureKind.LOGITS:
            if getattr(model, "post_process", False):
                self._register_logits(model.output_layer, tap)
            return
        layer = layers.get(tap.layer)
        if layer is None:
            return  # lives on another pipeline stage
        if kind is FeatureKind.HIDDEN:
            self._handles.append(layer.register_forward_hook(self._output_hook(tap, sequence)))
            return
        core = layer.self_attention.core_attention
        if kind in (FeatureKind.QUERY, FeatureKind.KEY, FeatureKind.VALUE):
            position = {FeatureKind.QUERY: 0, FeatureKind.KEY: 1, FeatureKind.VALUE: 2}[kind]
            name = kind.value

            def pre_hook(module, args, kwargs, tap=tap, position=position, name=name):
                value = args[position] if len(args) > position else kwargs[name]
                self._store(tap, value)

            self._handles.append(core.register_forward_pre_hook(pre_hook, with_kwargs=True))
            return
        softmax = getattr(core, "scale_mask_softmax", None)
        if softmax is None:
            raise TapUnavailable(
                f"{tap}: this attention implementation ({type(core).__name__}) never materializes "
                "attention scores; gkd builds models with megatron's local layer spec when a method "
                "requests attention taps"
            )
        if kind is FeatureKind.ATTENTION_SCORES:

            def scores_hook(module, args, tap=tap):
                scores = args[0]
                scale = getattr(module, "scale", None)
                self._store(tap, scores * scale if scale is not None else scores)

            self._handles.append(softmax.register_forward_pre_hook(scores_hook))
        elif kind is FeatureKind.ATTENTION_PROBS:
            self._handles.append(softmax.register_forward_hook(self._output_hook(tap)))

    def _register_logits(self, layer: torch.nn.Module, tap: Tap) -> None:
        def output_hook(module, args, output):
            if not self.fused():  # [s, b, V/tp] -> [s*b, V/tp]
                value = _first(output)
                self._store(tap, value.reshape(-1, value.shape[-1]))

        def pre_hook(module, args, kwargs):
            if not self.fused():
                return None
            self._store(tap, head_input(module, args, kwargs, role=self.role))
            # The layer itself runs on one token (per tp rank): its logits are not used.
            if args:
                return (args[0][:1], *args[1:]), kwargs
            return args, {**kwargs, "input_": kwargs["input_"][:1]}

        self._handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._handles.append(layer.register_forward_hook(output_hook))

    # ------------------------------------------------------------------ use
    def pop(self) -> dict[Tap, torch.Tensor]:
        captured, self.captured = self.captured, {}
        return captured

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.captured.clear()
