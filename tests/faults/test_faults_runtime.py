"""Faults done for real to torchrun gloo workers (tests/dist/runtime_job.py): kill -9 of a rank and
of the launcher, SIGTERM while saving and while loading, injected NaN, disk full, damaged files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from parallel import checkpoint as ckpt
from tests.dist._torchrun import REPO, run_job
from tests.distributed import free_port
from tests.faults._procs import assert_none_left, marked, new_marker

pytestmark = [pytest.mark.faults, pytest.mark.dist]
STEPS = 6
SPEC = dict(tp=1, pp=1, dp=2, steps=STEPS, save_every=2)


def _start(tmp_path: Path, name: str, **spec) -> tuple[subprocess.Popen, Path]:
    """Start torchrun with ``spec``; ``proc.marker`` tags every process of the run (see _procs)."""
    spec = {
        **SPEC,
        "out_dir": str(tmp_path / "run"),
        "result": str(tmp_path / f"{name}.json"),
        **spec,
    }
    path = tmp_path / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    nproc = spec["tp"] * spec["pp"] * spec["dp"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        str(REPO / "tests/dist/runtime_job.py"),
        str(path),
    ]
    log = tmp_path / f"{name}.log"
    marker = new_marker()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **marker}
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.marker = marker
    return proc, log


def _wait_for(predicate, what: str, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _metric_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return (
        [json.loads(line)["step"] for line in path.read_text().splitlines()]
        if path.exists()
        else []
    )


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "runtime_job.py" in " ".join(p.cmdline())
    ]


def _last_losses(out: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl, the last line of each step winning (a resumed run repeats
    the steps after the checkpoint it resumed from)."""
    return {
        r["step"]: r["loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    result = run_job(tmp, "ref", **SPEC)
    return {r["step"]: r["loss"] for r in result["records"]}, tmp / "ref"


def test_kill9_rank_then_launcher_resumes_with_same_losses(reference, tmp_path):
    ref_losses, _ = reference
    out = tmp_path / "run"
    # 1. kill -9 of one rank after step 3 (checkpoint at step 2 is complete).
    proc, log = _start(tmp_path, "a", step_sleep=1.0)
    _wait_for(lambda: len(_metric_steps(out)) >= 3, "step 3")
    victim = _workers(proc)[-1]
    victim.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    # Nothing the killed rank started (megatron-core's checkpoint-writer Manager and the resource
    # tracker, which used to be re-parented to init and run forever) outlives the launcher.
    assert_none_left(proc.marker)
    root = out / "checkpoints"
    assert ckpt.latest_complete(root).name == "step_0000002"
    ckpt.verify_manifest(root / "step_0000002")
    # Partial folders as a crash mid-save leaves them: never taken as latest, cleaned with a message.
    (root / ".tmp-step_0000004" / "dist").mkdir(parents=True)
    (root / "step_0000009" / "dist").mkdir(parents=True)
    assert ckpt.latest_complete(root).name == "step_0000002"
    # 2. rerun; kill -9 of the launcher (torchrun) after step 4 was saved.
    proc, log = _start(tmp_path, "b", step_sleep=1.0)
    _wait_for(lambda: (root / "step_0000004" / "manifest.json").exists(), "the step-4 checkpoint")
    workers = _workers(proc)
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The workers are told by the kernel (PDEATHSIG), finish their step, save, and exit.
    gone, alive = psutil.wait_procs(workers, timeout=90)
    assert not alive, f"orphaned workers still running: {alive}"
    assert_none_left(proc.marker)
    assert (
        gone
    )  # (not our children: their exit codes are not ours to read; the save below shows it)
    text = log.read_text()
    assert "removing incomplete checkpoint" in text and ".tmp-step_0000004" in text
    assert not (root / ".tmp-step_0000004").exists()
    assert "step_0000009 (no manifest.json)" in text and not (root / "step_0000009").exists()
    latest = ckpt.latest_complete(root)
    assert int(latest.name[5:]) >= 5, latest  # saved after the kill, on the workers' own SIGTERM
    ckpt.verify_manifest(latest)
    # 3. rerun to the end: every step's loss equals the uninterrupted run's (same layout: bit-exact).
    proc, log = _start(tmp_path, "c")
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert_none_left(proc.marker)
    assert _last_losses(out) == ref_losses


def test_sigterm_while_saving_then_while_loading_exits_zero(tmp_path):
    out = tmp_path / "run"
    proc, log = _start(tmp_path, "save", steps=50, slow_save=3.0)
    _wait_for(lambda: (out / "saving").exists(), "a save in progress")
    # To every process of the run but torchrun, as Slurm's `scancel --signal` does: the workers and
    # the helper processes of megatron's checkpoint writer, which must survive it until their worker
    # has saved (the stop save after this one needs them).
    for pid, _ in marked(proc.marker):
        if pid != proc.pid:
            os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=150) == 0, log.read_text()[-3000:]
    assert_none_left(proc.marker)
    result = json.loads((tmp_path / "save.json").read_text())
    assert result["status"] == "preempted"
    root = out / "checkpoints"
    latest = ckpt.latest_complete(root)
    # The save that was interrupted completed (step 2), and the final one at the stop step too.
    assert (root / "step_0000002" / "manifest.json").exists()
    assert latest.name == f"step_{max(r['step'] for r in result['records']):07d}"
    ckpt.verify_manifest(latest)
    assert not list(root.glob(".tmp-*"))
    # SIGTERM while "loading data" (before the first step): exit 0, nothing new written.
    before = sorted(p.name for p in root.iterdir())
    proc, log = _start(tmp_path, "load", steps=50, load_sleep=60)
    _wait_for(lambda: (out / "loading").exists(), "data loading")
    time.sleep(0.5)
    for worker in _workers(proc):
        worker.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=150) == 0, log.read_text()[-3000:]
    again = json.loads((tmp_path / "load.json").read_text())
    assert again["status"] == "preempted" and again["records"] == []
    assert sorted(p.name for p in root.iterdir()) == before
    ckpt.verify_manifest(latest)


