"""``gkd report RUN [RUN ...]``: the curves of one or several runs side by side.

Reads each run's ``metrics.jsonl`` (and ``config.yaml`` for its methods) and writes, under
``--out``: ``report.png`` (matplotlib) and ``report.html`` (self-contained: the figure inlined as
SVG, the summary and the runs' methods; no network), and prints a summary table. Panels: total
loss, each loss term (``glmd/kl``, ``lm/ce``, ...), learning rate, gradient norm, tokens/s and,
when the runs validated during training (``train.eval_every``), validation loss and perplexity
(the teacher's as a dashed line). Each run is one colour in every panel.

matplotlib is the optional extra ``report`` (``pip install 'gkd[report]'``).
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd_cli.errors import GkdError


class ReportError(GkdError):
    """Bad input to ``gkd report``; the message names the file and the fix."""


@dataclass
class RunMetrics:
    name: str
    path: Path
    records: list[dict[str, Any]]
    methods: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of a top-level number (``loss``, ``lr``, ...), a term
        (``terms/glmd/kl``) or a validation result (``valid/student_ppl``)."""
        steps, values = [], []
        for record in self.records:
            if key.startswith("terms/"):
                value = (record.get("terms") or {}).get(key.removeprefix("terms/"))
            elif key.startswith("valid/"):
                value = (record.get("valid") or {}).get(key.removeprefix("valid/"))
            else:
                value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                steps.append(int(record["step"]))
                values.append(float(value))
        return steps, values

    def terms(self) -> list[str]:
        names: dict[str, None] = {}
        for record in self.records:
            for name in record.get("terms") or {}:
                names[name] = None
        return list(names)


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ReportError(
            "gkd report draws with matplotlib, which is not installed; install it with "
            "pip install 'gkd[report]' (or pip install matplotlib)"
        ) from None
    return matplotlib


