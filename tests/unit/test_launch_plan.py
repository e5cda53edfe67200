"""Launch plans (local, Slurm environment), host-list expansion, sbatch rendering against saved
expected scripts, running the rendered script with stub Slurm commands, and submission."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from gkd_cli.config import build_config, load_config
from gkd_cli.errors import ConfigError, LaunchError
from gkd_cli.launch import (
    LaunchPlan,
    PartitionInfo,
    SlurmOptions,
    check_partition,
    check_slurm_time,
    expand_hostlist,
    in_slurm_allocation,
    plan_from_slurm_env,
    plan_local,
    render_sbatch,
    slurm_context,
    slurm_partitions,
    submit,
)

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    from tests.unit.test_config_load import install_fake_registry

    return install_fake_registry(monkeypatch)


REPO = Path(__file__).resolve().parents[2]
EXPECTED = Path(__file__).parent / "expected"


def tiny(tp=2, pp=1, dp=1, nnodes=1, out="/tmp/gkd-run"):
    model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512)
    return build_config(
        {
            "teacher": {**model, "init": "random"},
            "student": model,
            "methods": [{"name": "glmd"}],
            "parallel": {"tp": tp, "pp": pp, "dp": dp, "nnodes": nnodes},
            "data": {"tokenizer": "tok.json", "seq_length": 32},
            "output": {"dir": out},
        }
    )


# ---------------------------------------------------------------------------------------------
# Local plans
# ---------------------------------------------------------------------------------------------


def test_plan_local_single_node():
    plan = plan_local(tiny(tp=2, pp=2, dp=2), environ={})
    assert isinstance(plan, LaunchPlan)
    assert (plan.nnodes, plan.nproc_per_node, plan.node_rank) == (1, 8, 0)
    assert plan.rdzv_backend == "c10d" and plan.rdzv_endpoint.endswith(":0")
    assert plan.entry_module == "gkd_cli.worker"
    assert plan.args == ["--config", "/tmp/gkd-run/config.yaml"]
    assert plan.log_dir == "/tmp/gkd-run/logs"
    assert plan.env == {"OMP_NUM_THREADS": "1"}
    assert plan.world_size == 8


def test_plan_local_keeps_user_thread_count():
    assert plan_local(tiny(), environ={"OMP_NUM_THREADS": "4"}).env["OMP_NUM_THREADS"] == "4"


def test_plan_local_several_nodes_needs_master():
    cfg = tiny(tp=2, dp=2, nnodes=2)
    with pytest.raises(ConfigError, match="MASTER_ADDR and NODE_RANK"):
        plan_local(cfg, environ={})
    plan = plan_local(cfg, environ={"MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1"})
    assert (plan.nnodes, plan.nproc_per_node, plan.node_rank) == (2, 2, 1)
    assert plan.rdzv_endpoint == "10.0.0.1:29500"
    with pytest.raises(ConfigError, match="NODE_RANK=2"):
        plan_local(cfg, environ={"MASTER_ADDR": "h", "NODE_RANK": "2"})


def test_plan_local_not_integral():
    cfg = tiny(tp=2, dp=3)
    cfg.parallel.nnodes = 4  # bypass validation: the planner must still refuse
    with pytest.raises(ConfigError, match="cannot be split evenly over 4 nodes"):
        plan_local(cfg, environ={})


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a[1-2],b5", ["a1", "a2", "b5"]),
        ("gpu-[8-10]-ib", ["gpu-8-ib", "gpu-9-ib", "gpu-10-ib"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("x[098-101]", ["x098", "x099", "x100", "x101"]),
        ("c1,c[3,5],d", ["c1", "c3", "c5", "d"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_expand_hostlist_rejects_garbage():
    with pytest.raises(LaunchError, match="cannot parse"):
        expand_hostlist("node[a-b]")


SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_GPUS_ON_NODE": "4",
}


def test_plan_from_slurm_env():
    plan = plan_from_slurm_env(tiny(tp=4, dp=2, nnodes=2), SLURM_ENV)
    assert (plan.nnodes, plan.nproc_per_node, plan.node_rank) == (2, 4, 1)
    assert plan.master_addr == "gpu07"
    assert plan.rdzv_endpoint == f"gpu07:{plan.master_port}" and plan.rdzv_backend == "c10d"
    assert plan.rdzv_id == "4242"
    assert in_slurm_allocation(SLURM_ENV) and not in_slurm_allocation({})


def test_slurm_rendezvous_port_follows_the_job():
    """Two jobs on one node must not share a port (the second crashed when the first ended);
    every node of one job computes the same one; MASTER_PORT still wins."""
    cfg = tiny(tp=4, dp=2, nnodes=2)
    ports = {
        plan_from_slurm_env(cfg, {**SLURM_ENV, "SLURM_JOB_ID": str(job)}).master_port
        for job in range(4242, 4242 + 500)
    }
    assert len(ports) == 500
    assert all(15000 <= port < 30000 for port in ports)  # below Linux's ephemeral range
    node0 = plan_from_slurm_env(cfg, {**SLURM_ENV, "SLURM_NODEID": "0"})
    assert node0.master_port == plan_from_slurm_env(cfg, SLURM_ENV).master_port
    fixed = plan_from_slurm_env(cfg, {**SLURM_ENV, "MASTER_PORT": "31000"})
    assert fixed.rdzv_endpoint == "gpu07:31000"


def test_slurm_context():
    """srun task, batch script, and salloc's shell (SLURM_JOB_ID but no node id: no node of the
    job) as Slurm 22.05 sets their variables."""
    assert slurm_context({}) is None
    salloc = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2"}
    assert slurm_context(salloc) == "shell" and not in_slurm_allocation(salloc)
    batch = {**salloc, "SLURM_NODEID": "0", "SLURM_PROCID": "0"}
    assert slurm_context(batch) == "batch" and in_slurm_allocation(batch)
    step = {**batch, "SLURM_STEP_ID": "0"}
    assert slurm_context(step) == "step" and in_slurm_allocation(step)


def test_srun_on_part_of_the_allocation_uses_the_step_nodes():
    env = {
        **SLURM_ENV,
        "SLURM_STEP_ID": "3",
        "SLURM_STEP_NODELIST": "gpu08",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_STEP_NUM_TASKS": "1",
    }
    plan = plan_from_slurm_env(tiny(tp=4, dp=1, nnodes=1), env)
    assert (plan.nnodes, plan.nproc_per_node, plan.master_addr) == (1, 4, "gpu08")


def test_srun_with_several_tasks_per_node_is_refused():
    env = {**SLURM_ENV, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16"}
    with pytest.raises(LaunchError, match="srun --ntasks-per-node=1"):
        plan_from_slurm_env(tiny(tp=4, dp=2, nnodes=2), env)


@pytest.mark.parametrize(
    "value", ["30", "30:00", "24:00:00", "2-00", "2-12:30", "1-00:00:00", "UNLIMITED"]
)
def test_slurm_time_formats(value):
    check_slurm_time(value)


@pytest.mark.parametrize("value", ["25h", "1:2:3:4", "1d", "", "-1", "12:00:00 "])
def test_slurm_time_rejects(value):
    if value == "12:00:00 ":
        check_slurm_time(value)  # surrounding blanks are harmless
        return
    with pytest.raises(ConfigError, match="not a Slurm time"):
        check_slurm_time(value)


def test_partitions_from_sinfo(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lines = [
        "n1|cpu*|2|(null)",
        "n2|cpu*|4|(null)",
        "g1|gpu|64|gpu:a100:4(S:0-1)",
        "g2|gpu|64|gpu:a100:8,tmpdisk:100",
        "n1|debug|2|(null)",
    ]
    _stub(bin_dir, "sinfo", "printf '%s\\n' " + " ".join(f"'{line}'" for line in lines) + "\n")
    parts = slurm_partitions({"PATH": str(bin_dir)})
    assert parts["cpu"] == PartitionInfo(
        name="cpu", nodes=2, cpus_per_node=2, gpus_per_node=0, default=True
    )
    assert parts["gpu"] == PartitionInfo(name="gpu", nodes=2, cpus_per_node=64, gpus_per_node=4)
    assert parts["debug"].nodes == 1
    assert check_partition(parts, None, 2).name == "cpu"  # the default partition
    with pytest.raises(ConfigError, match="no such Slurm partition .*cpu, debug, gpu"):
        check_partition(parts, "gpus", 1)
    with pytest.raises(ConfigError, match="partition debug has only 1 node"):
        check_partition(parts, "debug", 2)
    assert slurm_partitions({"PATH": str(tmp_path)}) is None  # no sinfo: nothing to check


def test_slurm_env_node_count_must_match_config():
    with pytest.raises(ConfigError, match="set parallel.nnodes=2"):
        plan_from_slurm_env(tiny(tp=4, dp=2, nnodes=1), SLURM_ENV)


def test_slurm_env_too_few_gpus():
    env = {**SLURM_ENV, "SLURM_GPUS_ON_NODE": "2"}
    with pytest.raises(ConfigError, match="only 2 GPUs"):
        plan_from_slurm_env(tiny(tp=4, dp=2, nnodes=2), env)


def test_slurm_env_outside_allocation():
    with pytest.raises(LaunchError, match="not inside a Slurm allocation"):
        plan_from_slurm_env(tiny(), {})


def test_slurm_env_node_count_from_hostlist():
    env = {"SLURM_JOB_ID": "1", "SLURM_NODELIST": "n[1-4]", "SLURM_NODEID": "3"}
    plan = plan_from_slurm_env(tiny(tp=2, dp=2, nnodes=4), env)
    assert (plan.nnodes, plan.nproc_per_node, plan.node_rank, plan.master_addr) == (4, 1, 3, "n1")


# ---------------------------------------------------------------------------------------------
# sbatch
# ---------------------------------------------------------------------------------------------


def test_render_sbatch_matches_expected_two_nodes():
    cfg = load_config(
        REPO / "gkd_cli" / "configs" / "llama_100b_to_7b.yaml",
        ["parallel.dp=2", "parallel.nnodes=2", "output.dir=/shared/runs/llama"],
        check_paths=False,
    )
    options = SlurmOptions(
        nodes=2,
        gpus_per_node=8,
        time="48:00:00",
        partition="gpu",
        account="proj42",
        job_name="gkd-llama",
        extra_sbatch=["--exclusive"],
        setup=["source /opt/venv/bin/activate"],
        cpus_per_task=64,
        python="/opt/venv/bin/python",
        workdir="/shared/work",
    )
    script = render_sbatch(cfg, options, "/shared/runs/llama/config.yaml")
    assert script == (EXPECTED / "llama_2nodes.sbatch").read_text()


def test_render_sbatch_matches_expected_minimal_with_quoting():
    cfg = tiny(out="/scratch/demo run")
    # a CPU partition: no GPU request at all (not --gpus-per-node=0, which some Slurms reject)
    script = render_sbatch(
        cfg,
        SlurmOptions(nodes=1, gpus_per_node=0, procs_per_node=2),
        "/scratch/demo run/config.yaml",
    )
    assert script == (EXPECTED / "demo_1node_minimal.sbatch").read_text()
    assert "--gpus" not in script


def test_render_sbatch_rejects_wrong_gpu_count():
    with pytest.raises(ConfigError, match="use --gpus-per-node 4"):
        render_sbatch(tiny(tp=4, dp=2, nnodes=2), SlurmOptions(nodes=2, gpus_per_node=8), "c.yaml")


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _batch_env(tmp_path: Path, srun_body: str, finished_exit: int) -> tuple[dict, Path]:
    """Stub srun, scontrol and the Python the script calls (``-m gkd_cli.launch finished``
    exits ``finished_exit``); every call is appended to ``calls.txt``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    _stub(bin_dir, "srun", 'echo "srun $*" >> "$CALLS"\n' + srun_body)
    _stub(bin_dir, "scontrol", 'echo "scontrol $*" >> "$CALLS"\n')
    _stub(bin_dir, "fakepy", f'echo "python $*" >> "$CALLS"\nexit {finished_exit}\n')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "777",
        "SLURM_CPUS_PER_TASK": "6",
        "CALLS": str(calls),
    }
    return env, calls


