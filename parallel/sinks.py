"""Where the training loop's per-step records go: ``metrics.jsonl`` (always), TensorBoard event
files and Weights & Biases (``output.log_to``). Only the rank that writes ``metrics.jsonl``
(global rank 0) opens sinks.

A record is the loop's dict (``step``, ``loss``, ``terms`` {"glmd/kl": ...}, ``lr``,
``grad_norm``, ``tokens_per_s``, memory, ``skipped``, and ``valid`` {"student_loss": ...} at
validation steps). TensorBoard and W&B get it flattened into scalars (:func:`scalars`):
``loss/total``, ``loss/<term>``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``,
``train/step_time_s``, ``train/skipped``, ``train/skipped_steps``, ``memory/peak_gib``,
``memory/peak_allocated_gib``, ``valid/<name>``; all at ``step`` (completed optimizer steps).

Resume continues the same curves. ``metrics.jsonl`` drops the lines of steps after the resumed
checkpoint (they are re-run). TensorBoard: the new writer purges events at steps after the
checkpoint (``purge_step``; TensorBoard's readers drop them). W&B cannot rewrite logged steps: the
run id is kept in ``<output.dir>/wandb/gkd_wandb.json`` with the last step logged, the resumed
run continues that id (``resume="allow"``) and logs only later steps, so a re-run step keeps the
value first logged (equal to the re-run's at the same layout; see the resume tests).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SINKS = ("jsonl", "tensorboard", "wandb")
"""Names accepted in ``output.log_to``."""
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The pip extra of gkd that installs each optional sink."""


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra to install."""


def missing_extra_message(package: str, extra: str, what: str) -> str:
    return (
        f"{what} needs the '{package}' package, which is not installed; install it with "
        f"pip install 'gkd[{extra}]' (or pip install {package})"
    )


def check_sink_packages(log_to: Sequence[str]) -> None:
    """Raise :class:`MissingExtraError` when a chosen sink's package is missing (the launcher
    calls this before anything starts)."""
    import importlib.util

    for name in log_to:
        if name in EXTRAS and importlib.util.find_spec(name) is None:
            raise MissingExtraError(
                missing_extra_message(name, EXTRAS[name], f"output.log_to: {name}")
            )


def _finite_or_nan(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The record as ``{tag: value}`` (see the module docstring for the tags)."""
    out: dict[str, float] = {}

    def put(tag: str, value: Any, scale: float = 1.0) -> None:
        number = _finite_or_nan(value)
        if number is not None:
            out[tag] = number * scale

    put("loss/total", record.get("loss"))
    for name, value in (record.get("terms") or {}).items():
        put(f"loss/{name}", value)
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "skipped", "skipped_steps"):
        put(f"train/{key}", record.get(key))
    put("train/consumed_tokens", record.get("consumed_tokens"))
    gib = 1.0 / 1024**3
    put("memory/peak_gib", record.get("peak_mem_bytes"), gib)
    put("memory/peak_allocated_gib", record.get("peak_allocated_bytes"), gib)
    for name, value in (record.get("valid") or {}).items():
        if name not in ("sequences", "seq_length"):  # the set's size, not a result
            put(f"valid/{name}", value)
    return out


