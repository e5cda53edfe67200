"""The explicit registry of distillation methods, keyed by the name configs use.

``build_method(name, params, ctx)`` validates a config's parameters against the method's
keyword-only parameters dataclass (with :mod:`methods.typed`, the engine the run config uses too)
and builds the method in a :class:`~methods.base.BuildContext`; ``describe(name)`` lists the parameters with their
defaults and help (the docstring under each field) for ``gkd methods show``; ``markdown_table()``
renders the table the README embeds between ``<!-- methods:start -->`` and
``<!-- methods:end -->`` (a test keeps the two in sync).

To add a method: write its class (class attributes ``name``, ``stages``, ``paper``, ``signals``,
``Params``; ``__init__(params)``; ``taps``; ``compute``) and add one line to ``REGISTRY``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from methods import typed
from methods.base import BuildContext, Method, Stage
from methods.choices import GLMDSoft
from methods.divergences import JSD, TVD, ForwardKL, ReverseKL, SkewKL, SkewRKL, TopKKD
from methods.forward_methods import DIITO, LRCBERT, Theseus
from methods.intermediate import (
    ALPKD,
    CKD,
    MGSKD,
    PKD,
    SID,
    DistilBERT,
    MiniLM,
    MiniLMv2,
    MobileBERT,
    RailKD,
    TinyBERT,
    UniversalKD,
)
from methods.multi_teacher import DGKD, MTBERT, RLKD, TMKD, Uncertainty
from methods.prediction import GLMD, KD, LM, PD, AnnealingKD, ContinuationKD
from methods.schedules import Constant, Linear, Piecewise, Schedule


@dataclass(frozen=True)
class Range:
    """The values a numeric method parameter may take (``None``: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """``True``: the value must be strictly above ``low``."""
    high_open: bool = False
    """``True``: the value must be strictly below ``high``."""

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "any number"


ANY = Range()
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
UNIT = Range(0, 1)
"""A probability, a mixing coefficient or a fraction of training: ``[0, 1]``."""

RANGES_BY_NAME: dict[str, Range] = {
    "temperature": POSITIVE,  # softmax(z / T): T <= 0 divides by zero or flips the distribution
    "seed": NON_NEGATIVE,  # numpy's and torch's generators take non-negative seeds
    "redraw_every": AT_LEAST_ONE,
}
"""Ranges of parameters that mean the same in every method; ``*_weight`` parameters (loss term
weights) are ``>= 0``. A method's own ``ranges`` (``_spec(cls, name=Range)``) take precedence."""


class ParamRangeError(ValueError):
    """A method parameter lies outside its declared range; ``param`` names it."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about a method, read from its class."""

    name: str
    cls: type
    params: type
    """The method's keyword-only parameters dataclass."""
    paper: str
    signals: str
    stages: frozenset[Stage]
    summary: str
    """First sentence of the class docstring."""
    ranges: Mapping[str, Range] = dataclasses.field(default_factory=dict)
    """Declared ranges of numeric parameters beyond those of :data:`RANGES_BY_NAME`."""

    def range_of(self, param: str) -> Range | None:
        """The range ``param`` must lie in (``None``: not a numeric parameter with a range)."""
        if param in self.ranges:
            return self.ranges[param]
        if param in RANGES_BY_NAME:
            return RANGES_BY_NAME[param]
        return NON_NEGATIVE if param.endswith("_weight") else None


def _spec(cls: Any, **ranges: Range) -> MethodSpec:
    doc = inspect.cleandoc(cls.__doc__ or "")
    summary = " ".join(doc.split("\n\n", 1)[0].split())
    return MethodSpec(
        name=cls.name,
        cls=cls,
        params=cls.Params,
        paper=cls.paper,
        signals=cls.signals,
        stages=cls.stages,
        summary=summary,
        ranges=ranges,
    )


REGISTRY: dict[str, MethodSpec] = {
    # the student's own loss
    "lm": _spec(LM),
    # prediction-layer methods of GKD's collection
    "kd": _spec(KD),
    "pd": _spec(PD),
    "glmd": _spec(GLMD),
    "glmd_soft": _spec(GLMDSoft, temperature=POSITIVE),
    "annealing_kd": _spec(AnnealingKD, max_temperature=AT_LEAST_ONE),
    "continuation_kd": _spec(
        ContinuationKD,
        max_temperature=AT_LEAST_ONE,
        margin=NON_NEGATIVE,
        psi_denominator=POSITIVE,
        psi_switch=UNIT,
    ),
    # modern logit divergences
    "forward_kl": _spec(ForwardKL),
    "reverse_kl": _spec(ReverseKL),
    "jsd": _spec(JSD, beta=UNIT),
    "skew_kl": _spec(SkewKL, alpha=UNIT),
    "skew_rkl": _spec(SkewRKL, alpha=UNIT),
    "tvd": _spec(TVD),
    "topk_kd": _spec(TopKKD, k=AT_LEAST_ONE),
    # intermediate-layer methods of GKD's collection
    "tinybert": _spec(TinyBERT),
    "minilm": _spec(MiniLM, teacher_layer=ANY),  # negative: from the end
    "minilmv2": _spec(MiniLMv2, relation_heads=AT_LEAST_ONE, teacher_layer=ANY),
    "distilbert": _spec(DistilBERT),
    "pkd": _spec(PKD, alpha=UNIT, beta=NON_NEGATIVE),  # (1 - alpha) hard + alpha soft
    "rail_kd": _spec(RailKD, projection_size=AT_LEAST_ONE),
    "mgskd": _spec(
        MGSKD,
        token_levels=NON_NEGATIVE,
        relation_heads=AT_LEAST_ONE,
        anchors=AT_LEAST_ONE,
        neighbors=AT_LEAST_ONE,
        span_rate=Range(0, 1, low_open=True),
    ),
    "sid": _spec(SID),
    "alp_kd": _spec(ALPKD),
    "ckd": _spec(CKD, window=AT_LEAST_ONE),  # odd: checked by the method
    "universal_kd": _spec(UniversalKD, projection_size=NON_NEGATIVE),  # 0: the student's width
    "mobilebert": _spec(MobileBERT),
    # methods that change the forward pass
    "theseus": _spec(Theseus, replace_rate=UNIT),  # a probability
    "diito": _spec(
        DIITO, span=Range(0, 1, low_open=True, high_open=True), student_layer=NON_NEGATIVE
    ),
    "lrc_bert": _spec(LRCBERT, tau=POSITIVE, epsilon=NON_NEGATIVE),
    # multi-teacher combiners (teachers: [...]; each wraps any single-teacher method)
    "tmkd": _spec(TMKD),
    "mt_bert": _spec(MTBERT),
    "uncertainty": _spec(Uncertainty),
    # warmup: a fraction of training; baseline_decay: a running mean's decay
    "rl_kd": _spec(RLKD, warmup=UNIT, baseline_decay=Range(0, 1, high_open=True)),
    "dgkd": _spec(DGKD, survival=Range(0, 1, low_open=True)),  # a probability; 0 drops all
}


# ----------------------------------------------------------------------------------------------
# Lookup and validation


def get_spec(name: str) -> MethodSpec:
    """The spec of ``name``; ``ValueError`` with the closest names when it is unknown."""
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown distillation method {name!r}{hint} (known: {', '.join(sorted(REGISTRY))})"
        )
    return spec