def _script(tmp_path: Path, **options) -> tuple[Path, Path]:
    out = tmp_path / "run"
    cfg = tiny(tp=4, dp=2, nnodes=2, out=str(out))
    script = tmp_path / "job.sbatch"
    opts = SlurmOptions(
        nodes=2, gpus_per_node=4, cpus_per_task=6, python=str(tmp_path / "bin" / "fakepy")
    )
    for key, value in options.items():
        setattr(opts, key, value)
    script.write_text(render_sbatch(cfg, opts, out / "config.yaml"))
    return script, out


def test_rendered_script_runs_one_gkd_per_node_with_this_python(tmp_path):
    """The script run by bash with stub srun: one ``gkd distill`` task per node with the CPUs of
    the allocation, started by the given interpreter (absolute path), logs/ created; a run that
    finished is not requeued."""
    env, calls = _batch_env(tmp_path, "exit 0\n", finished_exit=0)
    script, out = _script(tmp_path)
    proc = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    py = str(tmp_path / "bin" / "fakepy")
    assert lines[0] == (
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=6 {py} -m gkd_cli.app "
        f"distill {out / 'config.yaml'}"
    )
    assert lines[1] == f"python -m gkd_cli.launch finished {out}"
    assert len(lines) == 2  # no scontrol requeue
    assert "gkd: finished" in proc.stdout
    assert (out / "logs").is_dir()


