"""`gkd report`: several runs side by side, and bad input named with its fix."""

from __future__ import annotations

import io
import json
import sys

import pytest
from rich.console import Console

from gkd_cli.report import (
    ReportError,
    load_run,
    load_runs,
    panels,
    render,
    run_report,
    summary_table,
)

pytestmark = pytest.mark.unit


def _write_run(folder, terms, steps=4, valid_every=2):
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {
            "step": step,
            "loss": 4.0 / step,
            "terms": {t: 1.0 / step for t in terms},
            "lr": 1e-3,
            "grad_norm": 0.5,
            "tokens_per_s": 1000.0 + step,
        }
        if step % valid_every == 0:
            record["valid"] = {"student_loss": 3.0 - step / 10, "student_ppl": 10.0 + abs(step - 2)}
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "config.yaml").write_text(
        "methods:\n" + "".join(f"- {{name: {t.split('/')[0]}, weight: 0.5}}\n" for t in terms)
    )
    return folder


def test_two_runs_side_by_side(tmp_path):
    pytest.importorskip("matplotlib")
    a = _write_run(tmp_path / "a" / "run", ["glmd/kl", "lm/ce"])
    b = _write_run(tmp_path / "b" / "run", ["tinybert/hidden"], steps=6, valid_every=3)
    runs = load_runs([a, b])
    assert [r.name for r in runs] == ["a/run", "b/run"]  # same folder names told apart
    titles = [t for t, _ in panels(runs)]
    for term in ("glmd/kl", "lm/ce", "tinybert/hidden"):  # the union of both runs' terms
        assert f"loss term {term}" in titles
    png, page, drawn = render(runs, tmp_path / "out")
    assert drawn == titles and png.read_bytes()[:4] == b"\x89PNG"
    html = page.read_text()
    assert "glmd x 0.5 + lm x 0.5" in html and "tinybert x 0.5" in html
    assert "10.0000 (step 2), final 12.0000" in html  # run a: best valid ppl at step 2
    stream = Console(file=io.StringIO(), width=200)
    stream.print(summary_table(runs))
    text = stream.file.getvalue()
    assert "tinybert/hidden" in text and "a/run" in text and "b/run" in text


def test_bad_input_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ReportError, match="holds no metrics.jsonl; pass the output.dir"):
        load_run(tmp_path)
    run = _write_run(tmp_path / "run", ["lm/ce"])
    metrics = run / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text + '{"step": 5, "loss": 1.')  # killed while writing its last line
    with pytest.raises(ReportError, match=r"last line \(5\) is truncated.*delete that line"):
        load_run(run)
    metrics.write_text("garbage\n" + text)
    with pytest.raises(ReportError, match="line 1 is not a JSON record.*delete that line"):
        load_run(run)
    metrics.write_text("")
    with pytest.raises(ReportError, match="no records yet"):
        load_run(run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=r"pip install 'gkd\[report\]'"):
        run_report([run], tmp_path / "out", Console())
