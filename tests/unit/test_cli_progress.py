"""Progress from ``metrics.jsonl``: tailing a growing file (partial lines, resumed runs), plain
lines when stdout is not a terminal, ETA."""

from __future__ import annotations

import io
import json
import time

import pytest
from rich.console import Console

from gkd_cli.progress import (
    LineSink,
    MetricsTailer,
    RateTracker,
    RichSink,
    follow_metrics,
    format_line,
)

pytestmark = pytest.mark.unit

RECORD = {
    "step": 10,
    "consumed_tokens": 40960,
    "loss": 2.31,
    "terms": {"glmd.kl": 2.0, "lm": 0.31},
    "lr": 3e-4,
    "grad_norm": 0.8,
    "tokens_per_s": 12345.6,
    "peak_mem_bytes": 2 * 1024**3,
}


def test_tailer_waits_for_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    seen = []
    tailer = MetricsTailer(path, seen.append)
    assert tailer.read_new() == 0  # no file yet
    line = json.dumps(RECORD)
    path.write_text(line + "\n" + line[:15])  # one complete line, one being written
    assert tailer.read_new() == 1
    with open(path, "a") as handle:
        handle.write(line[15:] + "\n")
    assert tailer.read_new() == 1
    assert seen == [RECORD, RECORD]
    with open(path, "a") as handle:
        handle.write("not json\n\n[1, 2]\n")
    assert tailer.read_new() == 0  # foreign lines are skipped, not fatal


def test_tailer_can_skip_earlier_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n")
    seen = []
    tailer = MetricsTailer(path, seen.append, skip_existing=True)
    with open(path, "a") as handle:
        handle.write(json.dumps({"step": 3}) + "\n")
    tailer.read_new()
    assert seen == [{"step": 3}]


def test_format_line_has_every_field():
    line = format_line(RECORD, total_steps=100, eta_s=83)
    assert line == (
        "step 10/100 (10%) | loss 2.3100 | glmd.kl 2.0000 lm 0.3100 | lr 3.00e-04 | "
        "grad 0.800 | 12,346 tok/s | eta 0:01:23 | mem 2.00 GiB"
    )


def test_format_line_tolerates_missing_fields():
    assert format_line({"step": 3}, total_steps=4) == "step 3/4 (75%)"


def test_eta_from_observed_rate_and_from_tokens():
    now = [0.0]
    rates = RateTracker(total_steps=100, clock=lambda: now[0])
    # first record: 40960 tokens in 10 steps at 12345.6 tokens/s, 90 steps left
    assert rates.eta(RECORD) == pytest.approx(90 * 4096 / 12345.6)
    now[0] = 10.0
    # 10 more steps in 10 s -> 1 step/s, 80 left (a resumed run started at step 10 is fine)
    assert rates.eta({**RECORD, "step": 20}) == pytest.approx(80.0)


def test_line_sink_writes_one_line_per_record():
    stream = io.StringIO()
    sink = LineSink(total_steps=20, stream=stream)
    sink.update({**RECORD, "step": 10})
    sink.update({**RECORD, "step": 20})
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 10/20 (50%)", "step 20/20 (100%)"]
    assert sink.last["step"] == 20


def test_follow_metrics_prints_plain_lines_when_not_a_terminal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False)
    with follow_metrics(path, total_steps=3, console=console, poll_s=0.01) as sink:
        assert isinstance(sink, LineSink)
        with open(path, "a") as handle:
            for step in (1, 2):
                handle.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
                handle.flush()
                time.sleep(0.05)
            handle.write(json.dumps({"step": 3, "loss": 0.25}) + "\n")  # read at stop
    lines = [line.split(" | eta")[0] for line in stream.getvalue().splitlines()]
    assert lines == [
        "step 1/3 (33%) | loss 1.0000",
        "step 2/3 (67%) | loss 0.5000",
        "step 3/3 (100%) | loss 0.2500",
    ]


def test_rich_sink_on_a_terminal(tmp_path):
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=160)
    with follow_metrics(tmp_path / "m.jsonl", total_steps=100, console=console) as sink:
        assert isinstance(sink, RichSink)
        sink.update(RECORD)
    text = stream.getvalue()
    assert "step 10/100" in text and "12,346 tok/s" in text and "glmd.kl 2.0000" in text


VALID = {"student_loss": 2.31, "student_ppl": 10.074, "teacher_loss": 2.0, "teacher_ppl": 7.389}


def test_validation_steps_show_their_results_in_plain_lines_and_above_the_bar():
    line = format_line({"step": 6, "loss": 2.5, "valid": VALID}, total_steps=12)
    assert line == "step 6/12 (50%) | loss 2.5000 | valid loss 2.3100 ppl 10.07 (teacher ppl 7.39)"
    stream = io.StringIO()
    sink = RichSink(12, Console(file=stream, force_terminal=True, width=160))
    sink.start()
    sink.update({"step": 6, "loss": 2.5, "valid": VALID})
    sink.stop()
    assert "step 6: valid loss 2.3100 ppl 10.07 (teacher ppl 7.39)" in stream.getvalue()


def test_slurm_output_file_gets_plain_lines_even_when_rich_is_forced(tmp_path):
    """Under Slurm the launcher's stdout is the job's output file: FORCE_COLOR (or
    TTY_COMPATIBLE) makes Rich call it a terminal, but a bar must not be drawn into it."""
    from gkd_cli.progress import wants_bar

    with open(tmp_path / "slurm-42.out", "w") as handle:
        console = Console(file=handle, force_terminal=True)
        assert console.is_terminal
        assert not wants_bar(console, {"SLURM_JOB_ID": "42"})
        assert wants_bar(console, {})  # outside Slurm, forcing a terminal is the user's choice
        assert not wants_bar(Console(file=handle, force_terminal=False), {})
