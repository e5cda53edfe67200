"""``gkd eval``: score checkpoints on benchmarks. Mounted by ``gkd_cli.app`` as a sub-app::

    gkd eval superglue CHECKPOINT --data DIR [--tasks all|boolq,cb,...] [--split val] [--shots K]
        [--out results.json] [--tp N --pp N --dp N] [--limit N] [--predictions]
        [--tokenizer PATH] [--add-bos/--no-add-bos]
    gkd eval superglue --compare A B [...]   # A, B: results JSON files or checkpoints
    gkd eval lm-eval CHECKPOINT --tasks a,b [--include-path DIR] [--num-fewshot K] [--limit N]
        [--tp N --pp N --dp N] [--max-length L] [--log-samples] [--out results.json]

``lm-eval`` runs lm-evaluation-harness (an optional extra, ``pip install 'gkd[lm-eval]'``) with
:class:`gkd_cli.lm_eval_model.GkdLM`: rank 0 of :mod:`gkd_cli.lm_eval_worker` drives
``lm_eval.simple_evaluate``, the other ranks serve its scoring calls.

A checkpoint is scored by torchrun workers (:mod:`gkd_cli.eval_worker`, started through
:func:`gkd_cli.launch.run_local`) at the requested TP/PP/DP layout, whatever layout it was saved
at. The command prints a Rich table (task, metrics, score, examples, shots, seconds) and the
SuperGLUE average, and writes the results JSON (:mod:`gkd_cli.superglue.results`). ``--compare``
shows two results side by side with deltas (B - A); checkpoints among A and B are evaluated first
with the same settings.

Input errors (missing checkpoint, unknown task, no data directory, bad layout) print as one red
line and exit with code 2, before any worker starts. Importing this module imports neither torch
nor megatron-core.
"""

from __future__ import annotations

import functools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from gkd_cli.errors import ConfigError, GkdError, WorkerFailedError

DATA_ENV = "GKD_SUPERGLUE_DIR"
"""Environment variable naming the default SuperGLUE data directory."""
DEFAULT_OUT = Path("superglue_results.json")
WORKER_MODULE = "gkd_cli.eval_worker"
PRECISIONS = ("auto", "bf16", "fp32")

