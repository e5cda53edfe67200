"""``gkd cache-teacher --slurm`` (issue 17): the batch script gkd distill writes, running the
cache command on every node; the node command it holds, run in a Slurm job step, launches the
cache writers at the config's layout; the script's requeue check knows a teacher cache."""

from __future__ import annotations

import json
import shlex
import sys

import pytest
from typer.testing import CliRunner

from gkd_cli import launch
from gkd_cli.app import app
from gkd_cli.config import load_config
from tests.unit.test_cli_app import clean_env  # noqa: F401 (fixture: no host Slurm, no SLURM_*)
from tests.unit.test_config_load import base_config, write_yaml

pytestmark = pytest.mark.unit
runner = CliRunner()


@pytest.fixture
def launched(monkeypatch):
    plans: list = []
    monkeypatch.setattr(launch, "run_local", lambda plan: plans.append(plan))
    return plans


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def srun_command(script: str) -> list[str]:
    """The command line srun starts on every node (the script's ``srun ... \\`` continuation)."""
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    return shlex.split(lines[start + 1].rstrip("&").strip())


def test_slurm_writes_the_batch_script_and_each_node_runs_the_cache_writers(
    tmp_path, launched, monkeypatch
):
    config = write_yaml(tmp_path, base_config(tmp_path))
    root = tmp_path / "cache"
    result = run(
        "cache-teacher", config, "parallel.dp=2", "--out", root, "--kind", "sampled",
        "--samples", "12", "--temperature", "2", "--slurm", "--nodes", "2",
        "--partition", "gpu", "--time", "01:00:00", "--sbatch=--exclusive",
        "--setup", "module load cuda", "--no-requeue",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert launched == []  # nothing runs here
    script_path = root / ".gkd" / "gkd.sbatch"
    script = script_path.read_text()
    config_path = root / ".gkd" / "config.yaml"
    # the #SBATCH lines of gkd distill --slurm: 2 nodes x (tp 2 x dp 2 / 2) GPUs
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=01:00:00",
        "#SBATCH --job-name=gkd-cache",
        f"#SBATCH --output={root / '.gkd' / 'logs' / 'slurm-%j.out'}",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --no-requeue",
        "#SBATCH --exclusive",
        "module load cuda",
    ):
        assert f"\n{line}\n" in script, line
    assert script.startswith("#!/bin/bash\n# gkd cache-teacher: tp=2 pp=1 dp=2 on 2 node(s)")
    assert (root / ".gkd" / "logs").is_dir()  # sbatch opens --output there
    # before requeueing, the script asks whether the cache (not a run dir) is finished
    assert f"{sys.executable} -m gkd_cli.launch finished {root} || finished=$?" in script
    command = srun_command(script)
    assert command[:3] == [sys.executable, "-m", "gkd_cli.app"]
    assert command[3:] == [
        "cache-teacher", str(config_path), "--out", str(root), "--kind", "sampled",
        "--k", "64", "--samples", "12", "--temperature", "2.0", "--quantization", "u16log",
    ]  # fmt: skip
    cfg = load_config(config_path)
    assert (cfg.parallel.nnodes, cfg.parallel.dp, cfg.teacher.cache) == (2, 2, None)
    settings = json.loads((root / ".gkd" / "cache_teacher.json").read_text())
    assert settings["spec"]["kind"] == "sampled" and settings["spec"]["samples"] == 12
    assert settings["spec"]["temperature"] == 2.0
    assert f"submit with: sbatch {script_path}" in result.stdout

    # Node 1 of the job runs that command in its srun task: the cache writers' plan.
    for key, value in {
        "SLURM_JOB_ID": "77",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
    }.items():
        monkeypatch.setenv(key, value)
    node = run(*command[3:])
    assert node.exit_code == 0, node.output
    (plan,) = launched
    assert plan.entry_module == "gkd_cli.cache_teacher"
    assert plan.args == ["--config", str(config_path)]
    assert (plan.nnodes, plan.node_rank, plan.nproc_per_node, plan.rdzv_id) == (2, 1, 2, "77")
    assert plan.rdzv_endpoint == f"gpu07:{launch.slurm_rdzv_port('77', '0')}"


def test_requeue_check_knows_a_teacher_cache(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "header.json").write_text(json.dumps({"format": "gkd-teacher-cache"}))
    assert launch._main(["finished", str(root)]) == 1  # written in part: requeue, it resumes
    (root / "meta.json").write_text("{}")
    assert launch._main(["finished", str(root)]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--submit"], "--submit needs --slurm"),
        (["--nodes", "2"], "--nodes needs --slurm"),
        (["--slurm", "--time", "soon"], "--time"),
        (["--slurm", "--gpus-per-node", "3"], "--gpus-per-node 3"),
    ],
)
def test_bad_slurm_options_are_refused_before_anything_is_written(tmp_path, args, message):
    config = write_yaml(tmp_path, base_config(tmp_path))
    root = tmp_path / "cache"
    result = run("cache-teacher", config, "--out", root, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert not root.exists()
