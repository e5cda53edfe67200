"""Observability of a run from its config: which metric sinks (``output.log_to``), validation
during training (``train.eval_every``) and the best checkpoint (``train.best_metric``).

:func:`check_observability` validates these fields before launch (part of config validation);
:func:`loop_options` turns them into :class:`parallel.loop.LoopSettings` fields;
:func:`make_validator` builds the loop's ``validate(step)`` on the workers.

The teacher's validation loss does not change while the student trains: it is computed at the
first validation and cached in ``<output.dir>/valid_teacher.json`` (keyed by the validation set,
sequence length, batch and teacher checkpoints), so later validations and resumed runs reuse it.
(The teacher still runs forward in each validation pass, since teacher and student share the
pipeline stages; what is saved is its cross entropy.)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gkd_cli.errors import ConfigError

if TYPE_CHECKING:
    from gkd_cli.config import DistillConfig

log = logging.getLogger("gkd.observe")

BEST_METRICS = ("valid/student_loss", "valid/student_ppl")
TEACHER_CACHE = "valid_teacher.json"


def check_observability(cfg: DistillConfig) -> None:
    """Raise :class:`ConfigError` naming the field and the fix."""
    from methods.typed import did_you_mean
    from parallel.sinks import SINKS, MissingExtraError, check_sink_packages

    out, train = cfg.output, cfg.train
    for name in out.log_to:
        if name not in SINKS:
            hint = did_you_mean(name, SINKS)
            raise ConfigError(
                f"output.log_to: unknown sink {name!r}{hint}; choose from {', '.join(SINKS)}",
                field="output.log_to",
            )
    try:
        check_sink_packages(out.log_to)
    except MissingExtraError as exc:
        raise ConfigError(str(exc), field="output.log_to") from None
    if train.eval_every < 0:
        raise ConfigError(
            f"train.eval_every={train.eval_every} must be >= 0", field="train.eval_every"
        )
    if train.eval_batches < 1:
        raise ConfigError(
            f"train.eval_batches={train.eval_batches} must be > 0", field="train.eval_batches"
        )
    if train.eval_every and not cfg.data.valid_files:
        raise ConfigError(
            f"train.eval_every={train.eval_every} needs a validation set: set data.valid_files, "
            "or train.eval_every=0",
            field="train.eval_every",
        )
    if train.best_metric is not None:
        if train.best_metric not in BEST_METRICS:
            raise ConfigError(
                f"train.best_metric={train.best_metric!r} is not a validation metric; choose "
                f"{' or '.join(BEST_METRICS)}",
                field="train.best_metric",
            )
        if not train.eval_every:
            raise ConfigError(
                "train.best_metric needs validation during training: set train.eval_every=N "
                "(and data.valid_files)",
                field="train.best_metric",
            )


def loop_options(cfg: DistillConfig) -> dict[str, Any]:
    """The :class:`parallel.loop.LoopSettings` fields of sinks, validation and best checkpoint."""
    out, train = cfg.output, cfg.train
    return {
        "log_to": tuple(out.log_to),
        "wandb_project": out.wandb_project,
        "wandb_entity": out.wandb_entity,
        "wandb_mode": out.wandb_mode,
        "wandb_name": out.wandb_name,
        "eval_every": train.eval_every if cfg.data.valid_files else 0,
        "best_metric": train.best_metric,
        "best_mode": train.best_mode,
    }


def _cache_key(cfg: DistillConfig) -> dict[str, Any]:
    return {
        "valid_files": list(cfg.data.valid_files),
        "seq_length": cfg.data.seq_length,
        "global_batch_size": cfg.train.global_batch_size,
        "eval_batches": cfg.train.eval_batches,
        "teachers": [t.checkpoint for t in cfg.teachers],
        "seed": cfg.train.seed,
        "vocab_mapping": cfg.data.vocab_mapping,
    }


def read_teacher_cache(out_dir: Path, cfg: DistillConfig) -> dict[str, float] | None:
    """The cached teacher validation results for this config, or None."""
    try:
        data = json.loads((out_dir / TEACHER_CACHE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != _cache_key(cfg):
        return None
    values = data.get("values")
    return values if isinstance(values, dict) else None


def write_teacher_cache(out_dir: Path, cfg: DistillConfig, values: dict[str, float]) -> None:
    path = out_dir / TEACHER_CACHE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": _cache_key(cfg), "values": values}, indent=1))
    os.replace(tmp, path)


def make_validator(runtime, dataset, cfg: DistillConfig, ctx):
    """``validate(step) -> {"student_loss", "student_ppl", "teacher_loss", "teacher_ppl",
    "sequences", "seq_length"}`` over ``train.eval_batches`` global batches of ``dataset``
    (collective: every rank calls it at the same steps)."""
    import torch
    import torch.distributed as dist

    from gkd_cli.worker import evaluate

    out = Path(cfg.output.dir)
    has_teacher = bool(cfg.teachers)
    cached = read_teacher_cache(out, cfg) if has_teacher else {}
    # Every rank must agree (the teacher's cross entropy is a tensor-parallel collective).
    missing = torch.tensor([1 if cached is None else 0], dtype=torch.int32)
    if torch.cuda.is_available():
        missing = missing.cuda()
    dist.all_reduce(missing, op=dist.ReduceOp.MAX)
    state: dict[str, Any] = {"teacher": None if missing.item() else cached}
    if has_teacher and state["teacher"] is not None:
        log.info("teacher validation from %s: %s", out / TEACHER_CACHE, state["teacher"])

    def validate(step: int) -> dict[str, float]:
        need_teacher = has_teacher and state["teacher"] is None
        result = evaluate(
            runtime, dataset, cfg, ctx, max_batches=cfg.train.eval_batches, teacher=need_teacher
        )
        if need_teacher:
            teacher = {k: v for k, v in result.items() if k.startswith("teacher_")}
            state["teacher"] = teacher
            if ctx.rank == 0:
                write_teacher_cache(out, cfg, teacher)
        return {**result, **(state["teacher"] or {})}

    return validate
