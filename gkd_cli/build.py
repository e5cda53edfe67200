"""The run's methods, built from the config: the one function that ``gkd distill``'s validation
and every worker call, so validation cannot disagree with the run.

``build_context(cfg)`` is what a method may know when it is built (the stage, each model's
architecture with the vocabulary padded exactly as the runtime pads it, the layout);
``build_methods(cfg)`` builds the pipeline with :func:`methods.pipeline.build_pipeline` and checks
each method against the run (its taps, recomputation, teachers, sequence parallelism, pipeline
stages). Every problem is a :class:`~gkd_cli.errors.ConfigError` naming the method entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd_cli.errors import ConfigError
from methods.base import BuildContext, ForwardModifier, Role, Stage
from methods.pipeline import MethodPipeline, build_pipeline
from methods.typed import FieldError

if TYPE_CHECKING:
    from gkd_cli.config import DistillConfig


def build_context(cfg: DistillConfig) -> BuildContext:
    """The build context of ``cfg``'s run: its stage, every teacher's and the student's
    :class:`~methods.base.ModelInfo` (``parallel.model.model_info``, the runtime's own) and the
    layout."""
    from parallel.model import model_info

    tp = cfg.parallel.tp
    return BuildContext(
        stage=Stage(cfg.train.stage),
        teachers=tuple(model_info(t.arch(), tp) for t in cfg.teachers),
        student=model_info(cfg.student.arch(), tp),
        tp=tp,
        pp=cfg.parallel.pp,
    )


def build_methods(cfg: DistillConfig) -> MethodPipeline:
    """The run's method pipeline, built once and checked against the run; ``ConfigError`` names
    the method entry (``methods.N (name): ...``) and the fix."""
    from parallel.method_checks import check_method_layout
    from parallel.taps import check_taps_for_recompute

    ctx = build_context(cfg)
    try:
        pipeline = build_pipeline(cfg.methods, ctx)
    except FieldError as err:
        raise ConfigError(str(err), field=err.field) from None
    student = ctx.student
    assert student is not None
    teachers = list(ctx.teachers)
    teacher = ctx.teacher or student
    for i, entry in enumerate(pipeline.entries):
        method, where = entry.method, f"methods.{i} ({entry.name})"
        try:
            taps = list(method.taps(teacher, student))
            check_taps_for_recompute(taps, cfg.train.recompute)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{where}: {err}", field=f"methods.{i}") from None
        needs_teacher = any(t.role is Role.TEACHER for t in taps)
        if not teachers and (needs_teacher or getattr(method, "needs_teacher", False)):
            raise ConfigError(
                f"{where} needs a teacher, but the config has no teacher section; add one or "
                "train with teacher-free methods only (lm)",
                field=f"methods.{i}",
            )
        wanted = max((t.teacher_index for t in taps if t.role is Role.TEACHER), default=0)
        if wanted >= max(len(teachers), 1):
            raise ConfigError(
                f"{where} reads teacher {wanted}, but the config has {len(teachers)} teacher(s); "
                "list them under 'teachers:'",
                field=f"methods.{i}",
            )
        if cfg.parallel.sequence_parallel and ctx.tp > 1 and isinstance(method, ForwardModifier):
            # Their hooks would see layer inputs of [s/tp, b, h] (per-sequence norms, token swaps).
            raise ConfigError(
                f"{where} changes the forward pass, which gkd does not support with "
                "parallel.sequence_parallel=true; set parallel.sequence_parallel=false",
                field="parallel.sequence_parallel",
            )
        if cfg.data.mode == "packed" or cfg.data.choices:  # rows hold several examples
            from gkd_cli.data.batching import check_packed_method

            try:
                check_packed_method(method, taps, where)
            except ValueError as err:
                if cfg.data.choices:  # h15t: every option of a choice record shares a row
                    raise ConfigError(
                        f"{where} relates the token positions of a whole sequence; with "
                        "data.choices the options of a task example share one sequence, which "
                        "its terms would mix: use another method or data.choices: false",
                        field="data.choices",
                    ) from None
                raise ConfigError(str(err), field="data.mode") from None
        try:
            check_method_layout(method, entry.name, teachers, student, pp=ctx.pp, where=where)
        except ValueError as err:
            raise ConfigError(str(err), field=f"methods.{i}") from None
    return pipeline