def test_nan_gradient_skipped_within_budget_then_nan_loss_stops_run(tmp_path):
    out = tmp_path / "run"
    proc, log = _start(
        tmp_path, "nan", steps=4, save_every=1, nan_grad_at=2, nan_loss_at=3, max_skipped_steps=1
    )
    assert proc.wait(timeout=240) != 0
    text = log.read_text()
    assert "step 2: non-finite gradient on rank(s) [0, 1]" in text and "skipping this step" in text
    assert "FloatingPointError: step 3: non-finite loss term(s) kl" in text
    assert "seen on rank" in text and "train.max_skipped_steps=1" in text
    root = out / "checkpoints"
    assert ckpt.latest_complete(root).name == "step_0000002"
    ckpt.verify_manifest(root / "step_0000002")
    assert json.loads((root / "step_0000002" / "meta.json").read_text())["skipped_steps"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True]


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc, log = _start(tmp_path, "enospc", steps=4, save_every=1, enospc_at_save=3)
    assert proc.wait(timeout=240) != 0
    text = log.read_text()
    assert "No space left on device" in text
    assert "previous checkpoint step_0000002 is intact" in text
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_0000002"
    assert ckpt.latest_complete(root).name == "step_0000002"
    ckpt.verify_manifest(root / "step_0000002")
    assert (root / ".tmp-step_0000003").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_file_is_named(reference, tmp_path, damage):
    _, ref_out = reference
    folder = tmp_path / "step"
    shutil.copytree(ckpt.latest_complete(ref_out / "checkpoints"), folder)
    victim = sorted((folder / "dist").glob("*.distcp"))[0]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
        match = "bytes, expected"
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        match = "sha256 mismatch"
    else:
        victim.unlink()
        match = "is missing"
    with pytest.raises(ckpt.CheckpointError, match=match) as err:
        ckpt.verify_manifest(folder)
    assert victim.name in str(err.value)
