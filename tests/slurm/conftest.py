"""The Slurm tier: real slurmctld/slurmd daemons (``.ci/slurm/start.sh`` starts two nodes on
localhost). Every test here is skipped when no Slurm answers ``sinfo``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CI_CONF = Path(os.environ.get("GKD_SLURM_DIR", "/tmp/gkd-slurm")) / "etc" / "slurm.conf"


def _slurm_nodes() -> int:
    if not os.environ.get("SLURM_CONF") and CI_CONF.is_file():
        os.environ["SLURM_CONF"] = str(CI_CONF)  # the cluster .ci/slurm/start.sh started
    if shutil.which("sinfo") is None:
        return 0
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if proc.returncode != 0:
        return 0
    return sum(
        1
        for line in proc.stdout.splitlines()
        if line.split()[-1:] in (["idle"], ["mix"], ["alloc"])
    )


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if "slurm" in item.keywords]
    if not ours:
        return
    nodes = _slurm_nodes()
    if nodes >= 2:
        return
    reason = "needs a running Slurm with 2 nodes (sudo .ci/slurm/start.sh)"
    for item in ours:
        item.add_marker(pytest.mark.skip(reason=reason))
