"""A weighted list of distillation methods (GKD's "mix"), built from config.

Config: a list of mappings. ``name`` selects the method, ``weight`` (a number or a schedule, see
:mod:`methods.schedules`; default 1.0) multiplies its terms, every other key is a parameter of the
method (parameters such as ``temperature`` may be schedules too)::

    methods:
      - {name: glmd, weight: 1.0, temperature: 15}
      - {name: lm, weight: {type: linear, start: 0.0, end: 0.1}}

The config loader types each entry into a :class:`MethodEntry` (:func:`parse_entries`: the
parameters checked against the method's own dataclass and its declared ranges);
:func:`build_pipeline` is the one builder, from entries and a :class:`~methods.base.BuildContext`
(``gkd distill``'s validation and every worker call it through ``gkd_cli.build.build_methods``).

``compute`` returns the total loss (the weighted sum, with gradient) and every term unweighted and
detached for logging, named ``"{method}/{term}"`` (e.g. ``"glmd/kl"``, ``"lm/ce"``). A method's
term is weighted by the method's weight times its own ``term_weights(ctx)`` when it has them (KD's
soft and hard weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from methods import typed
from methods.base import (
    BuildContext,
    HasModules,
    LossContext,
    Method,
    ModelInfo,
    Stage,
    Tap,
    WeightsTerms,
)
from methods.registry import (
    RESERVED,
    build_method,
    parse_params,
    range_values,
    stage_label,
    with_inner_builder,
)
from methods.schedules import ScheduleLike, parse_schedule, value_at


@dataclass(frozen=True)
class MethodEntry:
    """One configured method, typed when the config is loaded: its name, its weight (a number or
    a schedule) and its parameters dataclass (coerced and range-checked by the registry)."""

    name: str
    weight: ScheduleLike = 1.0
    params: Any = None
    """The method's parameters dataclass (``None``: its defaults)."""

    def to_config(self) -> dict[str, Any]:
        """The plain mapping :func:`parse_entry` reads back to an equal entry (every parameter
        spelled out)."""
        params = typed.to_plain(self.params) if self.params is not None else {}
        return {"name": self.name, "weight": typed.to_plain(self.weight), **params}


def parse_entry(item: Any, where: str) -> MethodEntry:
    """A method entry from config: a mapping ``{name: ..., weight: ..., <params>}``, a bare name,
    or a :class:`MethodEntry` (returned as is). ``typed.FieldError`` names ``where`` (e.g.
    ``methods.0``) and the method."""
    if isinstance(item, MethodEntry):
        return item
    if isinstance(item, str):
        item = {"name": item}  # "- glmd" is shorthand for "- name: glmd"
    if not isinstance(item, Mapping):
        raise typed.FieldError(
            f"{where}: expected a mapping like {{name: glmd, weight: 1.0}}, got "
            f"{typed.describe_value(item)}",
            field=where,
        )
    name = item.get("name")
    if not isinstance(name, str):
        raise typed.FieldError(
            f"{where}.name is required (a method name; gkd methods list shows them)",
            field=f"{where}.name",
        )
    weight = _parse_weight(item.get("weight", 1.0), f"{where}.weight")
    params = {k: v for k, v in item.items() if k not in RESERVED}
    try:
        parsed = parse_params(name, params)
    except ValueError as err:
        param = getattr(err, "param", None)  # registry.ParamRangeError names the parameter
        field = f"{where}.{param}" if param else where
        raise typed.FieldError(f"{where} ({name}): {err}", field=field) from None
    return MethodEntry(name=name, weight=weight, params=parsed)


def _parse_weight(weight: Any, where: str) -> ScheduleLike:
    """A method's weight: a number or a schedule, never negative at any step."""
    if isinstance(weight, bool) or not isinstance(weight, int | float | Mapping):
        raise typed.FieldError(
            f"{where}: expected a number (or a schedule mapping), got "
            f"{typed.describe_value(weight)}",
            field=where,
        )
    if isinstance(weight, int | float) and weight < 0:
        raise typed.FieldError(f"{where}={weight} must be >= 0", field=where)
    try:
        parsed = parse_schedule(weight, where=where)
    except ValueError as err:
        raise typed.FieldError(str(err), field=where) from None
    negative = [v for v in range_values(parsed) if v < 0]
    if negative:
        raise typed.FieldError(
            f"{where} reaches {negative[0]}; a method's weight must be >= 0 at every step",
            field=where,
        )
    return parsed


def parse_entries(items: Any, where: str = "methods") -> list[MethodEntry]:
    """The typed method entries of a config's ``methods`` list (see :func:`parse_entry`)."""
    if not isinstance(items, list | tuple):
        raise typed.FieldError(
            f"{where}: expected a list of {{name: ..., weight: ...}} entries, got "
            f"{typed.describe_value(items)}",
            field=where,
        )
    return [parse_entry(item, f"{where}.{i}") for i, item in enumerate(items)]


