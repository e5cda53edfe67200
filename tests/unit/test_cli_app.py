"""The ``gkd`` Typer app through CliRunner, with the launcher patched: the launch plan it builds,
the files it writes, errors as one red line with the right exit code, Slurm scripts, methods,
env, config help."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gkd_cli import launch
from gkd_cli.app import app
from gkd_cli.config import load_config
from gkd_cli.errors import WorkerFailedError
from tests.unit.test_config_load import base_config, install_fake_registry, write_yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in (
            "WORLD_SIZE",
            "NODE_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            monkeypatch.delenv(key, raising=False)
    # The host's Slurm (if any) must not answer: sinfo/scontrol stubs that fail, like no cluster.
    stubs = tmp_path / "no-slurm"
    stubs.mkdir()
    for name in ("sinfo", "scontrol"):
        _exe(stubs / name, "#!/bin/bash\nexit 1\n")
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    install_fake_registry(monkeypatch)


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def cpu_cluster(tmp_path, monkeypatch):
    """sinfo of a cluster with a default CPU partition (2 nodes x 8 CPUs) and a GPU partition."""
    bin_dir = tmp_path / "cluster-bin"
    bin_dir.mkdir()
    lines = ["c1|cpu*|8|(null)", "c2|cpu*|8|(null)", "g1|gpu|32|gpu:4"]
    _exe(
        bin_dir / "sinfo",
        "#!/bin/bash\nprintf '%s\\n' " + " ".join(f"'{line}'" for line in lines) + "\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.fixture
def launched(monkeypatch):
    """Patch ``run_local``: record the plan and write two metrics lines as rank 0 would."""
    plans = []

    def fake_run_local(plan):
        plans.append(plan)
        out = Path(plan.args[-1]).parent  # --config <output.dir>/config.yaml
        with open(out / "metrics.jsonl", "a") as handle:
            for step in (1, 2):
                record = {"step": step, "loss": 3.0 - step, "terms": {"glmd.kl": 3.0 - step}}
                handle.write(json.dumps(record) + "\n")

    monkeypatch.setattr(launch, "run_local", fake_run_local)
    return plans


def run(*args):
    # Rich wraps tables at the terminal width: make it wide so table cells stay on one line.
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("distill", "plan", "methods", "env", "config-help"):
        assert command in result.output


def test_distill_launches_with_the_plan_and_writes_config(tmp_path, launched):
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config, "parallel.dp=2", "train.lr=1e-4")
    assert result.exit_code == 0, result.output
    (plan,) = launched
    out = tmp_path / "run"
    assert plan.nnodes == 1 and plan.nproc_per_node == 4  # tp 2 x pp 1 x dp 2
    assert plan.entry_module == "gkd_cli.worker"
    assert plan.args == ["--config", str(out / "config.yaml")]
    assert plan.log_dir == str(out / "logs" / "attempt_1")  # a fresh folder per launch
    saved = load_config(out / "config.yaml")
    assert saved.parallel.dp == 2 and saved.train.lr == pytest.approx(1e-4)
    assert saved == load_config(config, ["parallel.dp=2", "train.lr=1e-4"])
    # not a terminal: plain progress lines from metrics.jsonl
    assert "step 2/2 (100%) | loss 1.0000 | glmd.kl 1.0000" in result.stdout


def test_config_error_is_one_red_line_exit_2(tmp_path, launched):
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config, "train.lr=fast")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: train.lr: expected a number, got 'fast' (str)"
    assert "Traceback" not in result.output
    assert launched == []


def test_plan_error_is_exit_2(tmp_path):
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("plan", config, "parallel.tp=3")
    assert result.exit_code == 2
    assert "teacher.num_attention_heads=4 is not divisible by parallel.tp=3" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dry_run_prints_everything_and_writes_nothing(tmp_path, launched):
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config, "--dry-run")
    assert result.exit_code == 0, result.output
    assert launched == []
    assert not (tmp_path / "run").exists()
    out = result.stdout
    assert "Resolved gkd config" in out and "num_layers: 4" in out  # the config
    assert "Launch plan" in out and "gkd_cli.worker" in out  # the launch plan
    assert "teacher weights" in out and "optimizer states" in out  # the memory plan


def test_existing_run_needs_resume_or_overwrite(tmp_path, launched):
    config = write_yaml(tmp_path, base_config(tmp_path))
    assert run("distill", config).exit_code == 0
    marker = tmp_path / "run" / "iter_0000002"
    marker.mkdir()
    # The same config again (a rerun after a preemption): resumes, training longer is allowed.
    result = run("distill", config, "train.steps=500")
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "run" / "config.yaml").output.resume is True
    # Another run's directory: refused.
    result = run("distill", config, "train.lr=5e-4")
    assert result.exit_code == 2 and "--resume" in result.stderr and "--overwrite" in result.stderr

    result = run("distill", config, "--resume")
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "run" / "config.yaml").output.resume is True
    assert marker.exists()

    result = run("distill", config, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert load_config(tmp_path / "run" / "config.yaml").output.resume is False
    assert len(launched) == 4


def test_resume_refuses_a_different_architecture(tmp_path, launched):
    config = write_yaml(tmp_path, base_config(tmp_path))
    assert run("distill", config).exit_code == 0
    result = run("distill", config, "student.hidden_size=48", "--resume")
    assert result.exit_code == 2 and "student architecture differs" in result.stderr


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, launched):
    data = base_config(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    data["output"]["dir"] = str(precious)
    result = run("distill", write_yaml(tmp_path, data), "--overwrite")
    assert result.exit_code == 2 and "does not look like a gkd run" in result.stderr
    assert (precious / "thesis.tex").exists()


def test_worker_failure_names_rank_and_log(tmp_path, monkeypatch):
    def failing(plan):
        raise WorkerFailedError(
            rank=3,
            exitcode=1,
            message="RuntimeError: out of memory",
            traceback="Traceback (most recent call last):\n  ...\nRuntimeError: out of memory",
            log_path=f"{plan.log_dir}/rank3.stderr.log",
        )

    monkeypatch.setattr(launch, "run_local", failing)
    result = run("distill", write_yaml(tmp_path, base_config(tmp_path)))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "error: rank 3 failed (exit code 1): RuntimeError: out of memory"
    assert (
        f"log of rank 3: {tmp_path / 'run' / 'logs' / 'attempt_1' / 'rank3.stderr.log'}"
        in result.stderr
    )


def test_inside_slurm_allocation_uses_slurm_plan(tmp_path, launched, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # a task of srun
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[3-4]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config, "parallel.dp=2", "parallel.nnodes=2")
    assert result.exit_code == 0, result.output
    (plan,) = launched
    assert (plan.nnodes, plan.nproc_per_node, plan.rdzv_endpoint, plan.rdzv_id) == (
        2,
        2,
        f"node3:{launch.slurm_rdzv_port('99', '0')}",
        "99",
    )


# ---------------------------------------------------------------------------------------------
# Slurm submission
# ---------------------------------------------------------------------------------------------


def test_slurm_writes_script_and_config(tmp_path, launched):
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run(
        "distill",
        config,
        "parallel.dp=4",
        "train.global_batch_size=8",
        "--slurm",
        "--nodes",
        "2",
        "--partition",
        "gpu",
        "--time",
        "01:00:00",
        "--sbatch=--exclusive",
        "--setup",
        "module load cuda",
    )
    assert result.exit_code == 0, result.output
    assert launched == []
    out = tmp_path / "run"
    script = (out / "gkd.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=01:00:00" in script
    assert "#SBATCH --exclusive\n" in script and "\nmodule load cuda\n" in script
    assert f"{sys.executable} -m gkd_cli.app distill {out / 'config.yaml'}" in script
    assert (out / "logs").is_dir()  # sbatch opens --output there before the script runs
    assert load_config(out / "config.yaml").parallel.nnodes == 2
    assert f"sbatch {out / 'gkd.sbatch'}" in result.stdout


def test_slurm_submit_prints_job_id(tmp_path, launched, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text('#!/bin/bash\necho "12345"\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config, "--slurm", "--submit")
    assert result.exit_code == 0, result.output
    assert "submitted Slurm job 12345" in result.stdout
    assert "squeue -j 12345" in result.stdout
    assert f"tail -f {tmp_path / 'run' / 'logs' / 'slurm-12345.out'}" in result.stdout


def test_slurm_cpu_partition_gets_no_gpu_request_and_the_node_cpus(tmp_path, cpu_cluster):
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config, "--slurm")
    assert result.exit_code == 0, result.output
    script = (tmp_path / "run" / "gkd.sbatch").read_text()
    assert "--gpus" not in script  # a CPU partition rejects any GPU request
    assert "#SBATCH --cpus-per-task=8\n" in script  # the nodes' CPUs, not one core for all workers
    assert "CPU only" in script
    # the same on the GPU partition: one GPU per worker, its CPUs
    result = run("distill", config, "--slurm", "--partition", "gpu", "--overwrite")
    assert result.exit_code == 0, result.output
    script = (tmp_path / "run" / "gkd.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=2\n" in script and "#SBATCH --cpus-per-task=32\n" in script


def test_slurm_gpus_per_node_zero_is_kept(tmp_path):
    """Explicit --gpus-per-node 0 (CPU workers): no GPU line, never replaced by the world size."""
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run(
        "distill",
        config,
        "--slurm",
        "--gpus-per-node",
        "0",
        "--cpus-per-task",
        "3",
        "--python",
        "/opt/py/bin/python3",
        "--signal-seconds",
        "120",
    )
    assert result.exit_code == 0, result.output
    script = (tmp_path / "run" / "gkd.sbatch").read_text()
    assert "--gpus" not in script and "#SBATCH --cpus-per-task=3\n" in script
    assert "/opt/py/bin/python3 -m gkd_cli.app distill" in script
    assert "#SBATCH --signal=B:USR1@120\n" in script and "#SBATCH --requeue\n" in script


@pytest.mark.parametrize(
    "args, message",
    [
        (["--time", "12h"], "--time '12h' is not a Slurm time"),
        (["--partition", "gpux"], "no such Slurm partition (sinfo lists: cpu, gpu)"),
        (
            ["--nodes", "3", "parallel.dp=3", "parallel.tp=1", "train.global_batch_size=6"],
            "partition cpu has only 2 node(s)",
        ),
        (["--partition", "cpu", "--gpus-per-node", "2"], "partition cpu have 0 GPU(s)"),
    ],
)
def test_slurm_bad_options_refused_before_anything_is_written(tmp_path, cpu_cluster, args, message):
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config, "--slurm", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "run").exists()


def test_slurm_submit_without_sbatch_writes_nothing(tmp_path, monkeypatch):
    config = write_yaml(tmp_path, base_config(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))
    result = run("distill", config, "--slurm", "--submit")
    assert result.exit_code == 1 and "sbatch not found" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_only_logs_is_a_fresh_run(tmp_path, launched):
    """What sbatch leaves before gkd starts (logs/slurm-<id>.out) is not "another run"."""
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "slurm-7.out").write_text("gkd: job 7 attempt 0\n")
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config)
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "run" / "config.yaml").output.resume is False
    # files without a config.yaml: not a gkd run, said as such
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    data = base_config(tmp_path)
    data["output"]["dir"] = str(other)
    result = run("distill", write_yaml(tmp_path, data, "other.yaml"))
    assert result.exit_code == 2 and "holds files but no gkd run (no config.yaml" in result.stderr


def test_salloc_shell_is_refused_or_warned(tmp_path, launched, monkeypatch):
    """salloc's shell has SLURM_JOB_ID but no node id or step: it runs on the login node."""
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("SLURM_NNODES", "2")
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config)
    assert result.exit_code == 1 and "srun --ntasks-per-node=1 gkd distill" in result.stderr
    assert launched == [] and not (tmp_path / "run").exists()
    monkeypatch.setenv("SLURM_NNODES", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1")
    result = run("distill", config)
    assert result.exit_code == 0, result.output
    assert "warning: inside Slurm allocation 55 but not in a job step" in " ".join(
        result.stderr.split()
    )
    assert len(launched) == 1


def test_multi_node_batch_script_without_srun_is_refused(tmp_path, launched, monkeypatch):
    for key, value in {
        "SLURM_JOB_ID": "56",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    result = run("distill", write_yaml(tmp_path, base_config(tmp_path)), "parallel.nnodes=2")
    assert result.exit_code == 1 and "first node only" in result.stderr
    assert launched == []


def test_other_nodes_wait_for_node_0_before_touching_the_output_dir(
    tmp_path, launched, monkeypatch
):
    """Node 1 of a fresh 2-node run: nothing written before node 0's marker for this launch
    appears (it used to create logs/ first, and node 0 then refused the directory)."""
    env = {
        "SLURM_JOB_ID": "57",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_RESTART_COUNT": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = write_yaml(tmp_path, base_config(tmp_path))
    out = tmp_path / "run"
    seen = []

    def fake_wait(output_dir, token, timeout_s=900.0, poll_s=0.5):
        seen.append((Path(output_dir), token, out.exists()))

    monkeypatch.setattr(launch, "wait_until_prepared", fake_wait)
    monkeypatch.setattr(launch, "run_local", launched.append)  # node 1 writes no metrics
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert run("distill", config, "parallel.nnodes=2").exit_code == 0
    assert seen == [(out, "57:0:1", False)]  # waited before anything existed
    monkeypatch.setenv("SLURM_NODEID", "0")
    result = run("distill", config, "parallel.nnodes=2")
    assert result.exit_code == 0, result.output
    assert launch.ready_path(out).read_text().strip() == "57:0:1"
    assert len(seen) == 1


def test_wait_until_prepared(tmp_path):
    import threading

    from gkd_cli.errors import LaunchError

    marker = launch.ready_path(tmp_path)
    marker.parent.mkdir()
    marker.write_text("9:0:0\n")  # the previous attempt's
    with pytest.raises(LaunchError, match="node 0 did not prepare"):
        launch.wait_until_prepared(tmp_path, "9:0:1", timeout_s=0.3, poll_s=0.05)
    timer = threading.Timer(0.2, lambda: marker.write_text("9:0:1\n"))
    timer.start()
    launch.wait_until_prepared(tmp_path, "9:0:1", timeout_s=10, poll_s=0.05)
    timer.join()


def test_slurm_gpu_count_must_match(tmp_path):
    config = write_yaml(tmp_path, base_config(tmp_path))
    result = run("distill", config, "--slurm", "--gpus-per-node", "8")
    assert result.exit_code == 2 and "use --gpus-per-node 2 (or 0 for CPU workers)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_submit_needs_slurm(tmp_path):
    result = run("distill", write_yaml(tmp_path, base_config(tmp_path)), "--submit")
    assert result.exit_code == 2 and "--submit needs --slurm" in result.stderr


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------


def test_plan_flags_what_does_not_fit_and_suggests_a_layout():
    config = REPO / "gkd_cli" / "configs" / "llama_100b_to_7b.yaml"
    result = run("plan", config, "parallel.tp=1", "parallel.dp=8", "--gpu-mem", "40GiB")
    assert result.exit_code == 0, result.output
    assert "does not fit" in result.stdout
    assert "parallel.tp=8 parallel.pp=1 parallel.dp=1" in result.stdout


def test_plan_cpu(tmp_path):
    result = run("plan", str(REPO / "gkd_cli" / "configs" / "demo.yaml"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "cpu (fp32)" in result.stdout and "runtime overhead" not in result.stdout


def test_plan_bad_gpu_mem():
    config = REPO / "gkd_cli" / "configs" / "demo.yaml"
    result = run("plan", config, "--gpu-mem", "lots")
    assert result.exit_code == 2 and "--gpu-mem" in result.stderr


# ---------------------------------------------------------------------------------------------
# methods, env, config-help
# ---------------------------------------------------------------------------------------------


def test_methods_list():
    result = run("methods", "list")
    assert result.exit_code == 0, result.output
    assert "glmd" in result.stdout and "Tan et al. 2023 (GLMD)" in result.stdout
    assert "Hinton et al. 2015" in result.stdout and "PT+TS" in result.stdout


def test_methods_show():
    result = run("methods", "show", "glmd")
    assert result.exit_code == 0, result.output
    assert "temperature" in result.stdout and "15.0" in result.stdout
    assert "Softmax temperature T of both models" in result.stdout  # the field's docstring


def test_methods_show_unknown():
    result = run("methods", "show", "glmdd")
    assert result.exit_code == 2 and "did you mean 'glmd'" in result.stderr


def test_env_reports_versions():
    result = run("env")
    assert result.exit_code == 0, result.output
    for name in ("python", "torch", "CUDA", "NCCL", "megatron-core", "Transformer Engine", "apex"):
        assert name in result.stdout
    assert "gloo" in result.stdout or "NCCL" in result.stdout


def test_config_help():
    result = run("config-help", "train")
    assert result.exit_code == 0, result.output
    assert "train.global_batch_size" in result.stdout
    assert "Sequences per optimizer step" in result.stdout
    result = run("config-help")
    assert "teacher.checkpoint" in result.stdout and "output.save_every" in result.stdout
    assert "methods.N.weight" in result.stdout


def test_demo_config_parses_with_overrides(tmp_path):
    data = yaml.safe_load((REPO / "gkd_cli" / "configs" / "demo.yaml").read_text())
    assert data["teacher"]["num_layers"] == 4
