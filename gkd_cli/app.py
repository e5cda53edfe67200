"""The ``gkd`` command line (Typer + Rich).

Commands here: ``distill``, ``plan``, ``methods list|show``, ``env``, ``report``, ``config-help``. Other
areas (``compress-vocab``, ``eval``, ``convert``) register their own sub-apps with
``app.add_typer`` or ``app.command`` from their modules.

Heavy imports (torch, megatron-core, the methods registry) happen inside the commands that need
them: ``gkd --help``, ``gkd plan`` and config validation run on a login node without
megatron-core. Errors caused by input (:class:`~gkd_cli.errors.GkdError`) print as one red line,
exit code 2 for config errors, 1 otherwise.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gkd_cli import slurm_cli as sc
from gkd_cli.errors import ConfigError, GkdError, LaunchError, WorkerFailedError

if TYPE_CHECKING:
    from gkd_cli.plan import Device

app = typer.Typer(
    name="gkd",
    help="Knowledge distillation of large language models (GKD + GLMD) on megatron-core.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
methods_app = typer.Typer(help="The distillation methods gkd offers.", no_args_is_help=True)
app.add_typer(methods_app, name="methods")


def _mount_subcommands() -> None:
    # Light modules (heavy imports happen inside their commands), so --help stays fast.
    from gkd_cli.compress import compress_vocab_command
    from gkd_cli.convert import convert_app
    from gkd_cli.eval import eval_app

    app.add_typer(convert_app, name="convert", help="Hugging Face checkpoints in and out.")
    app.command("compress-vocab")(compress_vocab_command)
    app.add_typer(eval_app, name="eval", help="Score checkpoints (SuperGLUE, lm-eval).")


_mount_subcommands()


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _error_line(message: str) -> None:
    _err().print(Text(f"error: {message}", style="bold red"), soft_wrap=True)


def _print_worker_failure(err: WorkerFailedError) -> None:
    console = _err()
    _error_line(str(err))
    if err.traceback:
        console.print(Text(err.traceback.rstrip(), style="dim"), soft_wrap=True)
    if err.log_path:
        console.print(Text(f"log of rank {err.rank}: {err.log_path}"), soft_wrap=True)
    if err.other_ranks:
        others = ", ".join(map(str, err.other_ranks))
        console.print(Text(f"also failed (probably as a consequence): ranks {others}"))


def _report_errors(fn):
    """Print input errors as one red line and exit with their code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WorkerFailedError as err:
            _print_worker_failure(err)
            raise typer.Exit(err.exit_code) from None
        except GkdError as err:
            _error_line(str(err))
            raise typer.Exit(err.exit_code) from None

    return wrapper


def _mount_cache_teacher() -> None:
    from gkd_cli.cache_teacher import cache_teacher_command  # light: heavy imports inside

    app.command("cache-teacher")(_report_errors(cache_teacher_command))


_mount_cache_teacher()

ConfigArg = Annotated[
    Path,
    typer.Argument(
        help="Distillation config (YAML).", show_default=False, dir_okay=False, metavar="CONFIG"
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides as section.key=value (YAML values): train.lr=1e-4 parallel.tp=2 "
        "methods.0.temperature=10.",
        show_default=False,
        metavar="SECTION.KEY=VALUE",
    ),
]


# ---------------------------------------------------------------------------------------------
# distill
# ---------------------------------------------------------------------------------------------


