"""Checks of a configured method against the parallel layout, shared by the config validation
(before launch) and the runtime: methods that need a single pipeline stage
(``requires_single_stage``), and layer pairs (``layer_pairs``) that would live on different stages
(the rule and the proposed stage-aligned mapping are :func:`methods.layer_mapping.check_pipeline`'s).
A multi-teacher combiner's inner methods are checked with their own teachers."""

from __future__ import annotations

from collections.abc import Sequence

from methods.base import ModelInfo
from methods.layer_mapping import check_pipeline


def check_method_layout(
    method,
    name: str,
    teachers: Sequence[ModelInfo],
    student: ModelInfo,
    *,
    pp: int,
    where: str | None = None,
) -> None:
    """Raise ``ValueError`` saying why ``method`` cannot run with ``pp`` pipeline stages."""
    where = where or f"method {name!r}"
    per_teacher = getattr(method, "per_teacher_methods", None)
    if callable(per_teacher):
        for inner, index in per_teacher():
            check_method_layout(
                inner, getattr(inner, "name", name), [teachers[index]], student, pp=pp,
                where=f"{where}, its method for teacher {index}",
            )  # fmt: skip
    check_pipeline(method, teachers[0] if teachers else student, student, pp, where=where)
