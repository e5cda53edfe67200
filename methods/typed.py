"""The one typed-YAML engine: plain YAML values -> typed dataclass fields, with errors that name
the field.

Used for the run config (``gkd_cli.config``: its sections are dataclasses) and for a method's
parameters (``methods.registry``: each method has a keyword-only parameters dataclass). It knows
unions, ``Optional``, ``Literal``, enums, lists, dicts, nested dataclasses and schedules (a union
holding :class:`~methods.schedules.Schedule` is parsed by ``parse_schedule``); unknown keys are
refused with the closest valid key; a field's help is the string literal under it
(:func:`field_docs`), which ``gkd config-help`` and ``gkd methods show`` both print.

Errors are :class:`FieldError` (a ``ValueError`` with ``field``, the dotted name); callers that
have their own error type (``gkd_cli.errors.ConfigError``) convert it. Pure Python: no torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from methods.schedules import Schedule, parse_schedule


class FieldError(ValueError):
    """A value does not fit its field; ``field`` is the field's dotted name."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def is_schedulable(tp: Any) -> bool:
    """The annotation accepts a schedule (``ScheduleLike``: a number or a schedule mapping)."""
    return _is_union(tp) and Schedule in typing.get_args(tp)


def type_name(tp: Any) -> str:
    """How a field's type reads in help and errors (``int``, ``ce | kl``, ``null | str``)."""
    if isinstance(tp, str):
        return "number or schedule" if tp == "ScheduleLike" else tp
    if is_schedulable(tp):
        return "number or schedule"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if tp is Any:
        return "any"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(str(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def describe_value(value: Any) -> str:
    """``'x' (str)``: a value and its YAML type, for errors."""
    return f"{value!r} ({'null' if value is None else type(value).__name__})"


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` (parsed YAML) against the annotation ``tp``; return it typed."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if is_schedulable(tp) and not (value is None and type(None) in typing.get_args(tp)):
        if isinstance(value, str):
            value = coerce(value, float, where)
        try:
            return parse_schedule(value, where=where)
        except ValueError as err:
            raise FieldError(str(err), field=where) from None
    if _is_union(tp):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
        else:
            problems = []
            for option in options:
                if option is type(None):
                    continue
                try:
                    return coerce(value, option, where)
                except FieldError as err:
                    problems.append(str(err))
            if len(problems) == 1:
                raise FieldError(problems[0], field=where)
        raise FieldError(
            f"{where}: expected {type_name(tp)}, got {describe_value(value)}", field=where
        )
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        choices = typing.get_args(tp) if origin is Literal else tuple(m.value for m in tp)
        if value in choices and not isinstance(value, bool):
            return value if origin is Literal else tp(value)
        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise FieldError(
            f"{where}: {value!r} is not one of {', '.join(map(str, choices))}{hint}", field=where
        )
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and item_tp is str:
            value = [value]  # a single file is a list of one
        if not isinstance(value, list):
            raise FieldError(f"{where}: expected a list, got {describe_value(value)}", field=where)
        return [coerce(v, item_tp, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise FieldError(
                f"{where}: expected a mapping, got {describe_value(value)}", field=where
            )
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; it is clearly a number here.
            try:
                return float(value)
            except ValueError:
                pass
    if tp is str and isinstance(value, str):
        return value
    raise FieldError(
        f"{where}: expected {_EXPECTED.get(tp, type_name(tp))}, got {describe_value(value)}",
        field=where,
    )


def required_fields(cls: type) -> list[str]:
    """Names of the fields of dataclass ``cls`` without a default."""
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, naming ``where.key`` in every error."""
    if not isinstance(data, Mapping):
        raise FieldError(
            f"{where}: expected a mapping of keys to values, got {describe_value(data)}",
            field=where,
        )
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in fields:
            raise FieldError(
                f"unknown key '{where}.{key}'{did_you_mean(str(key), fields, f'{where}.')}"
                f" (valid keys of {where}: {', '.join(fields)})",
                field=f"{where}.{key}",
            )
    missing = [name for name in required_fields(cls) if name not in data]
    if missing:
        name = missing[0]
        help_text = field_docs(cls).get(name, "")
        help_text = f" ({help_text})" if help_text else ""
        raise FieldError(
            f"{where}.{name} is required{help_text}; add '{name}:' under '{where}:'",
            field=f"{where}.{name}",
        )
    return cls(**coerce_fields(cls, data, where))


def coerce_fields(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{key: typed value}`` for the (known) keys of ``data``, against dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {key: coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()}


def to_plain(value: Any) -> Any:
    """A typed value back as plain YAML data (dataclasses as mappings, schedules as their
    mapping, enums as their value): what :func:`coerce` reads back to an equal value."""
    if hasattr(value, "to_config") and callable(value.to_config):
        return value.to_config()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Field help


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` of a dataclass, read from the string literal under each field
    (inherited fields included; a subclass's docstring wins; reST ``literals`` read as plain)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        statements = body.body
        for stmt, nxt in zip(statements, statements[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split()).replace("``", "")
    return docs


def default_of(f: dataclasses.Field) -> tuple[bool, Any]:
    """``(has a default, the default)`` of a dataclass field."""
    if f.default is not dataclasses.MISSING:
        return True, f.default
    if f.default_factory is not dataclasses.MISSING:
        return True, f.default_factory()
    return False, None
