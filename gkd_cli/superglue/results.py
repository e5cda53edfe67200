"""SuperGLUE results files, comparisons and Rich tables.

A results file is JSON::

    {"format": "gkd.superglue.results/1",
     "model": "student-66m" | null,
     "average": 71.3 | null,          # the SuperGLUE score, when all eight tasks are present
     "tasks": {"CB": {"metrics": {"acc": 76.8, "f1": 61.2}, "score": 69.0, "n": 56,
                      "seconds": 1.9, "shots": 0, "normalize": false, "seed": 1234,
                      "example_prompt": {"prompt": "...", "options": [" True", ...]},
                      "predictions": [{"id": "0", "pred": 1, "gold": 1,
                                       "scores": [...], "prompt": "..."}]}}}   # optional

Metrics are on the leaderboard's 0-100 scale. ``example_prompt`` is the exact text of the first
example's prompt (few-shot examples included); ``predictions`` (and each prediction's
``prompt``) are written when asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from gkd_cli.superglue.evaluator import TaskResult
from gkd_cli.superglue.metrics import superglue_average, task_score
from gkd_cli.superglue.tasks import TASKS

RESULTS_FORMAT = "gkd.superglue.results/1"
"""The ``format`` tag of results files written by this version."""

Results = Mapping[str, Any] | Sequence[TaskResult]
"""A results document (as :func:`results_to_json` returns or :func:`load_results` reads), or
the task results it would be made from."""


def task_result_to_json(
    result: TaskResult, *, include_predictions: bool = False, include_prompts: bool = False
) -> dict[str, Any]:
    """One task's entry of a results document."""
    entry: dict[str, Any] = {
        "metrics": dict(result.metrics),
        "score": result.score,
        "n": result.num_examples,
        "seconds": result.seconds,
        "shots": result.shots,
        "normalize": result.normalize,
        "seed": result.seed,
        "example_prompt": None,
    }
    if result.records:
        first = result.records[0]
        entry["example_prompt"] = {"prompt": first.prompt, "options": list(first.options)}
    if include_predictions or include_prompts:
        predictions = []
        for record in result.records:
            prediction: dict[str, Any] = {
                "id": record.example_id,
                "pred": record.pred,
                "gold": record.gold,
                "scores": list(record.scores),
                "logprobs": list(record.logprobs),
                "tokens": list(record.token_counts),
            }
            if include_prompts:
                prediction["prompt"] = record.prompt
                prediction["options"] = list(record.options)
            predictions.append(prediction)
        entry["predictions"] = predictions
    return entry


def _average(tasks: Mapping[str, Mapping[str, Any]]) -> float | None:
    metrics = {name: entry["metrics"] for name, entry in tasks.items() if entry.get("metrics")}
    try:
        return superglue_average(metrics)
    except ValueError:
        return None


