"""SuperGLUE task data as plain texts for GLMD's task-specific distillation stage.

GLMD (Tan et al., ACL 2023, arXiv 2306.06625, Sec. 3) distills in two stages without labels: a
task-agnostic stage on a corpus and a task-specific stage on the tasks' inputs, where the student
matches the teacher's word predictions on the same prompts used at evaluation. This module turns
task examples into those prompt-formatted texts: the evaluation prompt's context followed by the
gold answer when the example is labeled (train split), or the context alone when it is not
(unlabeled split), so the student sees the evaluation format during distillation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gkd_cli.errors import ConfigError
from gkd_cli.superglue.readers import available_splits, read_task
from gkd_cli.superglue.tasks import BENCHMARK_TASKS, get_task


@dataclass(frozen=True, kw_only=True)
class TaskText:
    """One distillation text and where it came from."""

    task: str
    """The official task name."""
    example_id: str
    """The source example's id."""
    text: str
    """The prompt-formatted text."""
    labeled: bool
    """Whether the gold answer is appended."""
    prompt: str = ""
    """The evaluation prompt's context alone (what the model conditions on)."""
    answer: str | None = None
    """The gold option's text (``None`` when unlabeled)."""

    options: tuple[str, ...] = ()
    """Every option of the evaluation prompt."""
    label: int | None = None
    """The gold option's index (``None`` when unlabeled)."""

    def choice_record(self, *, labels: bool) -> dict[str, object]:
        """The choice record ``{"prompt", "options", "label"}`` (:mod:`methods.choices`); the label
        only when ``labels`` (GLMD distills without gold answers: then it is ``null``)."""
        return {
            "prompt": self.prompt,
            "options": list(self.options),
            "label": self.label if labels else None,
        }

    def record(self, *, examples: bool) -> dict[str, str]:
        """The JSON-lines record: ``{"prompt", "completion"}`` (the gold answer, trained on alone
        in example-aware batches) when ``examples`` and labeled, else ``{"text"}``."""
        if examples and self.answer is not None:
            return {"prompt": self.prompt, "completion": self.answer}
        return {"text": self.text}


def iter_task_records(
    data_dir: Path | str,
    tasks: Iterable[str],
    split: str,
    *,
    skip_missing: bool = False,
) -> Iterator[TaskText]:
    """Yield a :class:`TaskText` per example of each task's ``split``, tasks in the given order,
    examples in file order.

    MultiRC yields one text per answer option and ReCoRD one per query, as they are scored.
    A task without a ``split`` file raises :class:`~gkd_cli.superglue.readers.SuperGlueDataError`
    unless ``skip_missing`` (then it is skipped). Labels are used when present, never required.
    """
    for name in tasks:
        spec = get_task(name)
        if skip_missing and split not in available_splits(data_dir, spec.name):
            continue
        for example in read_task(data_dir, spec.name, split, require_labels=False):
            prompt = spec.prompt(example)
            labeled = prompt.gold is not None
            yield TaskText(
                task=spec.name,
                example_id=example.example_id,
                text=prompt.solved() if labeled else prompt.context,
                labeled=labeled,
                prompt=prompt.context,
                answer=prompt.options[prompt.gold] if prompt.gold is not None else None,
                options=tuple(prompt.options),
                label=prompt.gold,
            )


def iter_task_texts(
    data_dir: Path | str,
    tasks: Iterable[str],
    split: str,
    *,
    skip_missing: bool = False,
) -> Iterator[str]:
    """Yield the prompt-formatted text of every example (see :func:`iter_task_records`)."""
    for record in iter_task_records(data_dir, tasks, split, skip_missing=skip_missing):
        yield record.text


def check_task_files(tasks: list[str], folder: str | None, split: str) -> None:
    """``ConfigError`` naming ``data.superglue_*`` unless every task of ``tasks`` (the eight
    benchmark tasks, any case) has ``<folder>/<Task>/<split>.jsonl``: the check of a run's
    ``data.source: superglue`` before launch."""
    from methods.typed import did_you_mean

    names = ", ".join(BENCHMARK_TASKS)
    if not tasks:
        raise ConfigError(
            f"data.superglue_tasks is empty; list tasks from {names}",
            field="data.superglue_tasks",
        )
    if folder is None or not os.path.isdir(folder):
        raise ConfigError(
            f"data.superglue_dir: folder {folder} does not exist; point it at the folder "
            "holding BoolQ/, CB/, ...",
            field="data.superglue_dir",
        )
    by_lower = {t.lower(): t for t in BENCHMARK_TASKS}
    for i, task in enumerate(tasks):
        official = by_lower.get(task.lower())
        if official is None:
            raise ConfigError(
                f"data.superglue_tasks.{i}: unknown task '{task}'"
                f"{did_you_mean(task, BENCHMARK_TASKS)} (tasks: {names})",
                field=f"data.superglue_tasks.{i}",
            )
        sub = next((e for e in os.listdir(folder) if e.lower() == official.lower()), official)
        path = os.path.join(folder, sub, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise ConfigError(
                f"data.superglue_tasks.{i}: {path} does not exist; pick another "
                "data.superglue_split or fix data.superglue_dir",
                field=f"data.superglue_tasks.{i}",
            )
