"""The ``--slurm`` options every gkd command that starts workers on a cluster takes (``gkd
distill``, ``gkd cache-teacher``): one declaration, turned into
:class:`gkd_cli.launch.SlurmOptions` by :func:`gkd_cli.launch.slurm_options`. Light: no torch."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

Slurm = Annotated[
    bool, typer.Option("--slurm", help="Write a Slurm batch script instead of running here.")
]
Nodes = Annotated[int | None, typer.Option("--nodes", help="Slurm nodes (sets parallel.nnodes).")]
GpusPerNode = Annotated[
    int | None,
    typer.Option(
        "--gpus-per-node",
        help="Slurm GPUs per node: tp x pp x dp / nodes, or 0 for CPU workers (default: that "
        "on a partition with GPUs, 0 on one without, as sinfo reports).",
    ),
]
CpusPerTask = Annotated[
    int | None,
    typer.Option(
        "--cpus-per-task",
        help="Slurm CPUs of each node's launcher and workers (default: the CPUs of the "
        "partition's nodes from sinfo, else one per worker).",
    ),
]
Python = Annotated[
    str | None,
    typer.Option(
        "--python",
        help="Python on the compute nodes that has gkd installed (default: this one, "
        f"{sys.executable}).",
    ),
]
SignalSeconds = Annotated[
    int,
    typer.Option(
        "--signal-seconds",
        help="Slurm sends SIGUSR1 this long before --time runs out: the workers save and "
        "the job requeues (0: no signal).",
    ),
]
Requeue = Annotated[
    bool,
    typer.Option(
        "--requeue/--no-requeue",
        help="After a preemption signal and a completed save, the job requeues itself.",
    ),
]
Time = Annotated[str | None, typer.Option("--time", help="Slurm time limit (24:00:00).")]
Partition = Annotated[str | None, typer.Option("--partition", help="Slurm partition.")]
Account = Annotated[str | None, typer.Option("--account", help="Slurm account.")]
JobName = Annotated[str, typer.Option("--job-name", help="Slurm job name.")]
SbatchLines = Annotated[
    list[str] | None,
    typer.Option(
        "--sbatch",
        help="Extra #SBATCH option, repeatable (--sbatch=--exclusive).",
        show_default=False,
    ),
]
SetupLines = Annotated[
    list[str] | None,
    typer.Option(
        "--setup",
        help="Shell line run before srun in the batch script, repeatable "
        "(--setup 'source .venv/bin/activate').",
        show_default=False,
    ),
]
Submit = Annotated[bool, typer.Option("--submit", help="Submit the batch script with sbatch.")]
