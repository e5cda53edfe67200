"""Scoring SuperGLUE examples with any model that returns continuation log-likelihoods.

The model is abstract (:class:`LogLikelihoodModel`): one request per example holds the shared
context's token ids and each option's continuation ids, so a runtime can run the shared prompt
once and score all options from it (e.g. one forward pass over the context with its key/value
cache reused per option, or the options packed after one copy of the context), instead of
recomputing the prompt per option.

Tokenization boundary. Subword tokenizers do not split text additively: ``tokenize(c + o)`` need
not start with ``tokenize(c)`` (a context's last token can merge with an option's first
characters). :func:`split_continuations` therefore encodes the context alone and each
``context + option`` whole, and takes each option's continuation ids as the difference: the
shared context is the longest token prefix common to the context's encoding and every
``context + option`` encoding, and an option's continuation is the rest of its whole encoding.
Context and continuation then concatenate to exactly the tokenization of the full text, which is
what the model would see; when a merge crosses the boundary, the merged tokens move into every
option's continuation (and count in its length).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from gkd_cli.superglue.examples import Example, MultiRCExample, ReCoRDExample
from gkd_cli.superglue.metrics import task_score
from gkd_cli.superglue.prompts import fewshot_examples, fewshot_prefix
from gkd_cli.superglue.readers import read_task
from gkd_cli.superglue.tasks import TaskSpec, get_task

Request = tuple[list[int], list[list[int]]]
"""``(context ids, [continuation ids of each option])``."""

OptionScore = tuple[float, int]
"""``(sum of the continuation's token log-probabilities, number of continuation tokens)``."""

Tokenize = Callable[[str], Sequence[int]]
"""Text -> token ids (the same tokenizer the model was trained with)."""


@runtime_checkable
class LogLikelihoodModel(Protocol):
    """A model that scores option continuations after a shared context."""

    def loglikelihood(self, requests: list[Request]) -> list[list[OptionScore]]:
        """For each request ``(context_ids, [option_ids, ...])`` return, per option,
        ``(sum log p(option tokens | context, earlier option tokens), len(option_ids))``.

        Results are in request order, options in option order. Log-probabilities are natural
        logs of the model's full-vocabulary softmax.
        """
        ...


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def split_continuations(
    tokenize: Tokenize, context: str, options: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the shared context and of each option's continuation (see module docstring).

    Raises ``ValueError`` if the shared context would be empty (the model needs at least one
    token to condition on; a tokenizer that adds a BOS token always has one) or an option adds
    no token.
    """
    if not options:
        raise ValueError("a prompt needs at least one option")
    context_ids = list(tokenize(context))
    whole = [list(tokenize(context + option)) for option in options]
    shared = len(context_ids)
    for ids in whole:
        shared = min(shared, _common_prefix_length(context_ids, ids))
    if shared == 0:
        raise ValueError(
            "the context and its options share no leading token; put a beginning-of-sequence "
            f"token before prompts (gkd eval --add-bos) (context starts {context[:40]!r})"
        )
    continuations = [ids[shared:] for ids in whole]
    for option, continuation in zip(options, continuations, strict=True):
        if not continuation:
            raise ValueError(f"option {option!r} adds no token after the context")
    return context_ids[:shared], continuations


@dataclass(frozen=True, kw_only=True)
class ExampleRecord:
    """How one example was scored."""

    example_id: str
    """The example's stable id (see the example classes)."""
    prompt: str
    """The exact context text given to the model, few-shot examples included."""
    options: tuple[str, ...]
    """The option continuation strings."""
    logprobs: tuple[float, ...]
    """Per option, the model's summed log-probability."""
    token_counts: tuple[int, ...]
    """Per option, the number of continuation tokens."""
    scores: tuple[float, ...]
    """Per option, the ranking score (``logprob / tokens`` when length normalized)."""
    pred: int
    """Index of the best-scored option (the first on ties)."""
    gold: int | None
    """Index of the right option; None for unlabeled examples."""


@dataclass(kw_only=True)
class TaskResult:
    """A task's evaluation: metrics (in percent) and per-example records."""

    task: str
    """The official task name."""
    metrics: dict[str, float]
    """Metric name -> value x 100 (leaderboard scale); empty when the examples are unlabeled."""
    num_examples: int
    """Number of scored examples (MultiRC: answer options, each scored on its own; ReCoRD:
    queries)."""
    seconds: float
    """Wall time of prompting, scoring and metrics."""
    shots: int
    """Few-shot examples per prompt."""
    normalize: bool
    """Whether options were ranked by per-token log-likelihood."""
    seed: int
    """The few-shot draw seed."""
    records: list[ExampleRecord] = field(default_factory=list)
    """Per-example records, in example order."""

    @property
    def predictions(self) -> list[int]:
        """The predicted option index of each example."""
        return [record.pred for record in self.records]

    @property
    def score(self) -> float | None:
        """The task's leaderboard score (mean of its two metrics where it has two)."""
        if not self.metrics:
            return None
        return task_score(self.task, self.metrics)


def evaluate(
    task: str | TaskSpec,
    examples: Sequence[Example],
    model: LogLikelihoodModel,
    tokenize: Tokenize,
    *,
    shots: int = 0,
    normalize: bool | None = None,
    train_examples: Sequence[Example] = (),
    seed: int = 1234,
    batch_size: int = 32,
) -> TaskResult:
    """Score ``examples`` of ``task`` with ``model`` and compute the task's official metrics.

    ``shots`` > 0 draws that many solved examples from ``train_examples`` per example
    (:func:`gkd_cli.superglue.prompts.fewshot_examples`). ``normalize`` None uses the task's
    default (:attr:`TaskSpec.normalize_by_default`). Requests go to the model ``batch_size``
    at a time, one request per example, in example order. Metrics are computed only when every
    example is labeled.
    """
    spec = get_task(task)
    if shots > 0 and not train_examples:
        raise ValueError(f"{spec.name}: --shots {shots} needs train examples to draw from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    normalize = spec.normalize_by_default if normalize is None else normalize
    started = time.perf_counter()

    prompts, texts, requests = [], [], []
    for example in examples:
        prompt = spec.prompt(example)
        shot_examples = fewshot_examples(spec.name, example, train_examples, shots, seed=seed)
        text = fewshot_prefix(spec.name, shot_examples) + prompt.context
        prompts.append(prompt)
        texts.append(text)
        requests.append(split_continuations(tokenize, text, prompt.options))

    results: list[list[OptionScore]] = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        answers = model.loglikelihood(batch)
        _check_answers(batch, answers)
        results.extend(answers)

    records = []
    for example, prompt, text, option_scores in zip(examples, prompts, texts, results, strict=True):
        scores = tuple(_rank_score(logprob, count, normalize) for logprob, count in option_scores)
        records.append(
            ExampleRecord(
                example_id=example.example_id,
                prompt=text,
                options=prompt.options,
                logprobs=tuple(float(logprob) for logprob, _ in option_scores),
                token_counts=tuple(int(count) for _, count in option_scores),
                scores=scores,
                pred=max(range(len(scores)), key=lambda i: (scores[i], -i)),
                gold=prompt.gold,
            )
        )

    metrics: dict[str, float] = {}
    if records and all(_is_labeled(example) for example in examples):
        fractions = spec.compute_metrics(
            examples,
            [record.pred for record in records],
            [-1 if record.gold is None else record.gold for record in records],
        )
        metrics = {name: 100.0 * value for name, value in fractions.items()}
    return TaskResult(
        task=spec.name,
        metrics=metrics,
        num_examples=len(records),
        seconds=time.perf_counter() - started,
        shots=shots,
        normalize=normalize,
        seed=seed,
        records=records,
    )


def _is_labeled(example: Example) -> bool:
    # ReCoRD carries answers rather than a label; a query whose answer is none of the entities is
    # still scored (its gold index is None, its F1/EM come from the answer texts).
    if isinstance(example, ReCoRDExample):
        return example.answers is not None
    return example.label is not None


def _rank_score(logprob: float, count: int, normalize: bool) -> float:
    if not normalize:
        return float(logprob)
    if count <= 0:
        raise ValueError(f"the model reported {count} continuation tokens; cannot length-normalize")
    return float(logprob) / count


def _check_answers(batch: list[Request], answers: list[list[OptionScore]]) -> None:
    if len(answers) != len(batch):
        raise ValueError(
            f"model.loglikelihood returned {len(answers)} results for {len(batch)} requests"
        )
    for (_, options), answer in zip(batch, answers, strict=True):
        if len(answer) != len(options):
            raise ValueError(
                f"model.loglikelihood returned {len(answer)} option scores for {len(options)} options"
            )
        for logprob, _ in answer:
            if math.isnan(logprob):
                raise ValueError("model.loglikelihood returned NaN")


def limit_examples(examples: Sequence[Example], limit: int) -> list[Example]:
    """The first ``limit`` examples; for MultiRC the first ``limit`` questions with all their
    answer options.

    MultiRC is read as one example per answer option, but its EM is per question (all options
    right), so cutting after ``limit`` options would score a partial question; and ``--limit``
    counts questions, as lm-evaluation-harness counts the documents it reads."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not examples or not isinstance(examples[0], MultiRCExample):
        return list(examples[:limit])
    kept: set = set()
    chosen = []
    for example in examples:
        key = example.question_key  # type: ignore[union-attr]
        if key not in kept:
            if len(kept) == limit:
                continue
            kept.add(key)
        chosen.append(example)
    return chosen


def evaluate_tasks(
    data_dir: Path | str,
    tasks: Sequence[str],
    model: LogLikelihoodModel,
    tokenize: Tokenize,
    *,
    split: str | None = None,
    shots: int = 0,
    normalize: bool | None = None,
    seed: int = 1234,
    limit: int | None = None,
    batch_size: int = 32,
) -> list[TaskResult]:
    """Read and evaluate several tasks from a data directory (the CLI's entry point).

    ``split`` None uses each task's :attr:`TaskSpec.eval_split`; shots come from ``train``.
    ``limit`` keeps the first ``limit`` examples of each task (MultiRC: questions, see
    :func:`limit_examples`).
    """
    results = []
    for name in tasks:
        spec = get_task(name)
        examples = read_task(data_dir, spec.name, split or spec.eval_split)
        if limit is not None:
            examples = limit_examples(examples, limit)
        train = read_task(data_dir, spec.name, "train") if shots > 0 else []
        results.append(
            evaluate(
                spec,
                examples,
                model,
                tokenize,
                shots=shots,
                normalize=normalize,
                train_examples=train,
                seed=seed,
                batch_size=batch_size,
            )
        )
    return results


class ScriptedModel:
    """A reference :class:`LogLikelihoodModel` that prefers options chosen by a script.

    ``choose(request_number, context_ids, option_ids) -> option index`` picks the preferred
    option of each request (``request_number`` counts requests across calls, from 0). That
    option gets log-probability 0; every other option -1 per token, so it also wins under length
    normalization. Requests are kept in :attr:`requests` for inspection.
    """

    def __init__(self, choose: Callable[[int, list[int], list[list[int]]], int]) -> None:
        self._choose = choose
        self.requests: list[Request] = []
        self.calls = 0

    @classmethod
    def always(cls, index: int) -> ScriptedModel:
        """Always prefer option ``index``."""
        return cls(lambda number, context, options: index)

    @classmethod
    def from_choices(cls, choices: Sequence[int]) -> ScriptedModel:
        """Prefer ``choices[i]`` for the i-th request."""
        return cls(lambda number, context, options: choices[number])

    def loglikelihood(self, requests: list[Request]) -> list[list[OptionScore]]:
        self.calls += 1
        answers = []
        for context, options in requests:
            chosen = self._choose(len(self.requests), context, options)
            self.requests.append((context, options))
            answers.append(
                [
                    (0.0 if i == chosen else -float(len(ids)), len(ids))
                    for i, ids in enumerate(options)
                ]
            )
        return answers
