"""Run a script on N gloo ranks for distributed tests: ``torchrun(script, nproc, *args)``.

By default the ranks are forked from one multiprocessing fork server per test session that has
imported torch, megatron-core and gkd's runtime once (``tests.distributed.PRELOAD``). Importing those takes
about 6 CPU-seconds per process, more than most of these tests' work on tiny models; forking
skips it. Each rank gets what torchrun would give it: a fresh environment (the caller's
``os.environ`` plus ``env``, with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), ``sys.argv``, the repository as working directory, the script
run as ``__main__``, its stdout and stderr captured. The processes are real and separate (their
own gloo process group and megatron parallel state, nothing shared after the fork); what these
tests check is the runtime, not the launcher.

The launcher itself (``gkd distill`` -> torchrun -> workers, restarts, signals, Slurm) is tested
by tests/e2e, tests/faults and tests/slurm through the real ``torch.distributed.run``. Set
``GKD_TEST_REAL_TORCHRUN=1`` to run these tests under the real torchrun too.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.distributed import forkserver_context, free_port

REPO = Path(__file__).resolve().parents[2]


def _rank_main(script: str, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    """One rank in a forked child: torchrun's environment, the script as ``__main__``."""
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    os.chdir(REPO)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # as a process exiting normally would (forked children skip it)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _forked(
    script: Path, nproc: int, args: tuple[str, ...], timeout: float, env: dict
) -> subprocess.CompletedProcess:
    ctx = forkserver_context()
    port = free_port()
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    logs = Path(tempfile.mkdtemp(prefix="gkd-ranks-"))
    procs = []
    for rank in range(nproc):
        rank_env = {
            **base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0",
        }  # fmt: skip
        out, err = logs / f"{rank}.out", logs / f"{rank}.err"
        proc = ctx.Process(
            target=_rank_main, args=(str(script), list(args), rank_env, str(out), str(err))
        )
        proc.start()
        procs.append(proc)
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.is_alive() for p in procs):
        if time.monotonic() > deadline:
            break
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()  # the others may wait in a collective: 10 s to finish
        if failed_at is not None and time.monotonic() > failed_at + 10:
            break
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    codes = [p.exitcode for p in procs]
    stdout = "".join((logs / f"{r}.out").read_text(errors="replace") for r in range(nproc))
    stderr = "".join((logs / f"{r}.err").read_text(errors="replace") for r in range(nproc))
    for path in logs.iterdir():
        path.unlink()
    logs.rmdir()
    code = next((c for c in codes if c != 0), 0)
    return subprocess.CompletedProcess([str(script), *args], code, stdout, stderr)


def torchrun(
    script: Path, nproc: int, *args: str, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` ranks (forked, see the module docstring; the real torchrun
    with ``GKD_TEST_REAL_TORCHRUN=1``); raise with the ranks' output tails when one fails."""
    if os.environ.get("GKD_TEST_REAL_TORCHRUN") == "1":
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), str(script), *args,
        ]  # fmt: skip
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
        )
    else:
        proc = _forked(Path(script), nproc, args, timeout, env or {})
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def run_job(tmp_path: Path, name: str, **spec) -> dict:
    """Run tests/dist/runtime_job.py with ``spec`` and return its result."""
    spec.setdefault("out_dir", str(tmp_path / name))
    spec["result"] = str(tmp_path / f"{name}.json")
    spec_path = tmp_path / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    nproc = spec["tp"] * spec["pp"] * spec["dp"]
    torchrun(REPO / "tests/dist/runtime_job.py", nproc, str(spec_path))
    return json.loads(Path(spec["result"]).read_text())