eval_app = typer.Typer(
    help="Evaluate checkpoints on benchmarks (SuperGLUE, lm-evaluation-harness).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@eval_app.callback()
def _group() -> None:
    """Evaluate checkpoints on benchmarks (SuperGLUE, lm-evaluation-harness)."""


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _report_errors(fn):
    """Input errors as one red line with their exit code; a failed worker also shows its
    traceback and log path."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        console = _err()
        try:
            return fn(*args, **kwargs)
        except WorkerFailedError as err:
            console.print(Text(f"error: {err}", style="bold red"), soft_wrap=True)
            if err.traceback:
                console.print(Text(err.traceback.rstrip(), style="dim"), soft_wrap=True)
            if err.log_path:
                console.print(Text(f"log of rank {err.rank}: {err.log_path}"), soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except GkdError as err:
            console.print(Text(f"error: {err}", style="bold red"), soft_wrap=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper


# ---------------------------------------------------------------------------------------------
# settings and checks (no torch)
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class EvalSettings:
    """What every evaluated checkpoint of one command shares."""

    tasks: list[str]
    """Official task names."""
    data_dir: Path | None
    """SuperGLUE data directory (checked when a checkpoint is evaluated)."""
    split: str | None
    """Split; None: each task's default."""
    shots: int
    """Few-shot examples per prompt."""
    normalize: bool | None
    """Length normalization; None: each task's default."""
    seed: int
    """Few-shot draw seed."""
    limit: int | None
    """First N examples of each task (MultiRC: questions)."""
    predictions: bool
    """Write per-example predictions."""
    tokenizer: Path | None
    """Tokenizer override; None: the checkpoint's."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size."""
    micro_batch_size: int
    """Packed rows per forward pass."""
    seq_length: int | None
    """Scoring window; None: the model's max_seq_len."""
    precision: str
    """auto, bf16 or fp32."""
    add_bos: bool | None = None
    """Prepend the tokenizer's BOS token; None: when the tokenizer itself adds one."""


def parse_tasks(text: str) -> list[str]:
    """``all`` -> the eight benchmark tasks; else a comma list of task names (any case)."""
    from gkd_cli.superglue import BENCHMARK_TASKS, get_task

    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(
            "--tasks is empty; give all or a comma list such as boolq,cb", field="tasks"
        )
    if len(names) == 1 and names[0].lower() == "all":
        return list(BENCHMARK_TASKS)
    tasks = []
    for name in names:
        try:
            task = get_task(name).name
        except ValueError as error:
            raise ConfigError(f"--tasks: {error}", field="tasks") from None
        if task not in tasks:
            tasks.append(task)
    return tasks


def resolve_data_dir(data: Path | None, environ: dict[str, str] | None = None) -> Path:
    """``--data``, else ``$GKD_SUPERGLUE_DIR``; it must be a directory."""
    environ = dict(os.environ) if environ is None else environ
    if data is None:
        if not environ.get(DATA_ENV):
            raise ConfigError(
                f"no SuperGLUE data: pass --data DIR (a folder with {{Task}}/{{split}}.jsonl files, "
                f"e.g. BoolQ/val.jsonl) or set {DATA_ENV}",
                field="data",
            )
        data = Path(environ[DATA_ENV])
        where = f"{DATA_ENV}={data}"
    else:
        where = f"--data {data}"
    if not data.is_dir():
        raise ConfigError(
            f"{where}: no such directory; point it at the SuperGLUE data folder", field="data"
        )
    return data


def check_task_files(data_dir: Path, tasks: list[str], split: str | None, shots: int) -> None:
    """Every task has the split to score (and ``train`` for few-shot prompts)."""
    from gkd_cli.superglue import available_splits, get_task, task_path

    for task in tasks:
        spec = get_task(task)
        needed = [split or spec.eval_split] + (["train"] if shots > 0 else [])
        for name in needed:
            if not task_path(data_dir, task, name).is_file():
                present = available_splits(data_dir, task)
                raise ConfigError(
                    f"{task_path(data_dir, task, name)} does not exist (splits of {task} there: "
                    f"{', '.join(present) or 'none'}); choose --split or --tasks accordingly",
                    field="split",
                )


def checkpoint_info(path: Path, tp: int, pp: int) -> tuple[Path, dict]:
    """The checkpoint folder under ``path`` and its meta.json, checked against the layout."""
    from parallel import checkpoint as ckpt
    from parallel.config import ModelArch

    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist", field="checkpoint")
    try:
        folder = ckpt.resolve(path)
        meta = ckpt.read_meta(folder)
    except ckpt.CheckpointError as error:
        raise ConfigError(str(error), field="checkpoint") from None
    if not isinstance(meta.get("arch"), dict):
        raise ConfigError(
            f"{folder}/meta.json has no 'arch': not a gkd model checkpoint", field="checkpoint"
        )
    try:
        arch = ModelArch(**meta["arch"])
        arch.check_parallel(tp, pp, where="checkpoint arch")
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{folder}: {error}", field="checkpoint") from None
    return folder, meta


def _config_tokenizer(config_yaml: Path) -> str | None:
    import yaml

    try:
        data = yaml.safe_load(config_yaml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if isinstance(data, dict) and isinstance(data.get("data"), dict):
        value = data["data"].get("tokenizer")
        return str(value) if value else None
    return None


def default_tokenizer(folder: Path, meta: dict) -> Path:
    """The checkpoint's tokenizer: meta.json ``tokenizer``, a ``tokenizer/`` folder inside the
    checkpoint (imported models), or ``data.tokenizer`` of the config.yaml saved with it or with
    its run."""
    candidates: list[Path] = []
    if meta.get("tokenizer"):
        candidates.append(Path(meta["tokenizer"]))
    candidates.append(folder / "tokenizer")
    for config in (folder / "config.yaml", folder.parent.parent / "config.yaml"):
        value = _config_tokenizer(config) if config.is_file() else None
        if value:
            candidates.append(Path(value))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    named = [str(c) for c in candidates if c != folder / "tokenizer"]
    raise ConfigError(
        f"the tokenizer of {folder} "
        + (f"({', '.join(named)}) does not exist" if named else "is not recorded with it")
        + "; pass --tokenizer PATH",
        field="tokenizer",
    )


def model_label(folder: Path) -> str:
    """``run@step_0000100`` for a run's checkpoint, else the folder name."""
    if folder.parent.name == "checkpoints":
        return f"{folder.parent.parent.name}@{folder.name}"
    return folder.name


def _check_tokenizer(path: Path, folder: Path, meta: dict, add_bos: bool | None) -> str:
    """Check the tokenizer against the model; return the line saying how prompts start."""
    from gkd_cli.data import load_tokenizer
    from gkd_cli.eval_worker import find_vocab_mapping, prompt_prefix, vocabulary_hook

    try:
        tokenizer = load_tokenizer(path)
        vocabulary_hook(tokenizer, int(meta["arch"]["vocab_size"]), find_vocab_mapping(folder))
        return prompt_prefix(tokenizer, add_bos).describe()
    except ValueError as error:
        raise ConfigError(f"--tokenizer {path}: {error}", field="tokenizer") from None


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def build_job(checkpoint: Path, out: Path, settings: EvalSettings) -> tuple[Any, Path, str]:
    """Check everything a worker needs and return the job, the folder of its logs and the line
    saying how prompts start (:func:`gkd_cli.eval_worker.prompt_prefix`)."""
    from gkd_cli.eval_worker import EvalJob

    folder, meta = checkpoint_info(checkpoint, settings.tp, settings.pp)
    if settings.data_dir is None:
        raise ConfigError("no SuperGLUE data directory", field="data")
    check_task_files(settings.data_dir, settings.tasks, settings.split, settings.shots)
    tokenizer = settings.tokenizer or default_tokenizer(folder, meta)
    if not tokenizer.exists():
        raise ConfigError(f"--tokenizer {tokenizer} does not exist", field="tokenizer")
    prefix = _check_tokenizer(tokenizer, folder, meta, settings.add_bos)
    max_len = int(meta["arch"].get("max_seq_len", 1024))
    if settings.seq_length is not None and not 2 <= settings.seq_length <= max_len:
        raise ConfigError(
            f"--seq-length {settings.seq_length} must lie in [2, {max_len}] (the model's max_seq_len)",
            field="seq_length",
        )
    job = EvalJob(
        checkpoint=str(folder.resolve()),
        tokenizer=str(tokenizer.resolve()),
        data_dir=str(settings.data_dir.resolve()),
        tasks=list(settings.tasks),
        out=str(out.resolve()),
        split=settings.split,
        shots=settings.shots,
        normalize=settings.normalize,
        seed=settings.seed,
        limit=settings.limit,
        predictions=settings.predictions,
        tp=settings.tp,
        pp=settings.pp,
        dp=settings.dp,
        micro_batch_size=settings.micro_batch_size,
        seq_length=settings.seq_length,
        precision=settings.precision,
        add_bos=settings.add_bos,
        model_name=model_label(folder),
    )
    return job, out.resolve().parent / f"{out.stem}.logs", prefix


def launch_plan(job_path: Path, world_size: int, log_dir: Path):
    """A single-node torchrun plan running :mod:`gkd_cli.eval_worker` on ``job_path``."""
    from gkd_cli.launch import plan_workers

    return plan_workers(
        entry_module=WORKER_MODULE,
        args=["--spec", str(job_path)],
        world_size=world_size,
        log_dir=log_dir,
        run_id="gkd-eval",
    )


def evaluate_checkpoint(
    checkpoint: Path, out: Path, settings: EvalSettings, console: Console
) -> dict:
    """Score ``checkpoint`` with torchrun workers; return the results document written to ``out``."""
    from gkd_cli import launch
    from gkd_cli.superglue import load_results

    job, log_dir, prefix = build_job(checkpoint, out, settings)
    world = settings.tp * settings.pp * settings.dp
    job_path = job.save(log_dir / "job.json")
    console.print(
        f"scoring {job.checkpoint} on {', '.join(job.tasks)} with {world} process(es) "
        f"(tp={settings.tp} pp={settings.pp} dp={settings.dp}); logs in {log_dir}",
        markup=False,
    )
    console.print(prefix, markup=False)
    Path(job.out).unlink(missing_ok=True)
    launch.run_local(launch_plan(job_path, world, log_dir))
    if not Path(job.out).is_file():
        raise GkdError(f"the workers finished but wrote no results to {job.out}; see {log_dir}")
    return load_results(job.out)


def print_results(document: dict, console: Console) -> None:
    from gkd_cli.superglue import TASKS, render_results

    console.print(render_results(document))
    if document.get("average") is None:
        present = [t for t in document["tasks"] if t in TASKS and TASKS[t].in_average]
        console.print(
            f"SuperGLUE average: n/a (needs all eight benchmark tasks, these results have {len(present)})",
            markup=False,
        )
    else:
        console.print(f"SuperGLUE average: {document['average']:.1f}", markup=False)


# Options both scoring commands take (superglue, lm-eval).
TokenizerOption = Annotated[
    Path | None,
    typer.Option(
        help="Tokenizer (default: the one recorded with the checkpoint).", show_default=False
    ),
]
TpOption = Annotated[int, typer.Option(help="Tensor-parallel size.")]
PpOption = Annotated[int, typer.Option(help="Pipeline-parallel size.")]
DpOption = Annotated[int, typer.Option(help="Data-parallel replicas.")]
MicroBatchOption = Annotated[int, typer.Option(help="Packed rows per forward pass.")]
PrecisionOption = Annotated[
    str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
]


def _check_run_options(precision: str, **counts: int | tuple[int, int]) -> None:
    """``ConfigError`` naming the option: each count (``name=value``, at least 1, or
    ``name=(value, least)``) below its least value, or a ``--precision`` gkd does not know."""
    for key, given in counts.items():
        value, least = given if isinstance(given, tuple) else (given, 1)
        name = key.replace("_", "-")
        if value < least:
            raise ConfigError(f"--{name} must be >= {least}, got {value}", field=name)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}", field="precision"
        )