def flat_hparams(config: Mapping[str, Any] | list, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 3e-4, "methods.0.name": "glmd", ...}``: scalars as they are, ``None`` as
    the string ``"null"``; what TensorBoard's HParams and W&B's config show."""
    out: dict[str, Any] = {}
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (isinstance(value, list) and value):
            if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
                out[name] = json.dumps(value)
            else:
                out.update(flat_hparams(value, name + "."))
        elif value is None:
            out[name] = "null"
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps ``<= step`` (the resumed checkpoint's) in ``path``: the steps
    after it are re-run and logged again, so that every step appears once, as the surviving run
    computed it. Rewritten atomically (a temporary file, then ``os.replace``); a torn last line
    left by a killed writer is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] <= step
        ):
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class JsonlSink:
    """``<output.dir>/metrics.jsonl``: one JSON object per logged step (``gkd distill``'s progress
    display and ``gkd report`` read it)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "metrics.jsonl"

    def open(self, start: int, hparams: Mapping[str, Any]) -> None:
        truncate_metrics(self.path, start)

    def write(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Event files under ``<output.dir>/tensorboard`` (``tensorboard --logdir <output.dir>``)."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / "tensorboard"
        self.writer: Any = None

    def open(self, start: int, hparams: Mapping[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams as hparams_summary
        except ImportError as exc:
            raise MissingExtraError(
                missing_extra_message("tensorboard", "tensorboard", "output.log_to: tensorboard")
            ) from exc
        # purge_step: TensorBoard drops the events an earlier attempt wrote at steps > start.
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=start + 1, flush_secs=30)
        flat = flat_hparams(hparams.get("config", {}))
        for summary in hparams_summary(flat, {}):
            self.writer.file_writer.add_summary(summary, global_step=start)
        config_text = hparams.get("config_yaml") or json.dumps(hparams.get("config"), indent=1)
        indented = "\n".join("    " + line for line in str(config_text).splitlines())
        self.writer.add_text("config", indented, global_step=start)
        methods = hparams.get("methods") or []
        self.writer.add_text(
            "methods",
            "\n".join("    " + json.dumps(m, default=str) for m in methods),
            global_step=start,
        )

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """A Weights & Biases run (``output.wandb_mode``: offline by default, no network: the run
    lands in ``<output.dir>/wandb/offline-run-*``; ``wandb sync <that folder>`` uploads it)."""

    def __init__(
        self, out_dir: Path, *, project: str, entity: str | None, mode: str, name: str | None
    ) -> None:
        self.out_dir = out_dir
        self.state_path = out_dir / "wandb" / "gkd_wandb.json"
        self.project, self.entity, self.mode, self.name = project, entity, mode, name
        self.run: Any = None
        self.last_step = 0

    def _write_state(self, run_id: str) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps({"run_id": run_id, "last_step": self.last_step}))
        os.replace(tmp, self.state_path)

    def open(self, start: int, hparams: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise MissingExtraError(
                missing_extra_message("wandb", "wandb", "output.log_to: wandb")
            ) from exc
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {}
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
            except ValueError:
                state = {}
        run_id = state.get("run_id") or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        self.last_step = int(state.get("last_step", 0))
        config = {**flat_hparams(hparams.get("config", {})), "methods": hparams.get("methods")}
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.name or self.out_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.out_dir),
            mode=self.mode,  # type: ignore[arg-type]
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )
        self._write_state(run_id)

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        if step <= self.last_step:  # logged by an earlier attempt: W&B keeps steps increasing
            return
        values = {k: v for k, v in scalars(record).items() if not math.isnan(v)}
        self.run.log(values, step=step)
        self.last_step = step
        self._write_state(self.run.id)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MetricSinks:
    """The sinks of one run; ``open(start)`` after resuming from step ``start``."""

    def __init__(self, sinks: Sequence[Any]) -> None:
        self.sinks = list(sinks)

    @classmethod
    def from_names(
        cls,
        out_dir: Path,
        log_to: Sequence[str],
        *,
        wandb_project: str = "gkd",
        wandb_entity: str | None = None,
        wandb_mode: str = "offline",
        wandb_name: str | None = None,
    ) -> MetricSinks:
        unknown = [n for n in log_to if n not in SINKS]
        if unknown:
            raise ValueError(f"output.log_to: unknown sink(s) {unknown}; choose from {SINKS}")
        sinks: list[Any] = [JsonlSink(out_dir)]  # always: progress display and gkd report
        if "tensorboard" in log_to:
            sinks.append(TensorBoardSink(out_dir))
        if "wandb" in log_to:
            sinks.append(
                WandbSink(
                    out_dir,
                    project=wandb_project,
                    entity=wandb_entity,
                    mode=wandb_mode,
                    name=wandb_name,
                )
            )
        return cls(sinks)

    def open(self, start: int, hparams: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.open(start, hparams)

    def write(self, record: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # a sink's shutdown must not hide the run's own outcome
                log.warning("closing %s failed: %s", type(sink).__name__, exc)
