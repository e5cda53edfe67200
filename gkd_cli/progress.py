"""Live progress of a run, fed by tailing ``<output.dir>/metrics.jsonl`` from a thread.

Rank 0 of the workers appends one JSON object per logged step::

    {"step": 10, "consumed_tokens": 40960, "loss": 2.31, "terms": {"glmd.kl": 2.31},
     "lr": 0.0003, "grad_norm": 0.8, "tokens_per_s": 12345.6, "peak_mem_bytes": 123456789}

``step`` counts completed optimizer steps; validation steps (``train.eval_every``) also carry
``"valid": {"student_loss": ..., "student_ppl": ..., "teacher_ppl": ...}``. On a terminal the
launcher shows a Rich progress bar (step of total, tokens/s, ETA, total loss and each method's
term) and prints validation results above it; otherwise (a log file, CI, a Slurm job's output
file) it prints one plain line per record. Under Slurm, the launcher's stdout is the job's
``--output`` file (``logs/slurm-<job>.out``), so the plain lines land there; a Rich bar is never
drawn into a file there, even when ``FORCE_COLOR`` or ``TTY_COMPATIBLE`` make Rich treat it as a
terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

Record = dict[str, Any]


class MetricsTailer(threading.Thread):
    """Follows a JSON-lines file that is being appended to and calls ``on_record`` for each
    complete line (a partial last line waits for its newline). The file may not exist yet.
    ``skip_existing`` ignores what the file already holds (a resumed run's earlier steps)."""

    def __init__(
        self,
        path: str | os.PathLike,
        on_record: Callable[[Record], None],
        *,
        poll_s: float = 0.5,
        skip_existing: bool = False,
    ) -> None:
        super().__init__(name="gkd-metrics-tailer", daemon=True)
        self.path = Path(path)
        self.on_record = on_record
        self.poll_s = poll_s
        self._stop_event = threading.Event()
        self._offset = 0
        if skip_existing:
            self._skip_to_last_newline()

    def _skip_to_last_newline(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        self._offset = data.rfind(b"\n") + 1

    def read_new(self) -> int:
        """Read what was appended since the last call; return the number of records seen."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return 0
        # Only consume up to the last newline: a line being written is read again next time.
        end = data.rfind(b"\n") + 1
        self._offset += end
        lines = data[:end].decode("utf-8", errors="replace").split("\n")
        seen = 0
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn or foreign line must not stop the display
            if isinstance(record, dict):
                self.on_record(record)
                seen += 1
        return seen

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.read_new()
            self._stop_event.wait(self.poll_s)

    def stop(self) -> None:
        """Stop following and deliver whatever complete lines remain."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self.read_new()


def _format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class RateTracker:
    """ETA from the steps seen in this session (robust to resumed runs), falling back to the
    record's own tokens/s before two records have arrived."""

    def __init__(self, total_steps: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_steps = total_steps
        self.clock = clock
        self._first: tuple[int, float] | None = None

    def eta(self, record: Record) -> float | None:
        step = int(_number(record.get("step")) or 0)
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        remaining = max(0, self.total_steps - step)
        if step > first_step and now > first_time:
            return remaining * (now - first_time) / (step - first_step)
        tokens, tps = _number(record.get("consumed_tokens")), _number(record.get("tokens_per_s"))
        if step > 0 and tokens and tps:
            return remaining * (tokens / step) / tps
        return None


def format_terms(record: Record) -> str:
    terms = record.get("terms")
    if not isinstance(terms, dict) or not terms:
        return ""
    return " ".join(
        f"{name} {value:.4f}" for name, value in terms.items() if _number(value) is not None
    )


def format_validation(record: Record) -> str:
    """``valid loss 2.3100 ppl 10.07 (teacher ppl 8.00)``, or "" when the record has none."""
    valid = record.get("valid")
    if not isinstance(valid, dict):
        return ""
    parts = ["valid"]
    loss, ppl = _number(valid.get("student_loss")), _number(valid.get("student_ppl"))
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if ppl is not None:
        parts.append(f"ppl {ppl:.2f}")
    teacher = _number(valid.get("teacher_ppl"))
    if teacher is not None:
        parts.append(f"(teacher ppl {teacher:.2f})")
    return " ".join(parts) if len(parts) > 1 else ""


def format_line(record: Record, total_steps: int, eta_s: float | None = None) -> str:
    """One plain progress line (no colour), e.g.
    ``step 10/100 (10%) | loss 2.3100 | glmd.kl 2.3100 | lr 3.00e-04 | grad 0.800 |
    12,346 tok/s | eta 0:01:23 | mem 1.23 GiB``."""
    step = int(_number(record.get("step")) or 0)
    parts = [f"step {step}/{total_steps} ({step / max(total_steps, 1):.0%})"]
    loss = _number(record.get("loss"))
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    terms = format_terms(record)
    if terms:
        parts.append(terms)
    lr, grad = _number(record.get("lr")), _number(record.get("grad_norm"))
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if grad is not None:
        parts.append(f"grad {grad:.3f}")
    tps = _number(record.get("tokens_per_s"))
    if tps is not None:
        parts.append(f"{tps:,.0f} tok/s")
    if eta_s is not None:
        parts.append(f"eta {_format_duration(eta_s)}")
    mem = _number(record.get("peak_mem_bytes"))
    if mem is not None:
        parts.append(f"mem {mem / 1024**3:.2f} GiB")
    valid = format_validation(record)
    if valid:
        parts.append(valid)
    return " | ".join(parts)


class ProgressSink(Protocol):
    def start(self) -> None: ...
    def update(self, record: Record) -> None: ...
    def stop(self) -> None: ...


class LineSink:
    """Plain lines, one per record (stdout is not a terminal)."""

    def __init__(
        self,
        total_steps: int,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        self.stream = stream
        self.rates = RateTracker(total_steps, clock)
        self.last: Record | None = None

    def start(self) -> None:
        pass

    def update(self, record: Record) -> None:
        self.last = record
        stream = self.stream or sys.stdout
        stream.write(format_line(record, self.total_steps, self.rates.eta(record)) + "\n")
        stream.flush()

    def stop(self) -> None:
        pass


class RichSink:
    """A Rich progress bar: step of total, tokens/s, ETA, total loss and each term."""

    def __init__(self, total_steps: int, console=None) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self.total_steps = total_steps
        self.rates = RateTracker(total_steps)
        self.last: Record | None = None
        self.progress = Progress(
            TextColumn("[bold]distill[/]"),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[speed]}"),
            TextColumn("eta {task.fields[eta]}"),
            TextColumn("{task.fields[losses]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "distill", total=total_steps, speed="", eta="-:--:--", losses="waiting for step 1"
        )

    def start(self) -> None:
        self.progress.start()

    def update(self, record: Record) -> None:
        self.last = record
        step = _number(record.get("step")) or 0
        tps = _number(record.get("tokens_per_s"))
        loss = _number(record.get("loss"))
        losses = f"loss {loss:.4f}" if loss is not None else ""
        terms = format_terms(record)
        if terms:
            losses += f" ({terms})"
        self.progress.update(
            self.task,
            completed=step,
            speed=f"{tps:,.0f} tok/s" if tps is not None else "",
            eta=_format_duration(self.rates.eta(record)),
            losses=losses,
        )
        valid = format_validation(record)
        if valid:  # above the bar, so each validation stays on screen
            self.progress.console.print(f"step {step:.0f}: {valid}", markup=False, highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def wants_bar(console, environ: Mapping[str, str] | None = None) -> bool:
    """A Rich bar on a terminal; plain lines otherwise, and always in a Slurm job whose stdout
    is not a real terminal (its output file), whatever Rich was told by the environment."""
    environ = os.environ if environ is None else environ
    if not console.is_terminal:
        return False
    if environ.get("SLURM_JOB_ID"):
        try:
            return os.isatty(console.file.fileno())
        except (AttributeError, OSError, ValueError):
            return False
    return True


@contextlib.contextmanager
def follow_metrics(
    metrics_path: str | os.PathLike,
    total_steps: int,
    *,
    console=None,
    sink: ProgressSink | None = None,
    poll_s: float = 0.5,
    skip_existing: bool = False,
) -> Iterator[ProgressSink]:
    """Show progress while the body runs (the launcher blocks in it). Picks a Rich bar when
    ``console`` is a terminal and plain lines otherwise; yields the sink (its ``last`` record is
    the final metrics)."""
    if sink is None:
        if console is not None and wants_bar(console):
            sink = RichSink(total_steps, console)
        else:
            sink = LineSink(total_steps, stream=console.file if console is not None else None)
    tailer = MetricsTailer(metrics_path, sink.update, poll_s=poll_s, skip_existing=skip_existing)
    sink.start()
    tailer.start()
    try:
        yield sink
    finally:
        tailer.stop()
        sink.stop()


def rank_logging() -> int:
    """Configure a worker process's logging: INFO on global rank 0, WARNING elsewhere, each
    line prefixed with ``[rankN]``, to stderr. Returns the rank (torchrun's ``RANK``, 0 alone)."""
    import logging

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    return rank