def _is_results_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".json"


def _compare_out(out: Path, tag: str) -> Path:
    return out.with_name(f"{out.stem}.{tag}{out.suffix or '.json'}")


def _label(document: dict, fallback: str) -> str:
    return str(document.get("model") or fallback)


# ---------------------------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------------------------


@eval_app.command("superglue")
@_report_errors
def superglue(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="gkd checkpoint folder, checkpoints/ root or run directory (newest complete "
            "checkpoint).",
            show_default=False,
            metavar="CHECKPOINT",
        ),
    ] = None,
    tasks: Annotated[
        str,
        typer.Option(
            help="all (the eight benchmark tasks) or a comma list: boolq,cb,copa,multirc,"
            "record,rte,wic,wsc,axb,axg."
        ),
    ] = "all",
    data: Annotated[
        Path | None,
        typer.Option(
            help=f"SuperGLUE data directory ({{Task}}/{{split}}.jsonl); default ${DATA_ENV}.",
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Split to score: val, dev32, train, test, unlabeled (default: each task's; "
            "val, ReCoRD dev32).",
            show_default=False,
        ),
    ] = None,
    shots: Annotated[int, typer.Option(help="Few-shot examples per prompt, drawn from train.")] = 0,
    out: Annotated[
        Path,
        typer.Option(
            help="Results JSON to write (with --compare: OUT.a.json, OUT.b.json for "
            "evaluated checkpoints)."
        ),
    ] = DEFAULT_OUT,
    tp: TpOption = 1,
    pp: PpOption = 1,
    dp: DpOption = 1,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Score only the first N examples of each task (MultiRC: the first N questions, "
            "with all their answer options).",
            show_default=False,
        ),
    ] = None,
    predictions: Annotated[
        bool, typer.Option("--predictions", help="Also write per-example predictions and prompts.")
    ] = False,
    tokenizer: TokenizerOption = None,
    normalize: Annotated[
        bool | None,
        typer.Option(
            "--normalize/--no-normalize",
            help="Rank options by per-token log-likelihood (default: each task's).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the few-shot draws.")] = 1234,
    micro_batch_size: MicroBatchOption = 8,
    seq_length: Annotated[
        int | None,
        typer.Option(
            help="Scoring window in tokens (default: the model's max_seq_len); longer "
            "contexts are cut from the left.",
            show_default=False,
        ),
    ] = None,
    precision: PrecisionOption = "auto",
    add_bos: Annotated[
        bool | None,
        typer.Option(
            "--add-bos/--no-add-bos",
            help="Put the tokenizer's BOS token (its end-of-document "
            "token if it has none) before every prompt, or nothing (default: as the tokenizer "
            "does, like lm-evaluation-harness).",
            show_default=False,
        ),
    ] = None,
    compare: Annotated[
        tuple[Path, Path] | None,
        typer.Option(
            help="Compare A and B (results JSON files or checkpoints) with deltas B - A.",
            metavar="A B",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Score a checkpoint on SuperGLUE (log-likelihood ranking of each task's options, official
    metrics), or compare two results."""
    from gkd_cli.superglue import SPLITS, load_results, render_compare
    from gkd_cli.superglue import compare as compare_rows

    console = _out()
    _check_run_options(
        precision, tp=tp, pp=pp, dp=dp, shots=(shots, 0), micro_batch_size=micro_batch_size
    )
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}", field="limit")
    if split is not None and split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not one of {', '.join(SPLITS)}", field="split")
    if checkpoint is not None and compare is not None:
        raise ConfigError("give either CHECKPOINT or --compare A B, not both", field="compare")
    if checkpoint is None and compare is None:
        raise ConfigError("give a CHECKPOINT to evaluate, or --compare A B", field="checkpoint")

    targets = [checkpoint] if checkpoint is not None else list(compare or ())
    needs_model = [p for p in targets if not _is_results_file(p)]
    for path in needs_model:  # before any heavy import
        if not path.exists():
            what = "results file" if path.suffix.lower() == ".json" else "checkpoint"
            raise ConfigError(f"{what} {path} does not exist", field="checkpoint")
    settings = EvalSettings(
        tasks=parse_tasks(tasks),
        data_dir=resolve_data_dir(data) if needs_model else None,
        split=split,
        shots=shots,
        normalize=normalize,
        seed=seed,
        limit=limit,
        predictions=predictions,
        tokenizer=tokenizer,
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        precision=precision,
        add_bos=add_bos,
    )

    if checkpoint is not None:
        document = evaluate_checkpoint(checkpoint, out, settings, console)
        print_results(document, console)
        console.print(f"wrote {out}", markup=False)
        return

    # --compare: check every input before evaluating anything.
    for path in needs_model:
        build_job(path, out, settings)
    documents, labels = [], []
    for tag, path in zip(("a", "b"), targets, strict=True):
        if _is_results_file(path):
            try:
                document = load_results(path)
            except ValueError as error:
                raise ConfigError(f"--compare: {error}", field="compare") from None
            label = _label(document, path.stem)
        else:
            target_out = _compare_out(out, tag)
            document = evaluate_checkpoint(path, target_out, settings, console)
            print_results(document, console)
            console.print(f"wrote {target_out}", markup=False)
            label = _label(document, path.name)
        documents.append(document)
        labels.append(label)
    if labels[0] == labels[1]:
        labels = [f"A: {labels[0]}", f"B: {labels[1]}"]
    console.print(render_compare(compare_rows(*documents), a_label=labels[0], b_label=labels[1]))


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ---------------------------------------------------------------------------------------------

LM_EVAL_WORKER = "gkd_cli.lm_eval_worker"
LM_EVAL_EXTRA = "pip install 'gkd[lm-eval]'"


def require_lm_eval() -> None:
    """lm-evaluation-harness must be importable (an optional extra)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"lm-evaluation-harness (the lm_eval package) is not installed; install it with "
            f"{LM_EVAL_EXTRA}",
            field="lm_eval",
        )


def check_lm_eval_tasks(tasks: list[str], include_paths: list[Path]) -> bool:
    """Check that every task name is known to lm-eval (its own tasks or the YAMLs under the
    include paths; glob patterns allowed). Returns whether lm-eval's own tasks are needed: only the
    include paths are indexed when they hold every task (indexing lm-eval's thousands of task
    files takes tens of seconds)."""
    import inspect

    from lm_eval.tasks import TaskManager

    include = [str(p) for p in include_paths] or None
    candidates = [True]
    if include and "include_defaults" in inspect.signature(TaskManager).parameters:
        candidates.insert(0, False)
    missing: list[str] = []
    for defaults in candidates:
        if defaults:
            manager = TaskManager(include_path=include)
        else:
            manager = TaskManager(include_path=include, include_defaults=False)
        known = set(manager.all_tasks)
        missing = [t for t in tasks if t not in known and not manager.match_tasks([t])]
        if not missing:
            return defaults
    where = f" or under --include-path {', '.join(include)}" if include else ""
    raise ConfigError(
        f"--tasks: unknown lm-eval task(s) {', '.join(missing)}: not among lm-eval's tasks{where}; "
        "list them with lm_eval ls tasks, or pass --include-path DIR with your task YAMLs",
        field="tasks",
    )


def lm_eval_launch_plan(job_path: Path, world_size: int, log_dir: Path):
    from gkd_cli.lm_eval_worker import OFFLINE_ENV

    plan = launch_plan(job_path, world_size, log_dir)
    plan.entry_module = LM_EVAL_WORKER
    plan.rdzv_id = f"gkd-lm-eval-{uuid.uuid4().hex[:12]}"
    plan.env = {**plan.env, **{k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}}
    return plan


def print_lm_eval_results(document: dict, console: Console) -> None:
    from rich.table import Table

    table = Table(title="lm-evaluation-harness")
    for column in ("task", "metric", "value", "examples"):
        table.add_column(column)
    counts = document.get("n-samples") or {}
    for task, metrics in (document.get("results") or {}).items():
        shown = False
        for key, value in metrics.items():
            if key in ("name", "alias", "sample_len") or "_stderr" in key:
                continue
            if not isinstance(value, int | float):
                continue
            examples = (counts.get(task) or {}).get("effective", "")
            table.add_row(
                task if not shown else "", key.split(",")[0], f"{value:.4f}", str(examples)
            )
            shown = True
    console.print(table)


@eval_app.command("lm-eval")
@_report_errors
def lm_eval_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="gkd checkpoint folder, checkpoints/ root or run directory.",
            show_default=False,
            metavar="CHECKPOINT",
        ),
    ],
    tasks: Annotated[
        str,
        typer.Option(help="Comma list of lm-eval task, group or tag names (globs allowed)."),
    ],
    out: Annotated[Path, typer.Option(help="Results JSON to write.")] = Path(
        "lm_eval_results.json"
    ),
    include_path: Annotated[
        list[Path] | None,
        typer.Option(
            "--include-path",
            help="Folder of extra lm-eval task YAMLs (repeatable), e.g. tasks over local "
            "data files (dataset_path: json).",
            show_default=False,
        ),
    ] = None,
    num_fewshot: Annotated[
        int | None,
        typer.Option(help="Few-shot examples (default: each task's).", show_default=False),
    ] = None,
    limit: Annotated[
        float | None,
        typer.Option(
            help="Examples per task (a fraction of each task when < 1).", show_default=False
        ),
    ] = None,
    tokenizer: TokenizerOption = None,
    tp: TpOption = 1,
    pp: PpOption = 1,
    dp: DpOption = 1,
    max_length: Annotated[
        int | None,
        typer.Option(
            help="The model's window for lm-eval in tokens (rolling windows, context "
            "truncation; default: the model's max_seq_len).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval requests per scoring call.")] = 64,
    micro_batch_size: MicroBatchOption = 8,
    precision: PrecisionOption = "auto",
    add_bos: Annotated[
        bool | None,
        typer.Option(
            "--add-bos/--no-add-bos",
            help="Put the tokenizer's BOS token before every text, or nothing (default: as the "
            "tokenizer does, like lm-eval's hf model).",
            show_default=False,
        ),
    ] = None,
    log_samples: Annotated[
        bool,
        typer.Option("--log-samples", help="Also write every example's requests and responses."),
    ] = False,
    seed: Annotated[int, typer.Option(help="lm-eval's seeds (few-shot draws).")] = 1234,
) -> None:
    """Run lm-evaluation-harness tasks on a checkpoint at any TP/PP/DP layout (loglikelihood,
    loglikelihood_rolling and greedy generate_until requests)."""
    from gkd_cli import launch

    console = _out()
    _check_run_options(
        precision, tp=tp, pp=pp, dp=dp, batch_size=batch_size, micro_batch_size=micro_batch_size
    )
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}", field="num_fewshot")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be > 0, got {limit}", field="limit")
    names = [part.strip() for part in tasks.split(",") if part.strip()]
    if not names:
        raise ConfigError(
            "--tasks is empty; give lm-eval task names such as hellaswag,arc_easy", field="tasks"
        )
    includes = list(include_path or [])
    for folder in includes:
        if not folder.is_dir():
            raise ConfigError(
                f"--include-path {folder}: no such directory; point it at a folder of lm-eval "
                "task YAMLs",
                field="include_path",
            )
    folder, meta = checkpoint_info(checkpoint, tp, pp)
    tokenizer_path = tokenizer or default_tokenizer(folder, meta)
    if not tokenizer_path.exists():
        raise ConfigError(f"--tokenizer {tokenizer_path} does not exist", field="tokenizer")
    prefix = _check_tokenizer(tokenizer_path, folder, meta, add_bos)
    max_len = int(meta["arch"].get("max_seq_len", 1024))
    if max_length is not None and not 2 <= max_length <= max_len:
        raise ConfigError(
            f"--max-length {max_length} must lie in [2, {max_len}] (the model's max_seq_len)",
            field="max_length",
        )
    require_lm_eval()
    from gkd_cli.lm_eval_worker import OFFLINE_ENV, LmEvalJob

    for key, setting in OFFLINE_ENV.items():
        os.environ.setdefault(key, setting)
    include_defaults = check_lm_eval_tasks(names, includes)

    job = LmEvalJob(
        checkpoint=str(folder.resolve()),
        tokenizer=str(tokenizer_path.resolve()),
        tasks=names,
        out=str(out.resolve()),
        include_path=[str(p.resolve()) for p in includes],
        include_defaults=include_defaults,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        seed=seed,
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch_size=micro_batch_size,
        batch_size=batch_size,
        max_length=max_length,
        precision=precision,
        add_bos=add_bos,
        model_name=model_label(folder),
    )
    log_dir = out.resolve().parent / f"{out.stem}.logs"
    job_path = job.save(log_dir / "job.json")
    world = tp * pp * dp
    console.print(
        f"lm-eval on {', '.join(names)}: {job.checkpoint} with {world} process(es) "
        f"(tp={tp} pp={pp} dp={dp}); logs in {log_dir}",
        markup=False,
    )
    console.print(prefix, markup=False)
    Path(job.out).unlink(missing_ok=True)
    launch.run_local(lm_eval_launch_plan(job_path, world, log_dir))
    if not Path(job.out).is_file():
        raise GkdError(f"the workers finished but wrote no results to {job.out}; see {log_dir}")
    import json

    document = json.loads(Path(job.out).read_text(encoding="utf-8"))
    print_lm_eval_results(document, console)
    console.print(f"wrote {out}", markup=False)


if __name__ == "__main__":
    eval_app(prog_name="gkd eval")
