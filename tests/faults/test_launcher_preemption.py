"""Signals and faults done for real to the `gkd distill` launcher (what Slurm sends at preemption,
what a crashed GPU does to a rank), on one run directory that is interrupted three times:

1. SIGTERM to the launcher, 2. SIGUSR1 to the launcher: the launcher forwards the signal, the
   workers finish the step in flight, save it and exit 0, and only then does the launcher exit 0,
   naming the saved step. To pin down "the step in flight" and to prove the launcher waits for the
   save, the workers are frozen (SIGSTOP) while the signal reaches the launcher and for a while
   after (35 s for SIGTERM: longer than torch elastic's 30-second shutdown deadline, as a real
   model's save can take), then thawed.
3. ``kill -9`` of rank 1: the launcher blames rank 1 (the first rank to fail, by time), not rank 0,
   which fails in the aftermath with a traceback; the next attempt gets its own log folder.

Then a last rerun finishes the run. Independent reference: an uninterrupted run of the same config;
every step's loss after the three resumes equals it exactly (same layout, CPU: bit-identical), and
after every launcher exit no process of the run (found by an environment marker in
``/proc/*/environ``) is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.faults._procs import assert_none_left, new_marker

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "gkd_cli" / "assets"
STEPS = 12


def _config(tmp: Path, tokenizer: Path, out: Path) -> Path:
    model = dict(
        num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=512, max_seq_len=32
    )
    cfg = {
        "teacher": {**model, "init": "random"},
        "student": model,
        "methods": [{"name": "glmd"}],
        "parallel": {"tp": 2, "pp": 1, "dp": 1},
        "data": {
            "train_files": [str(ASSETS / "demo_valid.txt")],
            "tokenizer": str(tokenizer),
            "seq_length": 32,
        },
        "train": {"steps": STEPS, "global_batch_size": 2, "micro_batch_size": 1},
        "output": {"dir": str(out), "save_every": 0},
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, marker: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **marker}
    return subprocess.Popen(
        [sys.executable, "-m", "gkd_cli.app", "distill", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _max_step(out: Path) -> int:
    return max((r["step"] for r in _records(out)), default=0)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while _max_step(out) < step:
        assert proc.poll() is None, f"the run ended early:\n{proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, f"step {step} was not logged within {timeout} s"
        time.sleep(0.1)


def _workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """Global rank -> worker process (the launcher's children running gkd_cli.worker)."""
    found = {}
    for child in psutil.Process(proc.pid).children():
        try:
            if "gkd_cli.worker" in " ".join(child.cmdline()):
                found[int(child.environ()["RANK"])] = child
        except (psutil.Error, KeyError):
            continue
    return found


def _latest(out: Path) -> str | None:
    path = out / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else None


def _preempt(
    config: Path,
    out: Path,
    sig: signal.Signals,
    after: int,
    marker: dict[str, str],
    *,
    freeze: float,
) -> dict:
    """Launch, let ``after`` steps pass, freeze the workers, signal the launcher, check it waits
    ``freeze`` seconds, thaw the workers; return what happened."""
    proc = _launch(config, marker)
    try:
        _wait_for_step(proc, out, after)
        workers = _workers(proc)
        assert len(workers) == 2, workers
        for w in workers.values():
            w.send_signal(signal.SIGSTOP)
        logged = _max_step(out)  # stable now: the step after it is the one in flight
        proc.send_signal(sig)
        time.sleep(freeze)
        waited = proc.poll() is None  # the launcher must wait for the workers' save
        for w in workers.values():
            with contextlib.suppress(
                psutil.NoSuchProcess
            ):  # (killed meanwhile: the test fails below)
                w.send_signal(signal.SIGCONT)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_none_left(marker)
    latest = _latest(out)
    return {
        "returncode": proc.returncode,
        "output": output,
        "logged": logged,
        "waited": waited,
        "latest": latest,
        "last_step": _max_step(out),
        "complete": latest is not None
        and (out / "checkpoints" / latest / "manifest.json").is_file(),
        "tmp_left": sorted(p.name for p in (out / "checkpoints").glob(".tmp-*")),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from gkd_cli.data import train_bpe

    tmp = tmp_path_factory.mktemp("preempt")
    tokenizer = tmp / "tokenizer.json"
    train_bpe([ASSETS / "demo_valid.txt"], 512, tokenizer)
    # The independent reference: the same run, never interrupted.
    ref_out = tmp / "reference"
    marker = new_marker()
    proc = _launch(_config(tmp, tokenizer, ref_out), marker)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert_none_left(marker)
    out = tmp / "run"
    config = _config(tmp, tokenizer, out)
    result = {"reference": _records(ref_out), "out": out}
    # A save that takes longer than torch elastic's 30-second shutdown deadline (a real model's)
    # is what used to be cut off by SIGKILL: the workers stay frozen for 35 s after the SIGTERM.
    result["SIGTERM"] = _preempt(config, out, signal.SIGTERM, 2, marker, freeze=35)
    result["SIGUSR1"] = _preempt(
        config, out, signal.SIGUSR1, result["SIGTERM"]["last_step"] + 2, marker, freeze=3
    )
    # kill -9 of rank 1 in the third attempt.
    proc = _launch(config, marker)
    _wait_for_step(proc, out, result["SIGUSR1"]["last_step"] + 1)
    _workers(proc)[1].send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert_none_left(marker)
    result["kill9"] = {"returncode": proc.returncode, "output": output}
    # The last attempt finishes the run.
    proc = _launch(config, marker)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert_none_left(marker)
    result["final"] = _records(out)
    return result


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_to_launcher_saves_the_step_in_flight_and_exits_zero(runs, sig):
    run = runs[sig]
    assert run["returncode"] == 0, run["output"][-3000:]
    assert run["waited"], "the launcher exited before its workers had saved"
    step = run["last_step"]
    assert step < STEPS, "the run finished before the signal; nothing was tested"
    # The step in flight when the signal arrived (or the one just logged, if a worker was frozen
    # between logging it and agreeing to stop) is saved, complete, and `latest` names it.
    assert step in (run["logged"], run["logged"] + 1), (step, run["logged"])
    assert run["latest"] == f"step_{step:07d}"
    assert run["complete"] and not run["tmp_left"], run
    assert f"preempted ({sig}): the workers saved step {step} " in run["output"], run["output"][
        -3000:
    ]
    assert "done:" not in run["output"]


def test_kill9_of_rank1_blames_rank1_and_keeps_each_attempts_logs(runs):
    run = runs["kill9"]
    assert run["returncode"] == 1, run["output"][-3000:]
    text = " ".join(run["output"].split())  # Rich may wrap long lines
    assert "rank 1 failed (exit code -9): killed by signal 9 (SIGKILL)" in text, run["output"][
        -3000:
    ]
    assert "also failed (probably as a consequence): ranks 0" in text
    logs = runs["out"] / "logs"
    attempts = sorted(p.name for p in logs.iterdir() if re.fullmatch(r"attempt_\d+", p.name))
    assert attempts == ["attempt_1", "attempt_2", "attempt_3", "attempt_4"]
    assert os.readlink(logs / "latest") == "attempt_4"
    # The failed attempt's logs survive the rerun: rank 0's traceback from the aftermath is there.
    assert (logs / "attempt_3" / "rank0.stderr.log").read_text().strip()
    assert f"log of rank 1: {logs / 'attempt_3' / 'rank1.stderr.log'}" in text
    # The reruns resumed: the first attempt's log is still that of a fresh start.
    assert "resumed from" not in (logs / "attempt_1" / "rank0.stderr.log").read_text()
    assert "resumed from" in (logs / "attempt_4" / "rank0.stderr.log").read_text()


def test_resumed_losses_equal_the_uninterrupted_run(runs):
    reference = {r["step"]: r["loss"] for r in runs["reference"]}
    assert sorted(reference) == list(range(1, STEPS + 1))
    final = runs["final"]
    # Each step once in metrics.jsonl would be the promise; until resume rewrites the file, the
    # surviving (last) line of each step is what is compared.
    losses = {r["step"]: r["loss"] for r in final}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == reference


def test_blame_goes_to_the_first_failure_by_time(tmp_path):
    """The rule behind the kill -9 test above, on every combination of evidence: a rank's failure time
    is when it raised (the time file its worker writes) or, if it was killed, when the launcher saw
    it exit, less the latency of seeing a death (its peers see the connection drop first); the
    traceback of a later failure does not win."""
    from types import SimpleNamespace

    from gkd_cli.launch import DEATH_SEEN_LATE_S, rank_log_paths, worker_failure

    logs = tmp_path / "logs"
    logs.mkdir()
    paths = {r: rank_log_paths(logs, r) for r in (0, 1, 2)}
    paths[0]["error"].write_text(
        json.dumps(
            {
                "message": {
                    "message": "RuntimeError: Connection reset by peer",
                    "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "1000"},
                }
            }
        )
    )
    paths[0]["failed_at"].write_text("1000.250")
    failures = {
        0: SimpleNamespace(exitcode=1, timestamp=1000, error_file=str(paths[0]["error"])),
        1: SimpleNamespace(exitcode=-9, timestamp=1001, error_file=str(paths[1]["error"])),
    }
    # Rank 1 was kill -9'd; rank 0 raised on the dropped connection 50 ms before the launcher saw
    # rank 1 gone (what happens under load).
    err = worker_failure(failures, str(logs), {0: 1000.9, 1: 1000.3})
    assert (err.rank, err.exitcode, err.other_ranks) == (1, -9, (0,))
    assert err.message == "killed by signal 9 (SIGKILL)"
    # A rank that raised well before another was killed is blamed, whatever its traceback says.
    paths[2]["failed_at"].write_text("1000.100")
    failures[2] = SimpleNamespace(exitcode=1, timestamp=1000, error_file=str(paths[2]["error"]))
    err = worker_failure(failures, str(logs), {0: 1000.9, 1: 1000.2 + DEATH_SEEN_LATE_S, 2: 1000.5})
    assert err.rank == 2
    # SIGTERM is torch elastic's own stop signal: no latency allowance for it.
    failures[1] = SimpleNamespace(exitcode=-15, timestamp=1001, error_file=str(paths[1]["error"]))
    err = worker_failure({0: failures[0], 1: failures[1]}, str(logs), {0: 1000.9, 1: 1000.3})
    assert err.rank == 0 and err.message == "RuntimeError: Connection reset by peer"
    # Without the launcher's exit times (another launcher), elastic's timestamps decide.
    err = worker_failure({0: failures[0], 1: failures[1]}, str(logs))
    assert err.rank == 0  # failed_at 1000.25 < elastic's 1001 for rank 1
