"""gkd on a real Slurm (two slurmd on localhost, ``.ci/slurm/start.sh``): ``gkd distill --slurm
--submit`` on 2 nodes, preempted with the signal its sbatch declares (``scancel -b
--signal=USR1``), requeued by its own script and resumed; ``srun gkd distill`` inside an
``salloc`` allocation into a fresh output dir (node 0 prepares it, node 1 waits); a plain
``salloc`` shell refused; bad options refused against the real ``sinfo``; ``gkd cache-teacher
--slurm --submit`` on 2 nodes writing the same shards as a local run.

The reference is an uninterrupted local run (``gkd distill`` on one node, 2 workers): every step's
loss and loss terms of the Slurm runs must equal it, each step logged once.

One module-scoped fixture starts everything (the local reference runs while the job does) so the
tier takes a few minutes on 2 cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "gkd_cli" / "assets"
STEPS = 40
PREEMPT_AFTER = 3  # steps logged before the preemption signal (it must land before the end)
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=512, max_seq_len=64)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _gkd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=timeout,
    )


def _write_config(root: Path, name: str, tokenizer: Path, nnodes: int = 1) -> Path:
    cfg = {
        "teacher": {**MODEL, "init": "random"},
        "student": MODEL,
        "methods": [{"name": "glmd", "temperature": 2.0}, {"name": "lm", "weight": 0.1}],
        "parallel": {"tp": 1, "pp": 1, "dp": 2, "nnodes": nnodes},
        "data": {
            "train_files": [str(ASSETS / "demo_corpus.txt")],
            "tokenizer": str(tokenizer),
            "seq_length": 64,
        },
        "train": {
            "steps": STEPS,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "log_every": 1,
        },
        "output": {"dir": str(root / name), "save_every": 0},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _job(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


class Runs:
    """What the module's fixture ran and saw."""

    root: Path
    reference: Path
    job_dir: Path
    job_id: str
    submit_output: str
    states: list[str]
    final: dict[str, str]
    srun_dir: Path
    srun: subprocess.CompletedProcess
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    from gkd_cli.data import train_bpe

    r = Runs()
    r.seconds = {}
    # Under /tmp (not pytest's tmp dir): the job's slurmd must reach it, and it is short.
    r.root = tmp_path_factory.mktemp("slurm")
    tokenizer = r.root / "tokenizer.json"
    train_bpe([ASSETS / "demo_corpus.txt"], 512, tokenizer)

    # The independent reference: one node, two local workers, never interrupted.
    r.reference = r.root / "reference"
    started = time.monotonic()
    reference = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gkd_cli.app",
            "distill",
            str(_write_config(r.root, "reference", tokenizer)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=REPO,
    )

    # 2-node job, submitted the way a user does it, into a fresh output dir.
    r.job_dir = r.root / "job"
    submitted = _gkd(
        "distill",
        str(_write_config(r.root, "job", tokenizer)),
        "--slurm",
        "--submit",
        "--nodes",
        "2",
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    r.submit_output = submitted.stdout
    r.job_id = re.search(r"submitted Slurm job (\d+)", submitted.stdout).group(1)

    # Preempt it the way the sbatch declares (--signal=B:USR1@...): USR1 to the batch shell.
    r.states = []
    deadline = time.monotonic() + 420
    signalled = False
    while time.monotonic() < deadline:
        info = _job(r.job_id)
        state = f"{info.get('JobState')}/restarts={info.get('Restarts')}"
        if not r.states or r.states[-1] != state:
            r.states.append(state)
        if not signalled and len(_records(r.job_dir)) >= PREEMPT_AFTER:
            subprocess.run(["scancel", "-b", "--signal=USR1", r.job_id], check=True)
            signalled = True
            r.seconds["preempted_after"] = time.monotonic() - started
        if info.get("JobState") in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        ):
            break
        time.sleep(0.3)
    r.final = _job(r.job_id)
    r.seconds["job"] = time.monotonic() - started

    # srun inside an allocation, 2 nodes, fresh output dir (node 1 must not race node 0).
    r.srun_dir = r.root / "srun"
    srun_config = _write_config(r.root, "srun", tokenizer, nnodes=2)
    begun = time.monotonic()
    r.srun = subprocess.run(
        [
            "salloc",
            "-N2",
            "--ntasks-per-node=1",
            "srun",
            "--ntasks-per-node=1",
            sys.executable,
            "-m",
            "gkd_cli.app",
            "distill",
            str(srun_config),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=420,
    )
    r.seconds["srun"] = time.monotonic() - begun

    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    r.seconds["total"] = time.monotonic() - started
    print(f"slurm tier timings: {r.seconds}; job states: {r.states}")
    return r


def _assert_same_losses(run: Path, reference: Path) -> float:
    """Every step 1..STEPS logged once, loss and each term equal to the reference's; returns the
    largest difference."""
    got, want = _records(run), _records(reference)
    assert [rec["step"] for rec in want] == list(range(1, STEPS + 1))
    assert [rec["step"] for rec in got] == list(range(1, STEPS + 1)), "each step logged once"
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        assert set(a["terms"]) == set(b["terms"])
        pairs = [(a["loss"], b["loss"])] + [(a["terms"][k], b["terms"][k]) for k in b["terms"]]
        for x, y in pairs:
            worst = max(worst, abs(x - y))
            assert x == pytest.approx(y, rel=1e-6, abs=1e-7), f"step {a['step']}: {x} != {y}"
    return worst


def test_submitted_job_preempted_requeues_itself_and_matches_uninterrupted_run(runs):
    states = [s.split("/")[0] for s in runs.states]
    assert "RUNNING" in states
    assert runs.final.get("JobState") == "COMPLETED", (runs.states, runs.final)
    assert runs.final.get("Restarts") == "1", runs.states  # requeued exactly once, by its script
    assert runs.final.get("ExitCode") == "0:0"
    # after the requeue the same job ran again (PENDING in between, then RUNNING)
    assert any(
        s.startswith("PENDING/restarts=1") or s.startswith("RUNNING/restarts=1")
        for s in runs.states
    )

    log = (runs.job_dir / "logs" / f"slurm-{runs.job_id}.out").read_text()
    # --open-mode=append: both attempts in one output file
    assert f"gkd: job {runs.job_id} attempt 0" in log and f"gkd: job {runs.job_id} attempt 1" in log
    assert "got SIGUSR1" in log and f"requeueing job {runs.job_id}" in log
    assert "gkd: finished" in log
    assert re.search(rf"^step 1/{STEPS} .*loss \d.*tok/s", log, re.M)
    assert re.search(rf"^step {STEPS}/{STEPS} ", log, re.M)

    worst = _assert_same_losses(runs.job_dir, runs.reference)
    print(
        f"preempted 2-node job vs uninterrupted local run: max |diff| {worst:.3g} over {STEPS} steps"
    )
    assert f"squeue -j {runs.job_id}" in runs.submit_output
    assert f"tail -f {runs.job_dir / 'logs' / f'slurm-{runs.job_id}.out'}" in runs.submit_output


def test_srun_in_allocation_two_nodes_fresh_dir(runs):
    assert runs.srun.returncode == 0, runs.srun.stdout[-3000:] + runs.srun.stderr[-3000:]
    assert "launching 1 worker(s) on node 1 of 2" in runs.srun.stdout
    worst = _assert_same_losses(runs.srun_dir, runs.reference)
    print(f"srun 2-node run vs local run: max |diff| {worst:.3g}")


def test_plain_salloc_shell_is_refused(runs, tmp_path):
    config = yaml.safe_load((runs.root / "srun.yaml").read_text())
    config["output"]["dir"] = str(tmp_path / "never")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        ["salloc", "-N2", sys.executable, "-m", "gkd_cli.app", "distill", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode != 0
    assert "srun --ntasks-per-node=1 gkd distill" in result.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--partition", "gpu-nope"], "no such Slurm partition (sinfo lists: cpu)"),
        (
            ["--nodes", "3", "parallel.dp=3", "train.global_batch_size=6"],
            "partition cpu has only 2 node(s)",
        ),
        (["--time", "25h"], "is not a Slurm time"),
    ],
)
def test_bad_slurm_options_refused_against_real_sinfo(runs, tmp_path, args, message):
    from typer.testing import CliRunner

    from gkd_cli.app import app

    config = yaml.safe_load((runs.root / "job.yaml").read_text())
    config["output"]["dir"] = str(tmp_path / "never")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["distill", str(path), "--slurm", "--submit", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "never").exists()