def test_rendered_script_forwards_usr1_to_srun_and_requeues_after_the_save(tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@T and scancel -b send) reaches srun; srun
    (here: a stub that saves and exits 0 on USR1) ends cleanly, the run is not finished, so the
    script requeues its own job and exits 0."""
    srun = 'trap \'echo "srun got USR1" >> "$CALLS"; exit 0\' USR1\necho started > "$CALLS.ready"\n'
    srun += "for i in $(seq 600); do sleep 0.05; done\nexit 9\n"
    env, calls = _batch_env(tmp_path, srun, finished_exit=1)
    script, out = _script(tmp_path)
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    ready = Path(f"{calls}.ready")
    for _ in range(200):
        if ready.exists():
            break
        import time

        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout
    lines = calls.read_text().splitlines()
    assert lines[1:] == [
        "srun got USR1",
        f"python -m gkd_cli.launch finished {out}",
        "scontrol requeue 777",
    ]
    assert "got SIGUSR1" in stdout and "requeueing job 777" in stdout


@pytest.mark.parametrize("finished_exit, srun_exit, expect", [(1, 3, 3), (3, 0, 3)])
def test_rendered_script_does_not_requeue_failures(tmp_path, finished_exit, srun_exit, expect):
    """A failed srun, or a run whose state cannot be read, ends the job with that exit status
    (FAILED), never requeued in a loop."""
    env, calls = _batch_env(tmp_path, f"exit {srun_exit}\n", finished_exit=finished_exit)
    script, _ = _script(tmp_path)
    proc = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == expect
    assert "scontrol" not in calls.read_text()


def test_rendered_script_without_requeue_or_signal(tmp_path):
    script, _ = _script(tmp_path, requeue=False, signal_seconds=None)
    text = script.read_text()
    assert "#SBATCH --no-requeue" in text and "#SBATCH --signal" not in text
    assert "scontrol requeue" not in text


def test_submit_parses_job_id(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", '[ "$1" = "--parsable" ] && echo "31337;cluster-a"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert submit(tmp_path / "job.sbatch") == "31337"


def test_submit_reports_sbatch_failure(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", 'echo "sbatch: error: invalid partition" >&2; exit 1\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(LaunchError, match="invalid partition"):
        submit(tmp_path / "job.sbatch")


def test_submit_without_sbatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match="sbatch not found"):
        submit(tmp_path / "job.sbatch")