def load_run(path: Path) -> RunMetrics:
    """A run from its output directory (or its ``metrics.jsonl``)."""
    path = Path(path)
    metrics = path if path.is_file() else path / "metrics.jsonl"
    run_dir = metrics.parent
    if not path.exists():
        raise ReportError(f"{path} does not exist; pass the output.dir of a gkd distill run")
    if not metrics.is_file():
        raise ReportError(
            f"{path} holds no metrics.jsonl; pass the output.dir of a gkd distill run (it "
            "writes metrics.jsonl from its first step)"
        )
    data = metrics.read_bytes()
    lines = data.decode("utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it
        try:
            record = json.loads(line)
        except ValueError as exc:
            if last:
                raise ReportError(
                    f"{metrics}: the last line ({number}) is truncated (the run was killed while "
                    "writing it, or is writing it now); resuming the run drops it (gkd distill "
                    "with the same config), or delete that line, or rerun gkd report in a moment"
                ) from None
            raise ReportError(
                f"{metrics} line {number} is not a JSON record ({exc}); the file is damaged: "
                "delete that line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ReportError(
                f"{metrics} line {number} is not a gkd metrics record (no integer 'step'); "
                "pass the metrics.jsonl that gkd distill wrote"
            )
        records.append(record)
    if not records:
        raise ReportError(f"{metrics} has no records yet; wait for the run's first step")
    methods: list[dict[str, Any]] = []
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            import yaml

            loaded = yaml.safe_load(config.read_text())
            methods = list(loaded.get("methods") or []) if isinstance(loaded, dict) else []
        except Exception:  # the curves do not depend on it
            methods = []
    return RunMetrics(name=run_dir.name, path=run_dir, records=records, methods=methods)


def load_runs(paths: Sequence[Path]) -> list[RunMetrics]:
    if not paths:
        raise ReportError("name at least one run: gkd report RUN [RUN ...]")
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for run in runs:  # same folder names (runs/a/out, runs/b/out): use parent/name
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"
    return runs


def methods_text(methods: list[dict[str, Any]]) -> str:
    parts = []
    for m in methods:
        if not isinstance(m, dict):
            continue
        weight = m.get("weight", 1.0)
        weight_text = f"{weight:g}" if isinstance(weight, int | float) else json.dumps(weight)
        parts.append(f"{m.get('name')} x {weight_text}")
    return " + ".join(parts) or "-"


# --------------------------------------------------------------------------------------------
# Summary


def _fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def summary_rows(runs: Sequence[RunMetrics]) -> list[tuple[str, list[str]]]:
    """``[(metric, [cell per run])]`` of the terminal table and the HTML page."""
    rows: list[tuple[str, list[str]]] = []
    rows.append(("methods", [methods_text(r.methods) for r in runs]))
    rows.append(("steps", [str(r.records[-1]["step"]) for r in runs]))

    def final_min(key: str) -> list[str]:
        cells = []
        for run in runs:
            _, values = run.series(key)
            finite = [v for v in values if not math.isnan(v)]
            cells.append(f"{_fmt(values[-1])} / {_fmt(min(finite))}" if finite else "-")
        return cells

    rows.append(("loss (final / min)", final_min("loss")))
    terms: dict[str, None] = {}
    for run in runs:
        terms.update(dict.fromkeys(run.terms()))
    for term in terms:
        rows.append((f"{term} (final / min)", final_min(f"terms/{term}")))
    cells = []
    for run in runs:
        _, values = run.series("tokens_per_s")
        cells.append(_fmt(statistics.median(values), ",.0f") if values else "-")
    rows.append(("tokens/s (median)", cells))
    cells = []
    for run in runs:
        _, values = run.series("skipped_steps")
        cells.append(str(int(values[-1])) if values else "-")
    rows.append(("skipped steps", cells))
    for key, label in (("valid/student_loss", "valid loss"), ("valid/student_ppl", "valid ppl")):
        cells = []
        for run in runs:
            steps, values = run.series(key)
            if values:
                best = min(range(len(values)), key=values.__getitem__)
                cells.append(f"{_fmt(values[best])} (step {steps[best]}), final {_fmt(values[-1])}")
            else:
                cells.append("-")
        if any(c != "-" for c in cells):
            rows.append((f"best {label}", cells))
    cells = []
    for run in runs:
        _, values = run.series("valid/teacher_ppl")
        cells.append(_fmt(values[-1]) if values else "-")
    if any(c != "-" for c in cells):
        rows.append(("teacher valid ppl", cells))
    return rows


def summary_table(runs: Sequence[RunMetrics]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="gkd report", title_justify="left")
    table.add_column("metric")
    for run in runs:
        table.add_column(run.name, overflow="fold")
    for label, cells in summary_rows(runs):
        table.add_row(label, *(Text(c) for c in cells))
    return table


# --------------------------------------------------------------------------------------------
# Figure


def panels(runs: Sequence[RunMetrics]) -> list[tuple[str, list[str]]]:
    """``[(title, [series keys])]``: the panels that have data in at least one run."""
    terms: dict[str, None] = {}
    for run in runs:
        terms.update(dict.fromkeys(run.terms()))
    wanted = [("loss", ["loss"])]
    wanted += [(f"loss term {t}", [f"terms/{t}"]) for t in terms]
    wanted += [
        ("learning rate", ["lr"]),
        ("grad norm", ["grad_norm"]),
        ("tokens/s", ["tokens_per_s"]),
        ("validation loss", ["valid/student_loss", "valid/teacher_loss"]),
        ("validation perplexity", ["valid/student_ppl", "valid/teacher_ppl"]),
    ]
    return [
        (title, keys)
        for title, keys in wanted
        if any(run.series(key)[0] for run in runs for key in keys)
    ]


def draw(runs: Sequence[RunMetrics]):
    """The figure (matplotlib ``Figure``, no pyplot state) and its panel titles."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layout = panels(runs)
    cols = min(3, len(layout))
    rows = math.ceil(len(layout) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for index, (title, keys) in enumerate(layout):
        ax = axes[index // cols][index % cols]
        for run, colour in zip(runs, colours, strict=True):
            for key in keys:
                steps, values = run.series(key)
                if not steps:
                    continue
                teacher = "teacher" in key
                label = f"{run.name} (teacher)" if teacher else run.name
                ax.plot(
                    steps,
                    values,
                    color=colour,
                    linestyle="--" if teacher else "-",
                    marker="o" if key.startswith("valid/") else None,
                    markersize=3,
                    linewidth=1.2,
                    label=label,
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if title in ("learning rate",):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.legend(fontsize=7)
    for index in range(len(layout), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    fig.suptitle(" vs ".join(r.name for r in runs), fontsize=11)
    return fig, [title for title, _ in layout]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def render(runs: Sequence[RunMetrics], out: Path) -> tuple[Path, Path, list[str]]:
    """Write ``report.png`` and ``report.html`` under ``out``; return their paths and the panel
    titles."""
    matplotlib = require_matplotlib()
    fig, titles = draw(runs)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    svg = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: searchable
        fig.savefig(svg, format="svg")
    svg_text = svg.getvalue().decode("utf-8")
    svg_text = svg_text[svg_text.index("<svg") :]  # drop the XML prolog and doctype
    page = _html(runs, svg_text)
    out.mkdir(parents=True, exist_ok=True)
    png_path, html_path = out / "report.png", out / "report.html"
    _write_atomic(png_path, png.getvalue())
    _write_atomic(html_path, page.encode("utf-8"))
    return png_path, html_path, titles


def _html(runs: Sequence[RunMetrics], svg: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(r.name)}</th>" for r in runs)
    body = "".join(
        "<tr><td>" + esc(label) + "</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
        for label, cells in summary_rows(runs)
    )
    sources = "".join(f"<li><code>{esc(str(r.path))}</code></li>" for r in runs)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>gkd report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "svg{max-width:100%;height:auto}</style></head><body>"
        f"<h1>gkd report</h1><ul>{sources}</ul>"
        f"<table><tr><th>metric</th>{head}</tr>{body}</table>"
        f"<div class='figure'>{svg}</div></body></html>\n"
    )


def run_report(paths: Sequence[Path], out: Path, console) -> tuple[Path, Path]:
    """What ``gkd report`` does: check matplotlib, read the runs, write, print."""
    require_matplotlib()  # before reading anything: name the fix first
    runs = load_runs(paths)
    png, page, _ = render(runs, out)
    console.print(summary_table(runs))
    console.print(f"wrote {png} and {page}", markup=False, soft_wrap=True)
    return png, page