def test_cache_teacher_submitted_on_two_nodes_equals_a_local_cache(tmp_path):
    """``gkd cache-teacher --slurm --submit --nodes 2`` (the batch script distill writes, one
    worker per node) writes the same shards, byte for byte, as a local run with two workers: each
    data-parallel rank's records of the same global samples, so the sha256 in both meta.json
    files agree."""
    from gkd_cli.data import train_bpe

    tokenizer = tmp_path / "tokenizer.json"
    train_bpe([ASSETS / "demo_corpus.txt"], 512, tokenizer)
    cfg = yaml.safe_load(_write_config(tmp_path, "cache-src", tokenizer).read_text())
    corpus = tmp_path / "corpus.txt"  # the cache covers the data once: a small part of the corpus
    corpus.write_text((ASSETS / "demo_corpus.txt").read_text()[:40_000])
    cfg["data"]["train_files"] = [str(corpus)]
    cfg["output"]["dir"] = str(tmp_path / "unused")
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(cfg))
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ("--kind", "topk", "--k", "8")
    done = _gkd("cache-teacher", str(path), "--out", str(local), *common)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    submitted = _gkd("cache-teacher", str(path), "--out", str(remote), *common, "--slurm", "--submit", "--nodes", "2")  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"submitted Slurm job (\d+)", submitted.stdout).group(1)
    deadline, info = time.monotonic() + 300, {}
    while time.monotonic() < deadline:
        info = _job(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(0.5)
    logs = "\n".join(p.read_text() for p in remote.rglob("slurm-*.out"))
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        info,
        logs[-3000:],
    )
    ours, theirs = (json.loads((d / "meta.json").read_text()) for d in (remote, local))
    assert ours["key"] == theirs["key"] and ours["dp_size"] == theirs["dp_size"] == 2
    assert ours["samples"] == theirs["samples"] > 100
    assert ours["shards"] == theirs["shards"]  # records, sizes and sha256 of every rank's shard
