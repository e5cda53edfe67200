"""Checkpoint write failures are advised by errno; a resume keeps each metrics.jsonl step once."""

from __future__ import annotations

import errno
import json
import os

import pytest

from parallel.checkpoint import save_error_advice
from parallel.loop import truncate_metrics

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("code", "expected", "not_expected"),
    [
        (errno.ENOSPC, "free space", "Broken pipe"),
        (errno.EDQUOT, "quota", "Broken pipe"),
        (errno.EPIPE, "died mid-save", "free space"),
        (errno.EIO, "I/O error", "free space"),
        (errno.EACCES, "not writable", "free space"),
        (errno.EROFS, "read-only", "free space"),
        (errno.EBADF, os.strerror(errno.EBADF), "free space"),
    ],
)
def test_save_failure_advice_follows_errno(tmp_path, code, expected, not_expected):
    advice = save_error_advice(OSError(code, os.strerror(code)), tmp_path)
    assert expected in advice and not_expected not in advice


def test_broken_pipe_error_is_not_told_to_free_space(tmp_path):
    advice = save_error_advice(BrokenPipeError(errno.EPIPE, "Broken pipe"), tmp_path)
    assert "free space" not in advice and "interrupted" in advice


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 10.0 - s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a torn last line of a killed writer
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    truncate_metrics(tmp_path / "absent.jsonl", 3)  # a first run has no file: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()