def _gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _launch_table(plan) -> Table:
    table = Table(title="Launch plan (this node)", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    rows = [
        ("nodes", str(plan.nnodes)),
        ("node rank", str(plan.node_rank)),
        ("processes per node", str(plan.nproc_per_node)),
        ("rendezvous", f"{plan.rdzv_backend} at {plan.rdzv_endpoint} (id {plan.rdzv_id})"),
        ("command", f"python -m {plan.entry_module} {' '.join(plan.args)}"),
        ("environment", " ".join(f"{k}={v}" for k, v in sorted(plan.env.items())) or "-"),
        ("logs", plan.log_dir),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def _latest_checkpoint(out: Path) -> str | None:
    """The step folder ``checkpoints/latest`` names, if it is complete (has its manifest)."""
    pointer = out / "checkpoints" / "latest"
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    return name if (pointer.parent / name / "manifest.json").is_file() else None


def _run_preemptible(plan, out: Path, console: Console) -> bool:
    """Run the workers; return True when a SIGTERM/SIGUSR1 (Slurm preemption) stopped them.

    The launcher forwards the signal to the workers, which finish their step, save and exit 0; it
    returns only after they exited, so ``latest`` then names the saved step, which is printed. Exit
    code 0: the run is resumable (run the same command again)."""
    from gkd_cli import launch

    before = _latest_checkpoint(out)
    signal_name = launch.run_local(plan)
    if signal_name is None:
        return False
    after = _latest_checkpoint(out)
    if after is not None and after != before:
        step = int(after.removeprefix("step_"))
        what = f"the workers saved step {step} ({out / 'checkpoints' / after})"
    elif after is not None:
        what = f"stopped before a new checkpoint; the latest is still {out / 'checkpoints' / after}"
    else:
        what = "stopped before the first checkpoint; nothing is saved, a rerun starts over"
    console.print(
        f"preempted ({signal_name}): {what}; run the same command again to resume",
        markup=False,
        soft_wrap=True,
    )
    return True


def _same_run(previous, cfg) -> bool:
    """The saved config describes the same run (ignoring output.resume and train.steps, which a
    user may raise to train longer)."""
    from gkd_cli.config import dump_config

    def normalized(c):
        return dump_config(
            replace(c, output=replace(c.output, resume=False), train=replace(c.train, steps=1))
        )

    return normalized(previous) == normalized(cfg)


def _prepare_output(cfg, resume: bool | None):
    """Check ``output.dir`` against ``--resume/--overwrite``; return the config to run.

    A directory holding a run of the same config resumes it (a rerun after a preemption or a
    crash); one holding another run is refused unless ``--resume`` or ``--overwrite``."""
    from gkd_cli.config import load_config

    out = Path(cfg.output.dir)
    # logs/ alone is no run: Slurm opens the batch output file in it before gkd starts.
    existing = out.is_dir() and any(entry.name != "logs" for entry in out.iterdir())
    saved = out / "config.yaml"
    if existing and resume is None:
        if saved.is_file() and _same_run(load_config(saved, validate_run=False), cfg):
            resume = True
        elif saved.is_file():
            raise ConfigError(
                f"output.dir {out} already holds another run (its config.yaml differs); pass "
                "--resume to continue it with this config, --overwrite to start over, or choose "
                "another output.dir=...",
                field="output.dir",
            )
        else:
            names = ", ".join(sorted(e.name for e in out.iterdir() if e.name != "logs")[:5])
            raise ConfigError(
                f"output.dir {out} holds files but no gkd run (no config.yaml; it has {names}); "
                "choose another output.dir=... or empty it",
                field="output.dir",
            )
    if resume:
        if not existing:
            raise ConfigError(
                f"--resume: output.dir {out} holds no run to resume", field="output.dir"
            )
        if saved.is_file():
            previous = load_config(saved, validate_run=False)  # read, not validated or built

            def archs(models):
                return [replace(m, checkpoint=None, init=None) for m in models]

            for role, before, after in (
                ("teacher", previous.teachers, cfg.teachers),
                ("student", [previous.student], [cfg.student]),
            ):
                if archs(before) != archs(after):
                    raise ConfigError(
                        f"--resume: the {role} architecture differs from the run in {out}; "
                        "resume with the same models or use another output.dir",
                        field=role,
                    )
        return replace(cfg, output=replace(cfg.output, resume=True))
    if resume is False and existing:
        if not saved.is_file():
            raise ConfigError(
                f"--overwrite: {out} does not look like a gkd run (no config.yaml); remove it "
                "yourself or choose another output.dir",
                field="output.dir",
            )
        for entry in out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return cfg


@app.command()
@_report_errors
def distill(
    config: ConfigArg,
    overrides: OverridesArg = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the resolved config, launch plan and memory plan; launch nothing.",
        ),
    ] = False,
    slurm: sc.Slurm = False,
    nodes: sc.Nodes = None,
    gpus_per_node: sc.GpusPerNode = None,
    cpus_per_task: sc.CpusPerTask = None,
    python: sc.Python = None,
    signal_seconds: sc.SignalSeconds = 300,
    requeue: sc.Requeue = True,
    time: sc.Time = None,
    partition: sc.Partition = None,
    account: sc.Account = None,
    job_name: sc.JobName = "gkd",
    sbatch_lines: sc.SbatchLines = None,
    setup_lines: sc.SetupLines = None,
    submit: sc.Submit = False,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--overwrite",
            help="When output.dir already holds a run: continue it, or delete it and start over.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Distill a teacher into a student.

    Validates the config, writes it to output.dir/config.yaml, and runs the workers here
    (torchrun) or writes (and with --submit, submits) a Slurm batch script.
    """
    from gkd_cli import launch
    from gkd_cli.config import dump_config, load_config, write_config

    overrides = list(overrides or [])
    if submit and not slurm:
        raise ConfigError("--submit needs --slurm")
    if nodes is not None:
        if not slurm:
            raise ConfigError("--nodes needs --slurm (or set parallel.nnodes=N)")
        overrides.append(f"parallel.nnodes={nodes}")
    environ = None if slurm else os.environ
    cfg = load_config(config, overrides, environ=environ, check_paths=True)
    out = Path(cfg.output.dir)
    config_path = out / "config.yaml"
    console = _out()

    if slurm:
        # The job runs from other shells and directories: absolute output dir, and --chdir here.
        out = out.resolve()
        cfg = replace(cfg, output=replace(cfg.output, dir=str(out)))
        config_path = out / "config.yaml"
        options = launch.slurm_options(
            cfg,
            gpus_per_node=gpus_per_node,
            cpus_per_task=cpus_per_task,
            time=time,
            partition=partition,
            account=account,
            job_name=job_name,
            extra_sbatch=list(sbatch_lines or []),
            setup=list(setup_lines or []),
            python=python,
            signal_seconds=signal_seconds,
            requeue=requeue,
            submit=submit,
        )
        script = launch.render_sbatch(cfg, options, config_path)
        if dry_run:
            console.print(dump_config(cfg), markup=False, soft_wrap=True)
            console.print(script, markup=False, soft_wrap=True)
            _print_memory(console, cfg, "gpu" if options.gpus_per_node else "cpu")
            return
        cfg = _prepare_output(cfg, resume)
        write_config(cfg, config_path)
        for line in launch.write_batch_script(
            cfg, options, out / "gkd.sbatch", config_path=config_path, and_submit=submit
        ):
            console.print(line, markup=False, soft_wrap=True)
        return

    context = launch.slurm_context(os.environ)
    job_nodes = launch.slurm_job_nodes(os.environ) if context else 1
    if context == "shell" and job_nodes > 1:
        raise LaunchError(
            f"this shell holds a {job_nodes}-node Slurm allocation (job "
            f"{os.environ.get('SLURM_JOB_ID')}) but runs on none of its nodes; start gkd on "
            "every node with: srun --ntasks-per-node=1 gkd distill ..."
        )
    if context == "shell":
        _err().print(
            Text(
                f"warning: inside Slurm allocation {os.environ.get('SLURM_JOB_ID')} but not in a "
                "job step: this runs here (probably the login node), not on the allocated "
                "node; use srun gkd distill ... to run there",
                style="bold yellow",
            ),
            soft_wrap=True,
        )
    if context == "batch" and job_nodes > 1:
        raise LaunchError(
            f"a batch script of a {job_nodes}-node job runs on its first node only; start gkd on "
            "every node with: srun --ntasks-per-node=1 gkd distill ... (or use gkd distill "
            "--slurm, which writes such a script)"
        )
    plan = launch.plan_workers(cfg, os.environ)
    from gkd_cli.preflight import run_preflight

    run_preflight(cfg)  # opens corpora and checkpoints; before anything is written or launched
    if dry_run:
        console.print(dump_config(cfg), markup=False)
        console.print(_launch_table(plan))
        _print_memory(console, cfg, "gpu" if _gpu_available() else "cpu")
        return
    head = plan.node_rank == 0
    token = launch.ready_token(plan, os.environ)
    if head:  # other nodes' workers read config.yaml after the rendezvous, which needs node 0
        cfg = _prepare_output(cfg, resume)
        write_config(cfg, config_path)
        if plan.nnodes > 1:
            launch.ready_path(out).parent.mkdir(parents=True, exist_ok=True)
            launch.ready_path(out).write_text(token + "\n")
    else:
        # Touch nothing in output.dir before node 0 has checked (and maybe cleaned) it.
        launch.wait_until_prepared(out, token)
    # Each launch logs into a fresh logs/attempt_*/ (logs/latest points at it): a rerun after a
    # failure keeps the failed attempt's logs.
    plan = replace(plan, log_dir=str(launch.attempt_log_dir(plan.log_dir, plan, os.environ)))
    p = cfg.parallel
    console.print(
        f"launching {plan.nproc_per_node} worker(s) on node {plan.node_rank} of {plan.nnodes} "
        f"(tp {p.tp} x pp {p.pp} x dp {p.dp}); logs in {plan.log_dir}",
        markup=False,
        soft_wrap=True,
    )
    if head:
        from gkd_cli.progress import follow_metrics

        with follow_metrics(
            out / "metrics.jsonl", cfg.train.steps, console=console, skip_existing=cfg.output.resume
        ):
            preempted = _run_preemptible(plan, out, console)
    else:
        preempted = _run_preemptible(plan, out, console)
    if not preempted:
        console.print(f"done: checkpoints and metrics in {out}", markup=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# plan
@app.command()
@_report_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the runs, tokenizer and caches go.")] = Path(
        "runs/demo"
    ),
    teacher_steps: Annotated[int, typer.Option(help="Teacher pre-training steps.")] = 300,
    student_steps: Annotated[int, typer.Option(help="Steps of each student.")] = 200,
    fresh: Annotated[
        bool, typer.Option(help="Delete cached runs (the teacher too) first.")
    ] = False,
) -> None:
    """Pre-train a small teacher, distill it into a student at TP=2, train the same student from
    scratch, and compare validation perplexity (CPU, a few minutes; the teacher is cached)."""
    import shutil

    from rich.table import Table

    from gkd_cli import demo as demo_lib

    console = _out()
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    settings = demo_lib.DemoSettings(
        workdir=workdir, teacher_steps=teacher_steps, student_steps=student_steps
    )
    tokenizer = demo_lib.ensure_tokenizer(workdir, settings.vocab_size)
    runs = demo_lib.configs(settings, tokenizer)
    titles = {
        "teacher": f"1/3 pre-training the teacher ({teacher_steps} steps, cached afterwards)",
        "distill": f"2/3 distilling the teacher into the student (GLMD + LM, {student_steps} steps)",
        "scratch": f"3/3 training the same student from scratch (LM only, {student_steps} steps)",
    }
    for name, config in runs.items():
        run_dir = workdir / name
        if demo_lib.read_eval(run_dir) is not None:
            console.print(f"{titles[name]}: done before, reusing {run_dir}", markup=False)
            continue
        console.rule(titles[name])
        path = demo_lib.write_config(workdir / f"{name}.yaml", config)
        distill(config=path, overrides=[], resume=None)
    table = Table(
        title="Validation perplexity (held-out SuperGLUE passages): teacher, distilled student, same student from scratch"
    )
    for column in ("model", "layers x hidden", "parameters", "steps", "val loss", "val ppl"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = [
        ("teacher", runs["teacher"]["student"], "teacher", "student", teacher_steps),
        ("distilled", runs["distill"]["student"], "distill", "student", student_steps),
        ("scratch", runs["scratch"]["student"], "scratch", "student", student_steps),
    ]
    from parallel.config import ModelArch

    for label, arch, run, who, steps in rows:
        result = demo_lib.read_eval(workdir / run) or {}
        params = ModelArch(**arch).num_parameters()
        table.add_row(
            label,
            f"{arch['num_layers']} x {arch['hidden_size']}",
            f"{params / 1e6:.2f}M",
            str(steps),
            f"{result.get(f'{who}_loss', float('nan')):.3f}",
            f"{result.get(f'{who}_ppl', float('nan')):.1f}",
        )
    console.print(table)


# ---------------------------------------------------------------------------------------------


def _print_memory(console: Console, cfg, device: Device, capacity: int | None = None):
    from gkd_cli.plan import estimate, plan_table

    memory = estimate(cfg, device)
    console.print(plan_table(memory, capacity))
    return memory


@app.command()
@_report_errors
def plan(
    config: ConfigArg,
    overrides: OverridesArg = None,
    gpu_mem: Annotated[
        str | None,
        typer.Option("--gpu-mem", help="Memory per GPU (40GiB, 80GB, 81920MiB): check the fit."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="gpu (bf16) or cpu (fp32).")] = "gpu",
    gpus: Annotated[
        int | None,
        typer.Option("--gpus", help="GPUs to search layouts for (default: tp x pp x dp)."),
    ] = None,
    gpus_per_node: Annotated[
        int | None,
        typer.Option("--gpus-per-node", help="GPUs per node (bounds tp; default min(gpus, 8))."),
    ] = None,
) -> None:
    """Estimate memory per GPU, and the smallest layout that fits.

    Itemizes weights, gradients, optimizer states, activations and logit buffers of the most
    loaded rank; with --gpu-mem, flags a layout that does not fit and searches tp x pp.
    """
    from gkd_cli.config import load_config
    from gkd_cli.plan import format_bytes, layouts_table, parse_size, search_layouts

    if device not in ("gpu", "cpu"):
        raise ConfigError(f"--device {device!r}: expected gpu or cpu", field="device")
    target: Device = "gpu" if device == "gpu" else "cpu"
    capacity = parse_size(gpu_mem) if gpu_mem is not None else None
    cfg = load_config(config, overrides or [], check_paths=False)
    console = _out()
    memory = _print_memory(console, cfg, target, capacity)
    if capacity is None:
        return
    if memory.fits(capacity) and gpus is None:
        console.print(f"[green]fits[/]: {format_bytes(memory.total_bytes)} per rank")
        return
    count = gpus or cfg.parallel.world_size
    layouts = search_layouts(cfg, gpus=count, gpus_per_node=gpus_per_node, device=target)
    fitting = [m for m in layouts if m.fits(capacity)]
    if not memory.fits(capacity):
        console.print(
            Text(
                f"does not fit: {format_bytes(memory.total_bytes)} per rank > "
                f"{format_bytes(capacity)} at tp {memory.tp} x pp {memory.pp} x dp {memory.dp}",
                style="bold red",
            ),
            soft_wrap=True,
        )
    console.print(layouts_table(layouts, capacity))
    if fitting:
        best = fitting[0]
        console.print(
            f"smallest layout that fits on {count} GPUs: parallel.tp={best.tp} "
            f"parallel.pp={best.pp} parallel.dp={best.dp} "
            f"({format_bytes(best.total_bytes)} per rank)",
            soft_wrap=True,
        )
    else:
        console.print(
            Text(
                f"no tp x pp layout of {count} GPUs fits in {format_bytes(capacity)}; try "
                "train.recompute=selective or full, parallel.sequence_parallel=true, a smaller "
                "train.micro_batch_size or data.seq_length, or more GPUs (--gpus)",
                style="bold red",
            ),
            soft_wrap=True,
        )


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------


@methods_app.command("list")
@_report_errors
def methods_list() -> None:
    """Name, paper, signals and stage (PT pre-training, TS task) of every method."""
    from methods import registry

    table = Table(title="Distillation methods", title_justify="left")
    for column in ("name", "paper", "signals", "stage"):
        table.add_column(column, overflow="fold")
    for name, spec in registry.REGISTRY.items():
        cells = (name, spec.paper, spec.signals, registry.stage_label(spec.stages))
        table.add_row(*(Text(cell) for cell in cells))
    _out().print(table)


@methods_app.command("show")
@_report_errors
def methods_show(name: Annotated[str, typer.Argument(help="Method name.")]) -> None:
    """A method's paper, signals, stages and parameters (defaults and help)."""
    import difflib

    from methods import registry

    spec = registry.REGISTRY.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(registry.REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; gkd methods list shows the names"
        raise ConfigError(f"unknown method '{name}'{hint}")
    console = _out()
    console.print(Text(spec.name, style="bold"))
    console.print(Text(f"paper: {spec.paper}"), soft_wrap=True)
    console.print(Text(f"signals: {spec.signals}"), soft_wrap=True)
    console.print(Text(f"stage: {registry.stage_label(spec.stages)}"), soft_wrap=True)
    if spec.summary:
        console.print(Text(spec.summary), soft_wrap=True)
    params = registry.describe(spec.name)  # field help from methods.typed, as config-help's
    if not params:
        console.print("(no parameters)")
        return
    table = Table(title=f"methods.N.<param> of {spec.name}", title_justify="left")
    for column in ("parameter", "type", "default", "help"):
        table.add_column(column, overflow="fold")
    for p in params:
        default = "(required)" if p.required else repr(p.default)
        table.add_row(*(Text(cell) for cell in (p.name, p.type, default, p.help)))
    console.print(table)


# ---------------------------------------------------------------------------------------------
# env
# ---------------------------------------------------------------------------------------------


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _nvidia_apex() -> bool:
    """True for NVIDIA apex (the PyPI package called apex is an unrelated web toolkit)."""
    try:
        spec = importlib.util.find_spec("apex")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        os.path.isdir(os.path.join(p, "normalization")) for p in spec.submodule_search_locations
    )


def environment_report() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(component versions, fused paths) of this machine; every import guarded."""
    versions = [("python", f"{platform.python_version()} ({sys.executable})")]
    cuda = False
    try:
        import torch

        versions.append(("torch", torch.__version__))
        cuda = torch.cuda.is_available()
        if cuda:
            names = sorted(
                {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
            )
            versions.append(
                (
                    "CUDA",
                    f"{torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}",
                )
            )
            try:
                nccl = torch.cuda.nccl.version()
                versions.append(
                    ("NCCL", ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
                )
            except Exception as err:  # NCCL missing from this build
                versions.append(("NCCL", f"unavailable ({err})"))
        else:
            build = (
                f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
            )
            versions.append(("CUDA", f"not available (torch {build})"))
            versions.append(("NCCL", "not available (gloo on CPU)"))
    except ImportError:
        versions.append(("torch", "not installed"))
    mcore = _dist_version("megatron-core", "megatron_core")
    versions.append(("megatron-core", mcore or "not installed"))
    te = _dist_version("transformer-engine", "transformer_engine", "transformer-engine-torch")
    has_te = te is not None or _find("transformer_engine")
    versions.append(("Transformer Engine", te or ("installed" if has_te else "not installed")))
    has_apex = _nvidia_apex()
    versions.append(("apex (NVIDIA)", "installed" if has_apex else "not installed"))
    flash = _dist_version("flash-attn", "flash_attn")
    versions.append(("flash-attn", flash or "not installed"))

    fused = [("collectives", "NCCL" if cuda else "gloo (CPU)")]
    if not cuda:
        fused += [
            ("attention", "unfused torch (megatron-core local spec)"),
            ("norms", "torch"),
            ("optimizer", "torch AdamW (megatron-core distributed optimizer)"),
            ("gradient accumulation fusion", "off"),
        ]
        return versions, fused
    if has_te:
        attention = "Transformer Engine fused/flash attention"
    elif flash:
        attention = "flash-attn"
    else:
        attention = "unfused torch (local spec)"
    norms = "Transformer Engine" if has_te else ("apex fused" if has_apex else "torch")
    optimizer = (
        "Transformer Engine FusedAdam"
        if has_te
        else ("apex FusedAdam" if has_apex else "torch AdamW")
    )
    grad_fusion = "on" if (has_te or has_apex) else "off (needs Transformer Engine or apex)"
    fused += [
        ("attention", attention),
        ("norms", norms),
        ("optimizer", optimizer),
        ("gradient accumulation fusion", grad_fusion),
    ]
    return versions, fused


@app.command()
@_report_errors
def env() -> None:
    """Show versions and the fused kernels a run will use.

    Python, torch, CUDA, NCCL, megatron-core, apex and Transformer Engine (each import guarded).
    """
    versions, fused = environment_report()
    console = _out()
    table = Table(title="Environment", title_justify="left", show_header=False)
    table.add_column("component")
    table.add_column("version", overflow="fold")
    for name, value in versions:
        table.add_row(name, Text(value))
    console.print(table)
    paths = Table(title="Fused paths", title_justify="left", show_header=False)
    paths.add_column("path")
    paths.add_column("used", overflow="fold")
    for name, value in fused:
        paths.add_row(name, Text(value))
    console.print(paths)


@app.command()
@_report_errors
def report(
    runs: Annotated[
        list[Path], typer.Argument(help="Run output directories (or their metrics.jsonl).")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for report.png and report.html.")
    ] = Path("gkd-report"),
) -> None:
    """Curves (loss terms, lr, grad norm, tokens/s, validation) of runs side by side: a PNG, a
    self-contained HTML page and a summary table. Needs matplotlib (gkd[report])."""
    from gkd_cli.report import run_report

    run_report(runs, out, _out())


# ---------------------------------------------------------------------------------------------
# config-help
# ---------------------------------------------------------------------------------------------


@app.command("config-help")
@_report_errors
def config_help(
    section: Annotated[
        str | None,
        typer.Argument(
            help="teacher, student, methods, parallel, data, train or output (default: all).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Every config key with its type, default and help."""
    from gkd_cli.config import describe_section

    names = [section] if section else ["teacher", "methods", "parallel", "data", "train", "output"]
    console = _out()
    for name in names:
        rows = describe_section(name)
        title = name if name != "teacher" or section else "teacher / student"
        table = Table(title=title, title_justify="left")
        for column in ("key", "type", "default", "help"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(Text(cell) for cell in (row.key, row.type, row.default, row.help)))
        console.print(table)


def main() -> None:
    """Console entry point (``gkd = gkd_cli.app:main``)."""
    app(prog_name="gkd")


if __name__ == "__main__":
    main()
