"""Launching the workers: a plain ``LaunchPlan`` value, torchrun through its Python API, and
Slurm batch scripts.

* ``plan_local(cfg)``: one node (or several, given ``MASTER_ADDR``/``NODE_RANK``), processes per
  node = tp x pp x dp / nnodes.
* ``plan_from_slurm_env(cfg, environ)``: inside a Slurm allocation, from ``SLURM_*`` variables.
* ``run_local(plan)``: ``torch.distributed.launcher.api.elastic_launch`` (what ``torchrun``
  runs), each rank's stdout/stderr in ``<output.dir>/logs/``; a failure raises
  :class:`~gkd_cli.errors.WorkerFailedError` with the failing rank, its traceback (from the
  elastic error file the worker's ``@record`` writes) and its log path.
* ``render_sbatch(cfg, options, config_path)`` and ``submit(script_path)``: a batch script that
  runs torchrun on every node with ``srun``, rendezvous (c10d) on the allocation's first node.

Importing this module imports neither torch nor megatron-core.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gkd_cli.errors import ConfigError, LaunchError, WorkerFailedError

if TYPE_CHECKING:
    from gkd_cli.config import DistillConfig
    from parallel.config import ParallelConfig

WORKER_MODULE = "gkd_cli.worker"
"""The per-rank entry point (``python -m gkd_cli.worker --config RESOLVED_YAML``)."""
DEFAULT_RDZV_PORT = 29500


def environment_world_size(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """The number of processes the surrounding launcher provides, and where that number comes
    from, when it is known: torchrun's ``WORLD_SIZE``, or a Slurm allocation's nodes x GPUs."""
    if environ.get("WORLD_SIZE", "").isdigit():
        return int(environ["WORLD_SIZE"]), "WORLD_SIZE (torchrun)"
    nodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    gpus = environ.get("SLURM_GPUS_ON_NODE")
    if nodes and nodes.isdigit() and gpus and gpus.isdigit() and int(gpus) > 0:
        return int(nodes) * int(gpus), f"the Slurm allocation ({nodes} nodes x {gpus} GPUs)"
    return None


def check_world_size(p: ParallelConfig, environ: Mapping[str, str]) -> None:
    """``ConfigError`` when a known world size (torchrun or Slurm environment) differs from the
    layout ``p``."""
    known = environment_world_size(environ)
    if known is None:
        return
    world, source = known
    if world != p.world_size:
        raise ConfigError(
            f"world size {world} from {source} != parallel.tp x pp x dp = "
            f"{p.tp} x {p.pp} x {p.dp} = {p.world_size}; set parallel.dp={world // (p.tp * p.pp)}"
            if world % (p.tp * p.pp) == 0
            else f"world size {world} from {source} != parallel.tp x pp x dp = {p.world_size}; "
            f"pick tp x pp dividing {world}",
            field="parallel.dp",
        )


@dataclass(kw_only=True)
class LaunchPlan:
    """How the workers of one node are started: a plain value tests can assert on."""

    nnodes: int
    """Number of nodes taking part."""
    nproc_per_node: int
    """Worker processes on this node (one per GPU)."""
    node_rank: int
    """This node's index (0-based)."""
    master_addr: str
    """Host of rank 0 (the rendezvous host)."""
    master_port: int
    """Rendezvous port (0: pick a free one, single node only)."""
    rdzv_backend: str
    """torch elastic rendezvous backend (``c10d``)."""
    rdzv_endpoint: str
    """``host:port`` of the rendezvous store."""
    rdzv_id: str
    """Rendezvous (run) id shared by all nodes; the Slurm job id inside an allocation."""
    entry_module: str
    """Python module each worker runs (``python -m``)."""
    args: list[str]
    """Arguments after the module."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables of the workers."""
    log_dir: str
    """Folder of the per-rank logs (``<output.dir>/logs``)."""
    max_restarts: int = 0
    """Worker-group restarts before giving up (gkd resumes from checkpoints instead)."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _procs_per_node(cfg: DistillConfig, nnodes: int, where: str) -> int:
    world = cfg.parallel.world_size
    if world % nnodes:
        raise ConfigError(
            f"parallel.tp x pp x dp = {world} processes cannot be split evenly over {nnodes} "
            f"nodes ({where}); use a layout whose size is a multiple of {nnodes}",
            field="parallel.nnodes",
        )
    return world // nnodes


def _worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    # torchrun's CLI sets OMP_NUM_THREADS=1 for several workers; its Python API does not.
    return {"OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", "1")}


def _worker_args(cfg: DistillConfig) -> list[str]:
    return ["--config", str(Path(cfg.output.dir) / "config.yaml")]


def plan_local(cfg: DistillConfig, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """Launch plan outside Slurm. One node: a private c10d store on a free local port. Several
    nodes (``parallel.nnodes`` > 1): ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` must be set
    on every node (use ``gkd distill --slurm`` on a Slurm cluster)."""
    environ = os.environ if environ is None else environ
    nnodes = cfg.parallel.nnodes
    nproc = _procs_per_node(cfg, nnodes, "parallel.nnodes")
    log_dir = str(Path(cfg.output.dir) / "logs")
    if nnodes == 1:
        return _single_node(nproc, WORKER_MODULE, _worker_args(cfg), log_dir, environ, "gkd")
    missing = [k for k in ("MASTER_ADDR", "NODE_RANK") if not environ.get(k)]
    if missing:
        raise ConfigError(
            f"parallel.nnodes={nnodes} needs {' and '.join(missing)} set on every node (or run "
            "inside a Slurm allocation, or use gkd distill --slurm)",
            field="parallel.nnodes",
        )
    node_rank = _int_env(environ, "NODE_RANK")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"NODE_RANK={node_rank} is outside 0..{nnodes - 1} (parallel.nnodes)")
    port = _int_env(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else DEFAULT_RDZV_PORT
    addr = environ["MASTER_ADDR"]
    return LaunchPlan(
        nnodes=nnodes,
        nproc_per_node=nproc,
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        rdzv_backend="c10d",
        rdzv_endpoint=f"{addr}:{port}",
        rdzv_id=environ.get("GKD_RUN_ID", f"gkd-{addr}-{port}"),
        entry_module=WORKER_MODULE,
        args=_worker_args(cfg),
        env=_worker_env(environ),
        log_dir=log_dir,
    )


def _single_node(
    nproc: int,
    entry_module: str,
    args: list[str],
    log_dir: str,
    environ: Mapping[str, str],
    run_id: str,
) -> LaunchPlan:
    """One node, a private c10d store on a free local port."""
    return LaunchPlan(
        nnodes=1,
        nproc_per_node=nproc,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=0,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        rdzv_id=f"{run_id}-{uuid.uuid4().hex[:12]}",
        entry_module=entry_module,
        args=args,
        env=_worker_env(environ),
        log_dir=log_dir,
    )


def plan_workers(
    cfg: DistillConfig | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    entry_module: str = WORKER_MODULE,
    args: list[str] | None = None,
    world_size: int | None = None,
    log_dir: str | os.PathLike | None = None,
    run_id: str = "gkd",
) -> LaunchPlan:
    """This node's launch plan, for every gkd command that starts workers (``gkd distill``,
    ``gkd cache-teacher``, ``gkd eval``). With a config: its layout, from the Slurm job step's
    variables inside an allocation (:func:`plan_from_slurm_env`), else :func:`plan_local`; the
    workers run ``python -m entry_module args`` (default: the distillation worker on the
    config's ``output.dir/config.yaml``). Without a config: one node of ``world_size``
    processes (evaluation jobs)."""
    environ = os.environ if environ is None else environ
    if cfg is None:
        if world_size is None or log_dir is None:
            raise ValueError("plan_workers without a config needs world_size and log_dir")
        return _single_node(
            world_size, entry_module, list(args or []), str(log_dir), environ, run_id
        )
    if in_slurm_allocation(environ):
        plan = plan_from_slurm_env(cfg, environ, resolve=True)
    else:
        plan = plan_local(cfg, environ)
    plan.entry_module = entry_module
    if args is not None:
        plan.args = list(args)
    if log_dir is not None:
        plan.log_dir = str(log_dir)
    return plan


def _int_env(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ConfigError(
            f"environment variable {key}={environ[key]!r} is not an integer"
        ) from None


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str, hostlist: str) -> list[str]:
    values = []
    for piece in spec.split(","):
        lo, sep, hi = piece.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"cannot parse Slurm host list {hostlist!r} (range {piece!r})")
        if not sep:
            values.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm compressed host list (``node[01-03,07],gpu-a[1-2]-ib``) in order, keeping
    zero padding, like ``scontrol show hostnames``."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        match = re.search(r"\[([^\]]*)\]", item)
        if match is None:
            hosts.append(item)
            continue
        prefix, suffix = item[: match.start()], item[match.end() :]
        for value in _expand_range(match.group(1), hostlist):
            hosts.extend(expand_hostlist(prefix + value + suffix))
    return hosts


def _step_or_job(environ: Mapping[str, str], step_key: str, job_keys: tuple[str, ...]) -> str:
    """A job step's own value (``srun`` on part of an allocation) before the allocation's."""
    if environ.get("SLURM_STEP_ID") is not None and environ.get(step_key):
        return environ[step_key]
    return next((environ[k] for k in job_keys if environ.get(k)), "")


RDZV_PORT_BASE = 15000
RDZV_PORT_SPAN = 15000


def slurm_rdzv_port(job_id: str, step_id: str | None = None) -> int:
    """Rendezvous port of a Slurm job step, derived from the job id (and step id) so that two
    jobs sharing a node do not collide; below Linux's ephemeral range (32768+)."""
    try:
        job, step = int(job_id.split("_")[0]), int(step_id or 0)
    except ValueError:
        return DEFAULT_RDZV_PORT
    return RDZV_PORT_BASE + (job * 8 + step % 8) % RDZV_PORT_SPAN


def _resolve_node(name: str, environ: Mapping[str, str]) -> str:
    """A Slurm node name as a reachable address: the name itself when it resolves, else the
    node's ``NodeAddr`` from ``scontrol`` (clusters whose node names are not host names)."""
    import socket

    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    scontrol = shutil.which("scontrol", path=environ.get("PATH"))
    if scontrol is None:
        return name
    proc = subprocess.run(
        [scontrol, "show", "node", name, "-o"], capture_output=True, text=True, check=False
    )
    match = re.search(r"\bNodeAddr=(\S+)", proc.stdout)
    return match.group(1) if proc.returncode == 0 and match else name


def plan_from_slurm_env(
    cfg: DistillConfig, environ: Mapping[str, str], *, resolve: bool = False
) -> LaunchPlan:
    """Launch plan of this node inside a Slurm job step (one ``gkd``/torchrun per node, started
    by ``srun``): nodes and node rank from ``SLURM_STEP_NUM_NODES``/``SLURM_NODEID``, the
    rendezvous on the first host of ``SLURM_STEP_NODELIST`` (``MASTER_ADDR`` overrides), its port
    from ``MASTER_PORT`` or derived from ``SLURM_JOB_ID``, the run id from ``SLURM_JOB_ID``.
    ``resolve``: turn a node name that does not resolve into its ``NodeAddr`` (asks scontrol)."""
    job_keys = ("SLURM_JOB_NODELIST", "SLURM_NODELIST")
    nodelist = _step_or_job(environ, "SLURM_STEP_NODELIST", job_keys)
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not nodelist or not job_id:
        raise LaunchError(
            "not inside a Slurm allocation (SLURM_JOB_ID and SLURM_JOB_NODELIST are unset); use "
            "gkd distill --slurm to submit a job"
        )
    hosts = expand_hostlist(nodelist)
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    count = _step_or_job(environ, "SLURM_STEP_NUM_NODES", ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
    nnodes = int(count) if count.isdigit() else len(hosts)
    if nnodes != len(hosts):
        raise LaunchError(
            f"SLURM_JOB_NUM_NODES={nnodes} but SLURM_JOB_NODELIST has {len(hosts)} hosts"
        )
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")
    if environ.get("SLURM_STEP_ID") is not None and tasks.isdigit() and int(tasks) != nnodes:
        raise LaunchError(
            f"this srun starts {tasks} tasks on {nnodes} node(s); gkd needs exactly one per node "
            "(it starts the workers itself): srun --ntasks-per-node=1 gkd distill ..."
        )
    if nnodes != cfg.parallel.nnodes:
        raise ConfigError(
            f"the Slurm allocation has {nnodes} nodes but parallel.nnodes={cfg.parallel.nnodes}; "
            f"set parallel.nnodes={nnodes}",
            field="parallel.nnodes",
        )
    node_rank = _int_env(environ, "SLURM_NODEID") if environ.get("SLURM_NODEID") else 0
    nproc = _procs_per_node(cfg, nnodes, "the Slurm allocation")
    gpus = environ.get("SLURM_GPUS_ON_NODE", "")
    if gpus.isdigit() and 0 < int(gpus) < nproc:
        raise ConfigError(
            f"each node runs {nproc} processes (tp x pp x dp / nodes) but has only {gpus} GPUs "
            "(SLURM_GPUS_ON_NODE); change parallel.dp or the allocation",
            field="parallel.dp",
        )
    if environ.get("MASTER_PORT"):
        port = _int_env(environ, "MASTER_PORT")
    else:
        port = slurm_rdzv_port(job_id, environ.get("SLURM_STEP_ID"))
    head = environ.get("MASTER_ADDR") or hosts[0]
    if resolve:
        head = _resolve_node(head, environ)
    return LaunchPlan(
        nnodes=nnodes,
        nproc_per_node=nproc,
        node_rank=node_rank,
        master_addr=head,
        master_port=port,
        rdzv_backend="c10d",
        rdzv_endpoint=f"{head}:{port}",
        rdzv_id=job_id,
        entry_module=WORKER_MODULE,
        args=_worker_args(cfg),
        env=_worker_env(environ),
        log_dir=str(Path(cfg.output.dir) / "logs"),
    )


def slurm_context(environ: Mapping[str, str]) -> str | None:
    """Where this process runs with respect to Slurm: ``None`` (no job), ``"step"`` (a task of
    ``srun``, or an interactive step), ``"batch"`` (the batch script, on the job's first node) or
    ``"shell"`` (``salloc``'s shell, usually on the login node: no node of the job)."""
    if not (environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")):
        return None
    if environ.get("SLURM_STEP_ID") is not None:
        return "step"
    if environ.get("SLURM_NODEID") is not None:
        return "batch"
    return "shell"


def in_slurm_allocation(environ: Mapping[str, str]) -> bool:
    """True inside a Slurm job step or batch script (where ``plan_from_slurm_env`` applies)."""
    return slurm_context(environ) in ("step", "batch")


def slurm_job_nodes(environ: Mapping[str, str]) -> int:
    """Nodes of the allocation this process belongs to (1 when unknown)."""
    count = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or ""
    if count.isdigit():
        return int(count)
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    return len(expand_hostlist(nodelist)) if nodelist else 1


def ready_token(plan: LaunchPlan, environ: Mapping[str, str]) -> str:
    """What node 0 writes to :func:`ready_path` once ``output.dir`` is prepared: the same on
    every node of one launch (job, step, requeue attempt) and different for the next launch."""
    parts = [
        plan.rdzv_id,
        environ.get("SLURM_STEP_ID", ""),
        environ.get("SLURM_RESTART_COUNT", "0"),
    ]
    return ":".join(parts)


def ready_path(output_dir: str | os.PathLike) -> Path:
    """The file node 0 writes after preparing ``output.dir`` (the other nodes wait for it)."""
    return Path(output_dir) / "logs" / ".prepared"


def wait_until_prepared(
    output_dir: str | os.PathLike, token: str, timeout_s: float = 900.0, poll_s: float = 0.5
) -> None:
    """On nodes other than 0: wait until node 0 has checked (and maybe cleaned) ``output.dir``
    and written its config, so nothing here touches the directory first."""
    import time

    path = ready_path(output_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if path.read_text().strip() == token:
                return
        except OSError:
            pass
        time.sleep(poll_s)
    raise LaunchError(
        f"node 0 did not prepare {output_dir} within {timeout_s:.0f} s (no {path} for this "
        "launch); see node 0's output for its error"
    )


# ---------------------------------------------------------------------------------------------
# sbatch options checked against the cluster
# ---------------------------------------------------------------------------------------------

_TIME_FORMATS = (
    r"\d+",  # minutes
    r"\d+:\d{1,2}",  # minutes:seconds
    r"\d+:\d{1,2}:\d{1,2}",  # hours:minutes:seconds
    r"\d+-\d+",  # days-hours
    r"\d+-\d+:\d{1,2}",  # days-hours:minutes
    r"\d+-\d+:\d{1,2}:\d{1,2}",  # days-hours:minutes:seconds
)


def check_slurm_time(value: str) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of Slurm's ``--time`` formats."""
    text = value.strip()
    if text.lower() in ("infinite", "unlimited") or any(
        re.fullmatch(f, text) for f in _TIME_FORMATS
    ):
        return
    raise ConfigError(
        f"--time {value!r} is not a Slurm time: use minutes, HH:MM:SS or D-HH:MM:SS "
        "(e.g. --time 24:00:00 or --time 2-00:00:00)",
        field="time",
    )


@dataclass(kw_only=True)
class PartitionInfo:
    """What ``sinfo`` says about one partition."""

    name: str
    nodes: int
    cpus_per_node: int
    """Fewest CPUs of its nodes."""
    gpus_per_node: int
    """Fewest GPUs (``gpu`` GRES) of its nodes; 0 on a CPU partition."""
    default: bool = False


def _gres_gpus(gres: str) -> int:
    total = 0
    for item in _split_top_level(gres):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def slurm_partitions(environ: Mapping[str, str] | None = None) -> dict[str, PartitionInfo] | None:
    """Partitions of the cluster from ``sinfo`` (``None`` where sinfo is missing or fails)."""
    environ = os.environ if environ is None else environ
    sinfo = shutil.which("sinfo", path=environ.get("PATH"))
    if sinfo is None:
        return None
    try:
        proc = subprocess.run(
            [sinfo, "-h", "-N", "-o", "%N|%P|%c|%G"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    nodes: dict[str, set[str]] = {}
    cpus: dict[str, int] = {}
    gpus: dict[str, int] = {}
    default = None
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        node, part, cpu, gres = fields
        if part.endswith("*"):
            part = part[:-1]
            default = part
        nodes.setdefault(part, set()).add(node)
        digits = re.match(r"\d*", cpu)  # "32" or "32+" (mixed nodes); \d* always matches
        count = int(digits.group() or 0) if digits else 0
        cpus[part] = min(cpus.get(part, count), count)
        gpus[part] = min(gpus.get(part, _gres_gpus(gres)), _gres_gpus(gres))
    return {
        part: PartitionInfo(
            name=part,
            nodes=len(members),
            cpus_per_node=cpus[part],
            gpus_per_node=gpus[part],
            default=part == default,
        )
        for part, members in nodes.items()
    }


def check_partition(
    partitions: Mapping[str, PartitionInfo], partition: str | None, nodes: int
) -> PartitionInfo | None:
    """The partition a job goes to (``partition`` or the default one), checked to exist and to
    have ``nodes`` nodes; ``ConfigError`` naming the partitions otherwise."""
    names = ", ".join(sorted(partitions)) or "(none)"
    if partition is None:
        info = next((p for p in partitions.values() if p.default), None)
        if info is None:
            return None
    else:
        info = partitions.get(partition)
        if info is None:
            raise ConfigError(
                f"--partition {partition}: no such Slurm partition (sinfo lists: {names})",
                field="partition",
            )
    if nodes > info.nodes:
        raise ConfigError(
            f"--nodes {nodes}: partition {info.name} has only {info.nodes} node(s); use "
            f"--nodes {info.nodes} or less, or another partition (sinfo lists: {names})",
            field="nodes",
        )
    return info


# ---------------------------------------------------------------------------------------------
# sbatch
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SlurmOptions:
    """What ``#SBATCH`` lines and commands the generated batch script gets."""

    nodes: int
    """Nodes to allocate (``--nodes``)."""
    gpus_per_node: int
    """GPUs per node (``--gpus-per-node``); 0 (a CPU partition): no GPU request."""
    procs_per_node: int | None = None
    """Worker processes per node (default: ``gpus_per_node``, or tp x pp x dp / nodes)."""
    time: str | None = None
    """Wall-clock limit (``--time``, e.g. ``24:00:00``)."""
    partition: str | None = None
    """Partition (``--partition``)."""
    account: str | None = None
    """Account to charge (``--account``)."""
    job_name: str = "gkd"
    """Job name (``--job-name``)."""
    output: str | None = None
    """Batch output file (``--output``); default ``<output.dir>/logs/slurm-%j.out``."""
    error: str | None = None
    """Batch error file (``--error``); default: same as output."""
    cpus_per_task: int | None = None
    """CPUs of each node's gkd launcher and its workers (``--cpus-per-task``)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More ``#SBATCH`` options, e.g. ``--exclusive`` or ``--qos=high``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before ``srun`` (``module load ...``, ``source .venv/bin/activate``)."""
    python: str = "python"
    """Python interpreter on the compute nodes (``gkd distill --slurm`` passes its own,
    ``sys.executable``)."""
    signal: str = "USR1"
    """Signal Slurm sends the batch script before the time limit (``--signal=B:<sig>@<s>``)."""
    signal_seconds: int | None = 300
    """Seconds before the time limit it comes (None: no ``--signal``)."""
    requeue: bool = True
    """``--requeue``, and the script requeues itself after a preemption whose save completed."""
    workdir: str | None = None
    """Working directory of the job (``--chdir``): where relative paths of the config resolve."""


def slurm_options(
    cfg: DistillConfig,
    *,
    gpus_per_node: int | None,
    cpus_per_task: int | None,
    time: str | None,
    partition: str | None,
    submit: bool,
    python: str | None,
    signal_seconds: int | None,
    **rest,
) -> SlurmOptions:
    """``SlurmOptions`` of a gkd command's ``--slurm`` options (``gkd distill``, ``gkd
    cache-teacher``), checked before anything is written: the time format, sbatch present
    (``--submit``), and, where sinfo answers, the partition exists and has the nodes; GPUs and
    CPUs per node default to what the partition's nodes have. ``rest``: the other
    :class:`SlurmOptions` fields (account, job_name, extra_sbatch, setup, requeue)."""
    if time is not None:
        check_slurm_time(time)
    if submit:
        require_sbatch()
    nodes = cfg.parallel.nnodes
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: must be at least 1", field="nodes")
    procs = cfg.parallel.world_size // nodes
    partitions = slurm_partitions()
    info = check_partition(partitions, partition, nodes) if partitions else None
    if gpus_per_node is not None and gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node {gpus_per_node}: must be 0 or more")
    if gpus_per_node is None:
        # No sinfo (a laptop): assume GPU nodes, gkd's usual target; the script says so.
        gpus_per_node = procs if info is None or info.gpus_per_node > 0 else 0
    elif info is not None and gpus_per_node > info.gpus_per_node:
        raise ConfigError(
            f"--gpus-per-node {gpus_per_node}: the nodes of partition {info.name} have "
            f"{info.gpus_per_node} GPU(s)"
            + ("; use --gpus-per-node 0 for CPU workers" if info.gpus_per_node == 0 else ""),
            field="gpus_per_node",
        )
    if cpus_per_task is None:
        cpus_per_task = info.cpus_per_node if info is not None and info.cpus_per_node else procs
    return SlurmOptions(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        procs_per_node=procs,
        cpus_per_task=cpus_per_task,
        time=time,
        partition=partition,
        python=python or sys.executable,
        workdir=os.getcwd(),
        signal_seconds=signal_seconds or None,
        **rest,
    )


def write_batch_script(
    cfg: DistillConfig,
    options: SlurmOptions,
    script_path: Path,
    *,
    config_path: str | os.PathLike,
    and_submit: bool,
    command: list[str] | None = None,
    finished_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Write (and with ``and_submit``, submit) the batch script of :func:`render_sbatch`, after
    creating the log folder sbatch opens ``--output`` in; returns the lines to print (where the
    script is, how to submit it, or the job id and how to follow and stop it)."""
    out = Path(cfg.output.dir)
    script = render_sbatch(cfg, options, config_path, command=command, finished_dir=finished_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)  # sbatch opens --output in it
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    lines = [f"wrote {config_path} and {script_path}"]
    if not and_submit:
        return [*lines, f"submit with: sbatch {script_path}"]
    job_id = submit(script_path)
    log = (options.output or str(out / "logs" / "slurm-%j.out")).replace("%j", job_id)
    return [
        *lines,
        f"submitted Slurm job {job_id}\n"
        f"  follow it:  squeue -j {job_id}   (or scontrol show job {job_id})\n"
        f"  its output: tail -f {log}\n"
        f"  stop it and save: scancel -b --signal=USR1 {job_id}   (requeues itself)",
    ]


def _check_procs(cfg: DistillConfig, options: SlurmOptions) -> int:
    world = cfg.parallel.world_size
    nodes = options.nodes
    procs = options.procs_per_node or options.gpus_per_node or world // max(nodes, 1)
    if world % nodes:
        raise ConfigError(
            f"{world} processes (tp x pp x dp) cannot be split over {nodes} nodes",
            field="parallel.dp",
        )
    if nodes * procs != world:
        raise ConfigError(
            f"--nodes {nodes} x --gpus-per-node {procs} = {nodes * procs} but parallel.tp x pp x "
            f"dp = {world}; use --gpus-per-node {world // nodes}",
            field="parallel.dp",
        )
    if options.gpus_per_node and options.gpus_per_node != procs:
        raise ConfigError(
            f"--gpus-per-node {options.gpus_per_node}: each node runs {procs} workers (tp x pp x "
            f"dp / nodes), one per GPU; use --gpus-per-node {procs} (or 0 for CPU workers)",
            field="gpus_per_node",
        )
    return procs


def render_sbatch(
    cfg: DistillConfig,
    options: SlurmOptions,
    config_path: str | os.PathLike,
    *,
    command: list[str] | None = None,
    finished_dir: str | os.PathLike | None = None,
) -> str:
    """A Slurm batch script that starts one ``gkd distill`` launcher per node with ``srun`` (each
    starts ``tp x pp x dp / nodes`` workers, c10d rendezvous on the first node), forwards the
    preemption signal to them, and requeues the job after they saved a checkpoint.

    ``command``: another gkd command line to run on every node instead (``["cache-teacher",
    CONFIG, "--out", DIR, ...]``, after ``python -m gkd_cli.app``); ``finished_dir``: what
    ``python -m gkd_cli.launch finished`` asks about before requeueing (default
    ``output.dir``)."""
    procs = _check_procs(cfg, options)
    out_dir = Path(cfg.output.dir)
    command = ["distill", str(config_path)] if command is None else [str(c) for c in command]
    finished = Path(finished_dir) if finished_dir is not None else out_dir
    output = options.output or str(out_dir / "logs" / "slurm-%j.out")
    p = cfg.parallel
    q = shlex.quote
    devices = f"{options.gpus_per_node} GPU(s)" if options.gpus_per_node else "CPU only"
    lines = [
        "#!/bin/bash",
        f"# gkd {command[0]}: tp={p.tp} pp={p.pp} dp={p.dp} on {options.nodes} node(s) x {procs} "
        f"worker(s), {devices}. Generated by gkd; submit with: sbatch <this file>",
        f"#SBATCH --job-name={q(options.job_name)}",
        f"#SBATCH --nodes={options.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if options.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={options.gpus_per_node}")
    if options.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={options.cpus_per_task}")
    if options.time:
        lines.append(f"#SBATCH --time={q(options.time)}")
    if options.partition:
        lines.append(f"#SBATCH --partition={q(options.partition)}")
    if options.account:
        lines.append(f"#SBATCH --account={q(options.account)}")
    if options.workdir:
        lines.append(f"#SBATCH --chdir={q(options.workdir)}")
    lines.append(f"#SBATCH --output={q(output)}")
    if options.error:
        lines.append(f"#SBATCH --error={q(options.error)}")
    lines.append("#SBATCH --open-mode=append")
    if options.signal_seconds is not None:
        lines.append(f"#SBATCH --signal=B:{options.signal}@{options.signal_seconds}")
    lines.append("#SBATCH --requeue" if options.requeue else "#SBATCH --no-requeue")
    for extra in options.extra_sbatch:
        extra = extra.strip()
        lines.append(extra if extra.startswith("#SBATCH") else f"#SBATCH {extra}")
    lines += ["", "set -euo pipefail", ""]
    if options.setup:
        lines += [*options.setup, ""]
    worker_env = {**_worker_env({}), "PYTHONUNBUFFERED": "1"}
    lines += [f"export {k}={q(v)}" for k, v in sorted(worker_env.items())]
    python = q(options.python)
    srun = "srun --kill-on-bad-exit=1 --ntasks-per-node=1"
    if options.cpus_per_task:
        # Since Slurm 22.05 srun does not inherit the batch script's --cpus-per-task.
        srun += ' --cpus-per-task="${SLURM_CPUS_PER_TASK}"'
    requeue = [
        'echo "gkd: stopped after saving a checkpoint; requeueing job ${SLURM_JOB_ID} to resume"',
        'scontrol requeue "${SLURM_JOB_ID}" || echo "gkd: could not requeue; resume with:'
        ' scontrol requeue ${SLURM_JOB_ID} (or sbatch this script again)"',
    ]
    if not options.requeue:
        requeue = [
            'echo "gkd: stopped after saving a checkpoint; resume with: sbatch this script again"'
        ]
    lines += [
        "",
        'echo "gkd: job ${SLURM_JOB_ID} attempt ${SLURM_RESTART_COUNT:-0} on'
        ' ${SLURM_JOB_NODELIST} ($(date -u +%FT%TZ))"',
        f"mkdir -p {q(str(out_dir / 'logs'))}",
        "",
        "# One gkd launcher per node; each starts this node's workers. A signal to this script",
        f"# (Slurm sends SIG{options.signal} {options.signal_seconds or '-'} s before the time"
        " limit, scancel -b --signal=...)",
        "# goes to srun, which forwards it to the launchers: the workers finish the current"
        " step, save",
        "# a checkpoint and exit 0.",
        "stop_signal=",
        "forward() {",
        "  stop_signal=$1",
        '  echo "gkd: got SIG$1: the workers finish the current step and save"',
        '  kill -s "$1" "$srun_pid" 2>/dev/null || true',
        "}",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        f"{srun} \\",
        f"  {python} -m gkd_cli.app {' '.join(q(c) for c in command)} &",
        "srun_pid=$!",
        "while :; do",
        '  wait "$srun_pid" && status=0 || status=$?',
        "  # wait returns early (status > 128) when a trapped signal arrives; srun still runs",
        '  if [ "$status" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi',
        "  break",
        "done",
        'if [ "$status" -ne 0 ]; then',
        '  echo "gkd: failed (srun exit $status${stop_signal:+, after SIG$stop_signal})"',
        '  exit "$status"',
        "fi",
        "# exit 0: the run is complete; 1: it stopped early after saving (a preemption)",
        "finished=0",
        f"{python} -m gkd_cli.launch finished {q(str(finished))} || finished=$?",
        'if [ "$finished" -eq 0 ]; then',
        '  echo "gkd: finished"',
        "  exit 0",
        "fi",
        'if [ "$finished" -ne 1 ]; then',
        '  echo "gkd: cannot tell whether the run finished (exit $finished); not requeueing"',
        '  exit "$finished"',
        "fi",
        *requeue,
        "",
    ]
    return "\n".join(lines)


def run_finished(output_dir: str | os.PathLike) -> bool:
    """True when ``output_dir`` holds a checkpoint of the last step of its ``config.yaml``, or
    is a finalized teacher cache."""
    from gkd_cli.config import load_config
    from parallel.checkpoint import latest_complete, read_meta

    out = Path(output_dir)
    if (out / "header.json").is_file() and not (out / "config.yaml").exists():
        # a teacher cache (gkd cache-teacher): complete once finalized (meta.json written)
        return (out / "meta.json").is_file()
    cfg = load_config(out / "config.yaml", validate_run=False)  # only train.steps is read
    latest = latest_complete(out / "checkpoints")
    if latest is None:
        return False
    return int(read_meta(latest).get("step", 0)) >= cfg.train.steps


def submit(script_path: str | os.PathLike) -> str:
    """Submit a batch script with ``sbatch --parsable``; return the job id."""
    sbatch = require_sbatch(script_path)
    proc = subprocess.run(
        [sbatch, "--parsable", str(script_path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(
            f"sbatch {script_path} failed (exit {proc.returncode}): "
            f"{detail[-1] if detail else 'no output'}"
        )
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id:
        raise LaunchError(f"sbatch {script_path} printed no job id")
    return job_id


def require_sbatch(script_path: str | os.PathLike | None = None) -> str:
    """Path of ``sbatch``, or a ``LaunchError`` saying how to submit without it."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        where = f"submit {script_path} yourself" if script_path else "drop --submit"
        raise LaunchError(f"sbatch not found: run this on a Slurm login node, or {where}")
    return sbatch


# ---------------------------------------------------------------------------------------------
# Running torchrun's agent in-process
# ---------------------------------------------------------------------------------------------


LAUNCHER_TAG_ENV = "GKD_LAUNCHER_TAG"
"""Set in every worker's environment (so inherited by anything a worker starts): the launcher finds
its workers by it, and tests scan ``/proc/*/environ`` for it to prove nothing outlived a run."""
FAILED_AT_ENV = "GKD_FAILED_AT_FILE"
"""Where a worker writes the time (``time.time()``) its first exception was raised, before it tells
the other ranks (by tearing down the process group), so that blame goes to the first failure."""
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
"""Forwarded to the workers, which finish the step, save and exit 0 (Slurm's preemption signals)."""
INTERRUPT_SIGNALS = ("SIGINT", "SIGHUP", "SIGQUIT")
"""Forwarded to the workers, which stop without saving (a second one kills them)."""


def rank_log_paths(log_dir: str | os.PathLike, rank: int) -> dict[str, Path]:
    """Where rank ``rank``'s stdout, stderr, elastic error file and failure time go."""
    base = Path(log_dir)
    return {
        "stdout": base / f"rank{rank}.stdout.log",
        "stderr": base / f"rank{rank}.stderr.log",
        "error": base / f"rank{rank}.error.json",
        "failed_at": base / f"rank{rank}.failed_at",
    }


ATTEMPT_DIR = re.compile(r"^attempt_(\d+)$")


def attempt_log_dir(
    logs_root: str | os.PathLike, plan: LaunchPlan, environ: Mapping[str, str] | None = None
) -> Path:
    """A fresh folder for this launch's logs under ``logs_root`` (``<output.dir>/logs``), so a rerun
    keeps the logs of the attempt it follows: ``attempt_1``, ``attempt_2``, ... on one node;
    ``attempt_<run id>[.<requeue count>]`` with several nodes (every node must pick the same name
    without talking to the others; inside Slurm the run id is the job id and
    ``SLURM_RESTART_COUNT`` counts requeues). Node 0 points ``logs/latest`` at it."""
    environ = os.environ if environ is None else environ
    root = Path(logs_root)
    root.mkdir(parents=True, exist_ok=True)
    if plan.nnodes > 1:
        name = plan.rdzv_id + (
            f".{environ['SLURM_RESTART_COUNT']}" if environ.get("SLURM_RESTART_COUNT") else ""
        )
        folder = root / ("attempt_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name))
        folder.mkdir(exist_ok=True)
    else:
        number = max(
            (int(m.group(1)) for p in root.iterdir() if (m := ATTEMPT_DIR.match(p.name))), default=0
        )
        while True:  # mkdir is the lock: two launchers never share an attempt folder
            number += 1
            folder = root / f"attempt_{number}"
            try:
                folder.mkdir()
                break
            except FileExistsError:
                continue
    if plan.node_rank == 0:
        link = root / f".latest-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(folder.name)
        os.replace(link, root / "latest")
    return folder


def _logs_specs(log_dir: str):
    """Elastic ``LogsSpecs`` that writes ``rank<R>.{stdout,stderr}.log`` and ``rank<R>.error.json``
    flat into ``log_dir`` (torchrun's default nests them in a random temp folder)."""
    from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs, Std

    class RankLogsSpecs(LogsSpecs):
        def __init__(self) -> None:
            super().__init__(log_dir=log_dir, redirects=Std.ALL, tee=Std.NONE)

        @property
        def root_log_dir(self) -> str:
            return log_dir

        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            os.makedirs(log_dir, exist_ok=True)
            dest = LogsDest()
            for local_rank, env in envs.items():
                paths = rank_log_paths(log_dir, int(env.get("RANK", local_rank)))
                for stale in ("error", "failed_at"):  # a stale file would be read as this run's
                    paths[stale].unlink(missing_ok=True)
                dest.stdouts[local_rank] = str(paths["stdout"])
                dest.stderrs[local_rank] = str(paths["stderr"])
                dest.error_files[local_rank] = str(paths["error"])
                env["TORCHELASTIC_ERROR_FILE"] = str(paths["error"])
                env[FAILED_AT_ENV] = str(paths["failed_at"])
            return dest

    return RankLogsSpecs()


@contextlib.contextmanager
def _quiet_elastic(log_file: Path) -> Iterator[None]:
    """Send torch elastic's own logging to ``log_file`` instead of the console."""
    names = ("torch.distributed.elastic", "torch.distributed.launcher")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate))
        logger.propagate = False
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
        handler.close()


@contextlib.contextmanager
def _environment(extra: Mapping[str, str]) -> Iterator[None]:
    """Workers inherit the agent's environment: add ``extra`` for the launch only."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _traceback_from_error_file(path: str) -> tuple[str | None, str | None]:
    """(last line of the error, full traceback) from an elastic error file, if readable."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None, None
    message = data.get("message")
    if isinstance(message, dict):
        extra = message.get("extraInfo", {})
        trace = extra.get("py_callstack") or None
        text = message.get("message")
        return (text.strip() if isinstance(text, str) else None), trace
    if isinstance(message, str):
        return message.strip().splitlines()[-1] if message.strip() else None, message
    return None, None


def _last_lines(path: Path, count: int = 20) -> str | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return "\n".join(lines[-count:]) if lines else None


DEATH_SEEN_LATE_S = 1.0
"""How much later the launcher may see a rank's death than the ranks connected to it do: the kernel
closes a dying process's sockets (its peers raise "Connection reset by peer" at once) before the
process becomes a zombie (its pidfd turns readable), and the launcher must then be scheduled."""
_OWN_DEATH_SIGNALS = frozenset({"SIGKILL", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE"})
"""Signals that end a rank for a cause of its own (``kill -9``, the OOM killer, a crash), never
sent by torch elastic's cleanup within a second of another failure (its SIGTERM is excluded and
its SIGKILL comes 30 s later)."""


def _failure_times(
    failures: Mapping[int, object], log_dir: str, exited_at: Mapping[int, float]
) -> dict[int, float]:
    """When each failed rank failed (``time.time()``): the moment its first exception was raised
    (the worker writes it before tearing down its process group, which is what makes the other ranks
    fail); for a rank killed by a signal of its own (:data:`_OWN_DEATH_SIGNALS`), the moment the
    launcher saw it exit (pidfd) less :data:`DEATH_SEEN_LATE_S`; else when it exited; elastic's
    whole-second timestamp only where none of these is known."""
    times = {}
    for rank, failure in failures.items():
        try:
            times[rank] = float(rank_log_paths(log_dir, rank)["failed_at"].read_text())
            continue
        except (OSError, ValueError):
            pass
        if rank in exited_at:
            exitcode = int(getattr(failure, "exitcode", 1))
            own = exitcode < 0 and _signal_name(-exitcode) in _OWN_DEATH_SIGNALS
            times[rank] = exited_at[rank] - (DEATH_SEEN_LATE_S if own else 0.0)
        else:
            times[rank] = float(getattr(failure, "timestamp", 0) or 0)
    return times


def worker_failure(
    failures: Mapping[int, object], log_dir: str, exited_at: Mapping[int, float] | None = None
) -> WorkerFailedError:
    """Turn elastic's ``{global rank: ProcessFailure}`` into one error naming the root cause: the rank
    that failed first, by time (a rank killed with ``kill -9`` is the cause even though the others
    wrote tracebacks in the aftermath). ``exited_at``: ``{global rank: time.time() of its exit}``
    as the launcher saw it."""
    times = _failure_times(failures, log_dir, exited_at or {})
    rank = min(failures, key=lambda r: (times[r], r))
    failure = failures[rank]
    exitcode = int(getattr(failure, "exitcode", 1))
    paths = rank_log_paths(log_dir, rank)
    summary, trace = _traceback_from_error_file(str(paths["error"]))
    if trace is None:
        trace = _last_lines(paths["stderr"])
    if exitcode < 0:
        name = _signal_name(-exitcode)
        summary = summary or f"killed by signal {-exitcode} ({name})"
    if summary is None:
        summary = trace.strip().splitlines()[-1] if trace else "no error message (see the log)"
    return WorkerFailedError(
        rank=rank,
        exitcode=exitcode,
        message=summary,
        traceback=trace,
        log_path=str(paths["stderr"]),
        other_ranks=tuple(sorted(r for r in failures if r != rank)),
    )


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Workers:
    """This node's worker processes as the launcher's main thread sees them while torch elastic's
    agent (in another thread) runs them: found by :data:`LAUNCHER_TAG_ENV` in their environment,
    watched through pidfds (the exact time each one exits, without reaping it: that is the
    agent's), signalled, and their process groups killed once they are gone.

    Each worker is a process-group leader (elastic starts it in a new session), and whatever it
    starts stays in its group: megatron-core's checkpoint writer starts a multiprocessing
    ``Manager`` server and the resource tracker, which a ``kill -9`` of the worker would orphan."""

    def __init__(self, tag: str, expected: int) -> None:
        import select

        self.tag = tag
        self.expected = expected
        self.rank_of: dict[int, int] = {}
        """pid -> global rank."""
        self.exited_at: dict[int, float] = {}
        """global rank -> ``time.time()`` when its exit was seen."""
        self._fds: dict[int, int] = {}
        self._poller = select.poll()
        self._pending: list[int] = []
        """Signals sent before every worker was running: sent to the late ones when found."""

    def _discover(self) -> None:
        import psutil

        for child in psutil.Process().children():
            if child.pid in self.rank_of:
                continue
            try:
                env = child.environ()
            except psutil.Error:
                continue
            if env.get(LAUNCHER_TAG_ENV) != self.tag:
                continue  # not exec'ed yet (still our environment), or not ours
            self.rank_of[child.pid] = int(env.get("RANK", "-1"))
            for signum in self._pending:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child.pid, signum)
            try:
                fd = os.pidfd_open(child.pid)
            except (OSError, AttributeError):  # already reaped, or no pidfds: best effort
                self._exited(child.pid)
                continue
            self._fds[fd] = child.pid
            self._poller.register(fd)

    def _exited(self, pid: int) -> None:
        import time

        self.exited_at.setdefault(self.rank_of[pid], time.time())
        _kill_group(pid)

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, noting workers that exit (a signal handler may run meanwhile)."""
        if len(self.rank_of) < self.expected:
            self._discover()
        for fd, _ in self._poller.poll(int(seconds * 1000)):
            self._poller.unregister(fd)
            os.close(fd)
            self._exited(self._fds.pop(fd))

    def send(self, signum: int, *, group: bool = False) -> None:
        """Send ``signum`` to the running workers (``group``: to everything they started too)."""
        self._discover()
        if len(self.rank_of) < self.expected:
            self._pending.append(signum)
        for pid, rank in self.rank_of.items():
            if rank in self.exited_at:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                (os.killpg if group else os.kill)(pid, signum)

    def close(self) -> None:
        """Kill whatever the workers left behind, and let go of the pidfds."""
        for fd, pid in self._fds.items():
            self._poller.unregister(fd)
            os.close(fd)
            _kill_group(pid)
        self._fds.clear()
        for pid in self.rank_of:
            _kill_group(pid)


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group of a worker that has exited (a zombie or reaped: its group id
    cannot be reused while any member lives, so this never hits an unrelated process)."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_local(plan: LaunchPlan) -> str | None:
    """Start this node's workers with torch elastic (torchrun's Python API) and wait for them.

    Returns ``None`` when the workers finished, or the name of the preemption signal (``SIGTERM``,
    ``SIGUSR1``) that this process received and forwarded to the workers, which then finished their
    step, saved a checkpoint and exited 0; the launcher waits for that save however long it takes.
    SIGINT, SIGHUP and SIGQUIT are forwarded too (the workers stop without saving; a second one
    kills them) and raise :class:`LaunchError` (exit code 130). When this function returns or
    raises, nothing the workers started is left running.

    The elastic agent runs in a helper thread, so that the main thread owns the signal handlers
    (the agent's own handlers would turn SIGTERM into an immediate shutdown of the workers with a
    30-second deadline, and leave SIGUSR1 to kill the launcher).

    Raises :class:`WorkerFailedError` when a worker fails (naming the rank that failed first) and
    :class:`LaunchError` when the launch is interrupted or cannot rendezvous.
    """
    import signal
    import threading

    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if torch.cuda.is_available() and plan.nproc_per_node > torch.cuda.device_count():
        raise LaunchError(
            f"this node has {torch.cuda.device_count()} GPUs but the plan starts "
            f"{plan.nproc_per_node} workers (tp x pp x dp / nnodes); lower parallel.dp or use "
            "more nodes"
        )
    rdzv_configs: dict[str, object] = {"timeout": 900}
    if plan.nnodes > 1:
        rdzv_configs["is_host"] = plan.node_rank == 0
    config = LaunchConfig(
        min_nodes=plan.nnodes,
        max_nodes=plan.nnodes,
        nproc_per_node=plan.nproc_per_node,
        logs_specs=_logs_specs(plan.log_dir),
        run_id=plan.rdzv_id,
        role="gkd-worker",
        rdzv_endpoint=plan.rdzv_endpoint,
        rdzv_backend=plan.rdzv_backend,
        rdzv_configs=rdzv_configs,
        max_restarts=plan.max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    command = ["-u", "-m", plan.entry_module, *plan.args]
    tag = f"{os.getpid()}-{plan.rdzv_id}"
    workers = _Workers(tag, plan.nproc_per_node)
    outcome: dict[str, BaseException] = {}
    received: list[str] = []

    def agent() -> None:
        try:
            elastic_launch(config, sys.executable)(*command)
        except BaseException as err:  # handed to the main thread
            outcome["error"] = err

    def on_signal(signum, frame) -> None:
        name = signal.Signals(signum).name
        received.append(name)
        if name in PREEMPT_SIGNALS:
            workers.send(signum)  # each worker finishes its step, saves and exits 0
        elif sum(n in INTERRUPT_SIGNALS for n in received) == 1:
            workers.send(signum)
        else:
            workers.send(signal.SIGKILL, group=True)

    handled = [
        getattr(signal, n) for n in (*PREEMPT_SIGNALS, *INTERRUPT_SIGNALS) if hasattr(signal, n)
    ]
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in handled} if in_main else {}
    try:
        with (
            _environment({**plan.env, LAUNCHER_TAG_ENV: tag}),
            _quiet_elastic(Path(plan.log_dir) / "launcher.log"),
        ):
            thread = threading.Thread(target=agent, name="gkd-elastic-agent", daemon=True)
            thread.start()
            while thread.is_alive():
                workers.wait(0.2)
            workers.wait(0)  # exits seen in the last instant
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        workers.close()
    err = outcome.get("error")
    interrupted = next((n for n in received if n in INTERRUPT_SIGNALS), None)
    preempted = next((n for n in received if n in PREEMPT_SIGNALS), None)
    if err is None:
        if interrupted:  # the workers had finished anyway
            return None
        return preempted
    if isinstance(err, ChildFailedError):
        stopped_by = interrupted or preempted
        if stopped_by and (
            interrupted
            or all(
                int(getattr(f, "exitcode", 0)) == -getattr(signal, stopped_by)
                for f in err.failures.values()
            )
        ):  # stopped as asked (a worker without a preemption handler dies of the signal itself)
            raise LaunchError(
                f"interrupted by {stopped_by}; workers stopped",
                exit_code=128 + getattr(signal, stopped_by),
                signal=stopped_by,
            ) from None
        with contextlib.suppress(OSError), open(Path(plan.log_dir) / "launcher.log", "a") as fh:
            fh.write(f"gkd: exits seen (rank: time.time()): {workers.exited_at}\n")
        raise worker_failure(err.failures, plan.log_dir, workers.exited_at) from None
    if isinstance(err, SignalException):  # (only when run_local is called outside the main thread)
        raise LaunchError(
            f"interrupted by {err.sigval.name}; workers stopped",
            exit_code=130,
            signal=err.sigval.name,
        ) from None
    if isinstance(err, RendezvousError):
        raise LaunchError(
            f"rendezvous at {plan.rdzv_endpoint} failed: {err}; check that every node runs "
            "and can reach that address"
        ) from None
    raise err


def _main(argv: list[str]) -> int:
    """``python -m gkd_cli.launch finished OUTPUT_DIR``: exit 0 when the run there is complete
    (the batch script asks this before requeueing itself)."""
    if len(argv) == 2 and argv[0] == "finished":
        try:
            return 0 if run_finished(argv[1]) else 1
        except Exception as err:  # not "unfinished": the batch script must not requeue on this
            print(f"gkd: cannot read the run in {argv[1]}: {err}", file=sys.stderr)
            return 3
    print("usage: python -m gkd_cli.launch finished OUTPUT_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