def results_to_json(
    results: Sequence[TaskResult],
    *,
    model: str | None = None,
    include_predictions: bool = False,
    include_prompts: bool = False,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A results document for ``results`` (see the module docstring for the layout);
    ``settings`` (how prompts were made, e.g. ``prompt_prefix``) is stored as given."""
    tasks = {
        result.task: task_result_to_json(
            result, include_predictions=include_predictions, include_prompts=include_prompts
        )
        for result in results
    }
    document = {
        "format": RESULTS_FORMAT,
        "model": model,
        "average": _average(tasks),
        "tasks": tasks,
    }
    if settings is not None:
        document["settings"] = dict(settings)
    return document


def save_results(
    path: Path | str,
    results: Sequence[TaskResult],
    *,
    model: str | None = None,
    include_predictions: bool = False,
    include_prompts: bool = False,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a results document to ``path`` (parents created) and return it."""
    document = results_to_json(
        results,
        model=model,
        include_predictions=include_predictions,
        include_prompts=include_prompts,
        settings=settings,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return document


def load_results(path: Path | str) -> dict[str, Any]:
    """Read a results document, checking its format tag and layout."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not a JSON results file ({error.msg}, line {error.lineno})"
        ) from None
    if not isinstance(document, dict) or document.get("format") != RESULTS_FORMAT:
        raise ValueError(
            f'{path}: not a SuperGLUE results file (expected "format": "{RESULTS_FORMAT}"); '
            "write it with gkd eval superglue"
        )
    tasks = document.get("tasks")
    if not isinstance(tasks, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("metrics"), dict)
        for entry in tasks.values()
    ):
        raise ValueError(f"{path}: field 'tasks' must map task names to objects with 'metrics'")
    return document


def _as_document(results: Results) -> Mapping[str, Any]:
    if isinstance(results, Mapping):
        return results
    return results_to_json(list(results))


def _task_order(names: Sequence[str]) -> list[str]:
    known = [name for name in TASKS if name in names]
    return known + sorted(name for name in names if name not in TASKS)


@dataclass(frozen=True, kw_only=True)
class CompareRow:
    """One metric of one task in two results."""

    task: str
    """The task name, or ``"SuperGLUE"`` for the average."""
    metric: str
    """The metric name (``"average"`` for the SuperGLUE score)."""
    a: float | None
    """The value in the first results; None when absent there."""
    b: float | None
    """The value in the second results; None when absent there."""

    @property
    def delta(self) -> float | None:
        """``b - a``; None when either is absent."""
        if self.a is None or self.b is None:
            return None
        return self.b - self.a


def compare(a: Results, b: Results) -> list[CompareRow]:
    """Rows (task, metric, a, b, delta) for every metric in either results, tasks in the
    benchmark's order, then the SuperGLUE average when either has one."""
    doc_a, doc_b = _as_document(a), _as_document(b)
    tasks_a, tasks_b = doc_a["tasks"], doc_b["tasks"]
    rows = []
    for task in _task_order(list(dict.fromkeys([*tasks_a, *tasks_b]))):
        metrics_a = tasks_a.get(task, {}).get("metrics", {})
        metrics_b = tasks_b.get(task, {}).get("metrics", {})
        names = list(dict.fromkeys([*metrics_a, *metrics_b]))
        spec = TASKS.get(task)
        if spec is not None:
            names.sort(key=lambda n: spec.metric_names.index(n) if n in spec.metric_names else 99)
        for name in names:
            rows.append(
                CompareRow(task=task, metric=name, a=metrics_a.get(name), b=metrics_b.get(name))
            )
    if doc_a.get("average") is not None or doc_b.get("average") is not None:
        rows.append(
            CompareRow(
                task="SuperGLUE", metric="average", a=doc_a.get("average"), b=doc_b.get("average")
            )
        )
    return rows


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_results(results: Results, *, title: str | None = None) -> Table:
    """A Rich table: one row per task (metrics, score, examples, shots, seconds), then the
    SuperGLUE average when all eight tasks are present."""
    document = _as_document(results)
    if title is None:
        title = "SuperGLUE" + (f": {document['model']}" if document.get("model") else "")
    table = Table(title=title)
    table.add_column("Task")
    table.add_column("Metrics")
    table.add_column("Score", justify="right")
    table.add_column("N", justify="right")
    table.add_column("Shots", justify="right")
    table.add_column("Seconds", justify="right")
    tasks = document["tasks"]
    for task in _task_order(list(tasks)):
        entry = tasks[task]
        metrics = entry.get("metrics", {})
        score = entry.get("score")
        if score is None and metrics and task in TASKS:
            score = task_score(task, metrics)
        table.add_row(
            task,
            " / ".join(f"{name} {value:.1f}" for name, value in metrics.items()) or "(unlabeled)",
            _format(score),
            str(entry.get("n", "-")),
            str(entry.get("shots", "-")),
            f"{entry['seconds']:.1f}" if entry.get("seconds") is not None else "-",
        )
    if document.get("average") is not None:
        table.add_section()
        table.add_row(
            "SuperGLUE average", "", f"[bold]{document['average']:.1f}[/bold]", "", "", ""
        )
    return table


def render_compare(rows: Sequence[CompareRow], *, a_label: str = "A", b_label: str = "B") -> Table:
    """A Rich table of :func:`compare` rows; deltas green when B is higher, red when lower."""
    table = Table(title=f"SuperGLUE: {a_label} vs {b_label}")
    table.add_column("Task")
    table.add_column("Metric")
    table.add_column(a_label, justify="right")
    table.add_column(b_label, justify="right")
    table.add_column("Delta", justify="right")
    for row in rows:
        delta = row.delta
        if delta is None:
            delta_text = "-"
        else:
            style = "green" if delta > 0 else "red" if delta < 0 else ""
            delta_text = f"{delta:+.1f}" if not style else f"[{style}]{delta:+.1f}[/{style}]"
        table.add_row(row.task, row.metric, _format(row.a), _format(row.b), delta_text)
    return table
