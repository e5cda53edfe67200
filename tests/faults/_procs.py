"""Finding the processes of one run from the outside: every process a test starts gets a unique
marker in its environment, which everything it starts inherits (workers, megatron-core's checkpoint
writer, multiprocessing's resource tracker). ``/proc/<pid>/environ`` is the kernel's record of it,
independent of gkd's own bookkeeping."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

MARKER = "GKD_TEST_PROCESS_MARK"


def new_marker() -> dict[str, str]:
    """Environment entry that tags a process tree."""
    return {MARKER: uuid.uuid4().hex}


def marked(env: dict[str, str]) -> list[tuple[int, str]]:
    """(pid, command line) of every live (not zombie) process carrying ``env``'s marker."""
    needle = f"{MARKER}={env[MARKER]}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found.append((int(entry.name), cmd.strip()))
    return found


def assert_none_left(env: dict[str, str], *, grace: float = 10.0) -> None:
    """No process of the marked run may be alive ``grace`` seconds from now (signals that end them,
    such as a parent-death signal, are delivered asynchronously)."""
    deadline = time.time() + grace
    while (left := marked(env)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the run outlived it: {left}"
