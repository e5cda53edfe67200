"""The training loop: resume, step, log, checkpoint, and stop cleanly on preemption.

SIGTERM or SIGUSR1 (Slurm's preemption signals) only set a flag; the current step finishes, all
ranks agree on stopping (one all-reduce per step), a checkpoint is saved and the loop returns
``"preempted"`` so the worker exits 0. A rerun with the same output directory resumes from the
newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import checkpoint as ckpt
from parallel.sinks import MetricSinks, truncate_metrics  # noqa: F401 (public here too)

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass(kw_only=True)
class LoopSettings:
    steps: int
    save_every: int
    keep_last: int = 2
    log_every: int = 1
    out_dir: Path
    config_yaml: str = ""
    meta: dict = field(default_factory=dict)
    resume: bool = True
    extra_files: dict[str, Path] = field(default_factory=dict)
    """Files copied into every checkpoint (name -> source)."""
    stop_after: int | None = None
    """Stop (and save) after this many steps of this invocation: tests of interrupted runs."""
    log_to: Sequence[str] = ("jsonl",)
    """Metric sinks besides ``metrics.jsonl`` (always written): ``tensorboard``, ``wandb``."""
    wandb_project: str = "gkd"
    wandb_entity: str | None = None
    wandb_mode: str = "offline"
    wandb_name: str | None = None
    eval_every: int = 0
    """Call ``validate`` every N steps and at the last step (0: never)."""
    best_metric: str | None = None
    """``valid/<name>`` of the validation results whose best value marks ``checkpoints/best``."""
    best_mode: str = "min"
    """``min`` or ``max``: which direction of ``best_metric`` is better."""


@dataclass
class LoopOutcome:
    status: str
    """``"finished"`` or ``"preempted"``."""
    last_step: int
    checkpoint: Path | None
    validation: dict | None = None
    """The validation results of the last step (when it was a validation step), else None."""


def read_best(root: Path) -> dict | None:
    """``checkpoints/best.json`` ({"step", "folder", "metric", "value", "mode"}), or None."""
    try:
        data = json.loads((root / "best.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_best(root: Path, folder: Path, step: int, metric: str, value: float, mode: str) -> None:
    """Point ``checkpoints/best`` (the folder name, like ``latest``) and ``best.json`` at a saved
    checkpoint; both replaced atomically."""
    info = {"step": step, "folder": folder.name, "metric": metric, "value": value, "mode": mode}
    for name, text in (("best.json", json.dumps(info, indent=1)), ("best", folder.name + "\n")):
        tmp = root / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, root / name)


def _improves(value: float | None, best: float | None, mode: str) -> bool:
    if value is None or value != value:  # NaN never improves
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _hparams(settings: LoopSettings) -> dict:
    try:
        import yaml

        config = yaml.safe_load(settings.config_yaml) if settings.config_yaml else {}
    except Exception:  # the sinks record what they can; the run does not depend on it
        config = {}
    config = config if isinstance(config, dict) else {}
    return {
        "config": config,
        "config_yaml": settings.config_yaml,
        "methods": config.get("methods") or [],
    }


_EARLY_SIGNAL: dict[str, int | None] = {"signum": None}


def _early_handler(signum, frame) -> None:
    if _EARLY_SIGNAL["signum"] is None:
        log.warning(
            "received %s before training started: stopping before the first step",
            signal.Signals(signum).name,
        )
    _EARLY_SIGNAL["signum"] = signum


def install_early_stop() -> None:
    """From process start until :func:`train_loop` runs (data loading, token caches, model and
    teacher building), a preemption signal is remembered instead of killing the worker; the loop
    then stops before its first step and the worker exits 0, keeping the previous checkpoint.

    On Linux the worker also asks for SIGTERM when its parent (torchrun's agent) dies, so a
    ``kill -9`` of the launcher makes the workers save and exit instead of running orphaned; and
    the process megatron-core's checkpoint writer starts dies with the worker
    (:func:`bind_checkpoint_writer`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _early_handler)
    set_parent_death_signal(signal.SIGTERM)
    bind_checkpoint_writer()


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when the thread that started it exits
    (Linux ``prctl(PR_SET_PDEATHSIG)``); False where that does not exist."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: orphans are the job scheduler's to clean up
        return False


def _die_with_worker() -> None:
    # Runs first in megatron's writer-results Manager process (see bind_checkpoint_writer). It ends
    # with its worker only: a signal sent to every process of a job (Slurm's scancel --signal,
    # a Ctrl-C to the process group) must not take it down while its worker is saving.
    set_parent_death_signal(signal.SIGKILL)
    for sig in (*STOP_SIGNALS, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def bind_checkpoint_writer() -> None:
    """Make the helper processes of megatron-core's checkpoint writer die with this worker.

    ``dist_checkpointing.save`` (``FileSystemWriterAsync``, also for synchronous saves) collects
    write results through a queue served by a ``multiprocessing`` Manager: a *spawned* server
    process, plus multiprocessing's resource tracker. A worker that exits normally shuts both down,
    but after a ``kill -9`` of the worker they were re-parented to init and ran forever (holding
    memory, on GPU nodes a CUDA context). Here the Manager is started with an initializer that sets
    a parent-death signal (SIGKILL); with it gone, the tracker's pipe closes and it exits too. The
    Manager is still started lazily, by the first save, from the main thread (the parent-death
    signal follows the thread that started the process)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    # megatron-core 0.17 renamed _get_write_results_queue to get_write_results_queue(mp_mode).
    name = next(
        (n for n in ("get_write_results_queue", "_get_write_results_queue") if hasattr(fsa, n)),
        None,
    )
    if name is None or getattr(fsa, "_gkd_bound", False) or not hasattr(fsa, "_results_queue"):
        return

    def results_queue(mp_mode: str = "spawn"):
        if fsa._results_queue is None:
            import multiprocessing
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=multiprocessing.get_context(mp_mode))
            manager.start(initializer=_die_with_worker)
            fsa._results_queue = manager.Queue()
            fsa._gkd_manager = manager  # (megatron keeps only the queue proxy)
        return fsa._results_queue

    setattr(fsa, name, results_queue)
    fsa._gkd_bound = True  # (recorded on the patched module: bound once per process)


class _StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = _EARLY_SIGNAL["signum"]
        self._previous: dict = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            log.warning(
                "received %s: finishing the current step, then saving", signal.Signals(signum).name
            )
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def peak_memory_bytes() -> int:
    """Process high-water mark (GPU: allocator peak; CPU: peak resident set size)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if torch.cuda.is_available():
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def train_loop(
    runtime,
    batch_fn: Callable[[int], Sequence[torch.Tensor]],
    settings: LoopSettings,
    *,
    on_step: Callable[[dict], None] | None = None,
    validate: Callable[[int], dict] | None = None,
) -> LoopOutcome:
    """Run steps ``[resume point, settings.steps)``. ``batch_fn(step)`` returns this data-parallel
    rank's microbatches for ``step``; it must be a pure function of the step so that resumed runs
    see the same data as uninterrupted ones.

    ``validate(step)`` (collective, every rank) returns validation results ``{name: value}``; it
    runs every ``settings.eval_every`` steps and at the last step, and its results go into that
    step's record as ``valid`` (logged to every sink). With ``settings.best_metric``, a validation
    that improves it saves a checkpoint at that step (if none is due) and points
    ``checkpoints/best`` at it; pruning keeps the best checkpoint."""
    root = settings.out_dir / "checkpoints"
    start = 0
    if settings.resume:
        latest = ckpt.latest_complete(root)
        if latest is not None:
            ckpt.verify_manifest(latest)
            meta = runtime.load(latest)
            start = int(meta["step"])
            log.info("resumed from %s (step %d)", latest, start)
    rank0 = dist.get_rank() == 0
    sinks: MetricSinks | None = None
    best: dict | None = None
    if rank0:
        settings.out_dir.mkdir(parents=True, exist_ok=True)
        sinks = MetricSinks.from_names(
            settings.out_dir,
            settings.log_to,
            wandb_project=settings.wandb_project,
            wandb_entity=settings.wandb_entity,
            wandb_mode=settings.wandb_mode,
            wandb_name=settings.wandb_name,
        )
        sinks.open(start, _hparams(settings))
        best = read_best(root)
        if best is not None and (
            best.get("metric") != settings.best_metric or best["step"] > start
        ):
            best = None  # another metric, or a pointer past the resumed checkpoint: start over
    flag = _StopFlag()
    flag.install()
    last_saved: Path | None = None
    step = start
    validation: dict | None = None
    try:
        if _any_rank(flag.signum is not None):  # preempted while loading: keep what is saved
            return LoopOutcome("preempted", start, ckpt.latest_complete(root))
        for step in range(start, settings.steps):
            result = runtime.train_step(step, batch_fn(step))
            done = step + 1
            record = {
                "step": done,
                "total_steps": settings.steps,
                "consumed_tokens": done * result.tokens,
                "loss": result.loss,
                "terms": result.terms,
                "lr": result.lr,
                "grad_norm": result.grad_norm,
                "skipped": result.skipped,
                "skipped_steps": int(getattr(runtime, "skipped_steps", 0)),
                "step_time_s": result.seconds,
                "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
                "peak_mem_bytes": peak_memory_bytes(),
                "peak_allocated_bytes": runtime.stage.memory.reset(),
                "baseline_allocated_bytes": runtime.baseline_memory_bytes,
            }
            validation = None
            if (
                validate is not None
                and settings.eval_every
                and (done % settings.eval_every == 0 or done == settings.steps)
            ):
                validation = dict(validate(done))  # collective: every rank runs it
                record["valid"] = validation
            improved = False
            if validation is not None and settings.best_metric:
                name = settings.best_metric.removeprefix("valid/")
                value = validation.get(name)
                improved = rank0 and _improves(
                    value, best["value"] if best else None, settings.best_mode
                )
                improved = _any_rank(improved)  # rank 0 decides; a save is collective
            if sinks is not None and (
                done % settings.log_every == 0 or done == settings.steps or validation is not None
            ):
                sinks.write(record)
            if on_step is not None:
                on_step(record)
            interrupted = settings.stop_after is not None and done - start >= settings.stop_after
            stop = _any_rank(flag.signum is not None) or interrupted
            if (
                (settings.save_every and done % settings.save_every == 0)
                or done == settings.steps
                or stop
                or improved
            ):
                last_saved = runtime.save(
                    root,
                    step=done,
                    meta=settings.meta,
                    config_yaml=settings.config_yaml,
                    keep_last=settings.keep_last,
                    extra_files=settings.extra_files or None,
                )
            if improved and rank0 and last_saved is not None and settings.best_metric:
                value = float(validation[settings.best_metric.removeprefix("valid/")])  # type: ignore[index]
                _write_best(root, last_saved, done, settings.best_metric, value, settings.best_mode)
                best = {"step": done, "metric": settings.best_metric, "value": value}
            if stop:
                return LoopOutcome("preempted", done, last_saved)
        return LoopOutcome("finished", settings.steps, last_saved, validation)
    finally:
        flag.restore()
        if sinks is not None:
            sinks.close()