def parse_params(name: str, params: Mapping[str, Any] | None = None) -> Any:
    """Validate a config's parameters for method ``name`` (names, types through
    :mod:`methods.typed`, declared ranges) and build its parameters dataclass."""
    spec = get_spec(name)
    params = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(spec.params)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        suggestions = [difflib.get_close_matches(key, list(fields), n=1) for key in unknown]
        hint = "".join(
            f" (did you mean {match[0]!r} for {key!r}?)"
            for key, match in zip(unknown, suggestions, strict=True)
            if match
        )
        raise ValueError(
            f"method {name!r} has no parameter {', '.join(repr(k) for k in unknown)}{hint}; "
            f"valid parameters: {valid}"
        )
    missing = [key for key in typed.required_fields(spec.params) if key not in params]
    if missing:
        raise ValueError(f"method {name!r} needs parameter(s) {', '.join(missing)}")
    values = typed.coerce_fields(spec.params, params, name)  # FieldError is a ValueError
    for key, value in values.items():
        _check_range(spec, key, value, fields[key])
    return spec.params(**values)


def range_values(value: Any) -> list[float]:
    """The values a parsed parameter takes over training: a number, or a schedule's extremes (a
    linear ramp stays between its ends, so checking them checks every step)."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, Constant):
        return [value.value]
    if isinstance(value, Linear):
        return [value.start, value.end]
    if isinstance(value, Piecewise):
        return list(value.values)
    return []


def _check_range(spec: MethodSpec, key: str, value: Any, param: dataclasses.Field) -> None:
    allowed = spec.range_of(key)
    if allowed is None:
        return
    for number in range_values(value):
        if not allowed.contains(number):
            shown = value if isinstance(value, int | float) else _render_default(value)
            default = param.default if param.default is not dataclasses.MISSING else None
            hint = f" (default {_render_default(default)})" if default is not None else ""
            raise ParamRangeError(
                f"{spec.name}.{key}={shown} must be {allowed}; set {key} to a value {allowed}"
                f"{hint}",
                param=key,
            )


def build_method(name: str, params: Any = None, ctx: BuildContext | None = None) -> Method:
    """Build method ``name`` from config parameters (a mapping, validated here; ``ValueError``
    names the field) or from its already parsed parameters dataclass, in build context ``ctx``:
    ``cls.from_context(params, ctx)`` when the class defines it, else ``cls(params)``. Without a
    context (tests), a task-stage build that knows no models. The context always has a
    ``build_inner`` (:func:`with_inner_builder`) for a method that nests another."""
    spec = get_spec(name)
    parsed = params if isinstance(params, spec.params) else parse_params(name, params)
    from_context = getattr(spec.cls, "from_context", None)
    if not callable(from_context):
        return spec.cls(parsed)
    ctx = ctx if ctx is not None else BuildContext(stage=Stage.TASK)
    if ctx.build_inner is None:
        ctx = with_inner_builder(ctx)
    return from_context(parsed, ctx)


def with_inner_builder(ctx: BuildContext) -> BuildContext:
    """``ctx`` whose ``build_inner`` builds a nested method entry (a mapping ``{name: ...,
    <params>}``, a bare name, or a parsed entry with ``name`` and ``params``) with
    :func:`build_method` in the same context: the same validation and range checks as a top-level
    entry (a nested entry's ``weight``, if any, is the combiner's business and ignored here)."""

    def build_inner(item: Any) -> Method:
        if isinstance(item, str):
            item = {"name": item}
        if isinstance(item, Mapping):
            if not isinstance(item.get("name"), str):
                raise ValueError(f"a nested method needs a 'name', got {item!r}")
            name, params = item["name"], {k: v for k, v in item.items() if k not in RESERVED}
        else:
            name, params = item.name, item.params
        return build_method(name, params, inner)

    inner = dataclasses.replace(ctx, build_inner=build_inner)
    return inner


RESERVED = ("name", "weight")
"""Keys of a method entry that are not parameters of the method."""


# ----------------------------------------------------------------------------------------------
# Documentation


@dataclass(frozen=True)
class ParamDoc:
    """One parameter of a method, for ``gkd methods show``."""

    name: str
    type: str
    default: Any
    """The default as a config value (schedules as their mapping); ``None`` when required."""
    required: bool
    help: str
    """The docstring under the field, followed by its declared range (``Range: > 0.``)."""
    range: str = ""
    """The declared range (``> 0``, ``in [0, 1]``); empty for non-numeric parameters."""


def _render_default(value: Any) -> Any:
    return value.to_config() if isinstance(value, Schedule) else value


def describe(name: str) -> list[ParamDoc]:
    """The parameters of method ``name`` with type, default and help text."""
    spec = get_spec(name)
    docs = typed.field_docs(spec.params)
    hints = typing.get_type_hints(spec.params)
    out = []
    for f in dataclasses.fields(spec.params):
        if f.default is not dataclasses.MISSING:
            default, required = _render_default(f.default), False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = _render_default(f.default_factory()), False
        else:
            default, required = None, True
        allowed = spec.range_of(f.name)
        limits = str(allowed) if allowed is not None and allowed != ANY else ""
        help_text = docs.get(f.name, "")
        if limits:
            help_text = f"{help_text} Range: {limits}.".strip()
        out.append(
            ParamDoc(
                f.name, typed.type_name(hints[f.name]), default, required, help_text, range=limits
            )
        )
    return out


def stage_label(stages: frozenset[Stage]) -> str:
    """``PT``, ``TS`` or ``PT+TS`` (METHODS.md's notation)."""
    labels = [
        label for stage, label in ((Stage.PRETRAIN, "PT"), (Stage.TASK, "TS")) if stage in stages
    ]
    return "+".join(labels)


def markdown_table() -> str:
    """The methods table: name | paper | signals | stage, in registry order."""
    lines = ["| name | paper | signals | stage |", "|---|---|---|---|"]
    for spec in REGISTRY.values():
        cells = [f"`{spec.name}`", spec.paper, spec.signals, stage_label(spec.stages)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