def build_pipeline(
    entries: Sequence[MethodEntry], ctx: BuildContext, *, where: str = "methods"
) -> MethodPipeline:
    """The one builder: every entry's method built in ``ctx`` (``from_context`` when the method
    defines it), weighted, checked against the stage. ``typed.FieldError`` names the entry
    (``methods.N (name): ...``)."""
    if not entries:
        raise typed.FieldError(
            f"{where} is empty; add at least one, e.g. '- name: glmd' (gkd methods list)",
            field=where,
        )
    ctx = with_inner_builder(ctx)
    built = []
    for index, entry in enumerate(entries):
        here = f"{where}.{index}"
        try:
            method = build_method(entry.name, entry.params, ctx)
        except ValueError as err:
            param = getattr(err, "param", None)
            field = f"{here}.{param}" if param else here
            raise typed.FieldError(f"{here} ({entry.name}): {err}", field=field) from None
        if ctx.stage not in method.stages:
            raise typed.FieldError(
                f"{here} ({entry.name}): method {entry.name!r} applies to stage "
                f"{stage_label(method.stages)} only, but "
                f"this run's stage is {ctx.stage.value!r} (train.stage); remove it from the "
                "methods or change the stage",
                field=here,
            )
        built.append(PipelineEntry(name=entry.name, method=method, weight=entry.weight))
    try:
        return MethodPipeline(built, ctx.stage)
    except ValueError as err:
        raise typed.FieldError(f"{where}: {err}", field=where) from None


@dataclass
class PipelineEntry:
    """One built method."""

    name: str
    method: Method
    weight: ScheduleLike = 1.0


def _parse_stage(stage: Stage | str | None) -> Stage | None:
    if stage is None or isinstance(stage, Stage):
        return stage
    try:
        return Stage(stage)
    except ValueError:
        raise ValueError(
            f"unknown stage {stage!r}; use one of {[s.value for s in Stage]}"
        ) from None


class MethodPipeline:
    """The built methods of a run, in config order (made by :func:`build_pipeline`)."""

    def __init__(self, entries: Sequence[PipelineEntry], stage: Stage | str | None = None) -> None:
        self.stage = _parse_stage(stage)
        self.entries = list(entries)
        seen: set[str] = set()
        for entry in self.entries:
            if entry.name in seen:
                raise ValueError(
                    f"method {entry.name!r} is listed twice; each method may appear once "
                    "(its terms are logged as '{method}/{term}')"
                )
            seen.add(entry.name)
            if self.stage is not None and self.stage not in entry.method.stages:
                raise ValueError(
                    f"method {entry.name!r} applies to stage {stage_label(entry.method.stages)} "
                    f"only, but this run's stage is {self.stage.value!r}; remove it from the "
                    "methods or change the stage"
                )

    @classmethod
    def from_config(
        cls,
        config: Any,
        stage: Stage | str | None = None,
        *,
        where: str = "methods",
        ctx: BuildContext | None = None,
    ) -> MethodPipeline:
        """:func:`build_pipeline` of a plain config list (tests, scripts): parsed with
        :func:`parse_entries`, built in ``ctx`` (default: the stage, no model info)."""
        if ctx is None:
            ctx = BuildContext(stage=_parse_stage(stage) or Stage.TASK)
        return build_pipeline(parse_entries(config, where), ctx, where=where)

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> list[Tap]:
        """The union of the methods' taps, each once, in first-requested order."""
        taps: dict[Tap, None] = {}
        for entry in self.entries:
            if self.stage is None or self.stage in entry.method.stages:
                taps.update(dict.fromkeys(entry.method.taps(teacher, student)))
        return list(taps)

    def weights(self, ctx: LossContext) -> dict[str, float]:
        """Each method's weight at ``ctx.step`` (for logging)."""
        return {e.name: value_at(e.weight, ctx.step, ctx.total_steps) for e in self.entries}

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, terms)``: the weighted sum of all terms computable on this stage (a scalar
        with gradient; a zero without one when there are none) and each term unweighted and
        detached, named ``"{method}/{term}"``."""
        total: torch.Tensor | None = None
        terms: dict[str, torch.Tensor] = {}
        for entry in self.entries:
            if ctx.stage not in entry.method.stages:
                continue
            result = entry.method.compute(features, ctx)
            if not result:
                continue
            weight = value_at(entry.weight, ctx.step, ctx.total_steps)
            inner = entry.method.term_weights(ctx) if isinstance(entry.method, WeightsTerms) else {}
            for term, value in result.items():
                terms[f"{entry.name}/{term}"] = value.detach()
                weighted = value * (weight * inner.get(term, 1.0))
                total = weighted if total is None else total + weighted
        if total is None:
            total = torch.zeros((), device=ctx.loss_mask.device)
        return total, terms

    def modules(self) -> torch.nn.ModuleDict:
        """Trainable modules of the methods that have them, keyed by method name (for the
        optimizer and the checkpoint)."""
        out = torch.nn.ModuleDict()
        for entry in self.entries:
            if isinstance(entry.method, HasModules):
                out[entry.name] = torch.nn.ModuleDict(dict(entry.method.modules()))
        return out
