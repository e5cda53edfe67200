"""SuperGLUE scoring: tokenization boundary, batching, normalization, scripted models."""

import json
import re
import string
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd_cli.superglue import ScriptedModel, evaluate, get_task, read_task, split_continuations
from gkd_cli.superglue.examples import BoolQExample, COPAExample

pytestmark = pytest.mark.unit

DATA_DIR = Path(__file__).parents[3] / "shared/data/superglue"
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"SuperGLUE data not found at {DATA_DIR} (../shared beside repo)"
)


def char_tokenize(text: str) -> list[int]:
    """One id per character (its code point): trivially invertible."""
    return [ord(ch) for ch in text]


def char_decode(ids: list[int]) -> str:
    return "".join(map(chr, ids))


class WordTokenizer:
    """Words with their leading whitespace as one token (`` yes``), like GPT-2's pre-tokenizer.

    A context ending in a space tokenizes differently alone (``[..., " "]``) than followed by a
    word (``[..., " yes"]``): the boundary case the evaluator must handle.
    """

    pattern = re.compile(r"\s*\S+|\s+")

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<s>": 0}

    def __call__(self, text: str, bos: bool = False) -> list[int]:
        ids = [0] if bos else []
        for piece in self.pattern.findall(text):
            ids.append(self.vocab.setdefault(piece, len(self.vocab)))
        return ids


# ---------------------------------------------------------------- tokenization boundary


def test_split_continuations_with_an_additive_tokenizer():
    context, continuations = split_continuations(char_tokenize, "Answer:", [" yes", " no"])
    assert context == char_tokenize("Answer:")
    assert continuations == [char_tokenize(" yes"), char_tokenize(" no")]


def test_split_continuations_moves_a_merged_boundary_into_the_continuation():
    tokenize = WordTokenizer()
    context, continuations = split_continuations(tokenize, "Q: ok? Answer: ", ["yes", "no"])
    # alone the context ends with a " " token; with an option that space merges into " yes"
    assert context == tokenize("Q: ok? Answer:")
    assert continuations == [tokenize(" yes"), tokenize(" no")]


@settings(max_examples=60, deadline=None)
@given(
    context=st.text(alphabet="ab .\n", min_size=1, max_size=12),
    options=st.lists(st.text(alphabet="ab .\n", min_size=1, max_size=6), min_size=1, max_size=4),
)
def test_split_continuations_concatenates_to_the_whole_tokenization(context, options):
    tokenize = WordTokenizer()

    def with_bos(text):
        return tokenize(text, bos=True)

    shared, continuations = split_continuations(with_bos, context, options)
    assert shared == with_bos(context)[: len(shared)]
    for option, continuation in zip(options, continuations, strict=True):
        assert shared + continuation == with_bos(context + option)
        assert continuation


def test_split_continuations_errors():
    with pytest.raises(ValueError, match="adds no token"):
        split_continuations(char_tokenize, "ctx", ["", " x"])
    with pytest.raises(ValueError, match="beginning-of-sequence"):
        split_continuations(WordTokenizer(), " ", ["a"])  # " " alone vs " a": nothing shared
    with pytest.raises(ValueError, match="at least one option"):
        split_continuations(char_tokenize, "ctx", [])


# ---------------------------------------------------------------- evaluate mechanics


def _boolq(n: int) -> list[BoolQExample]:
    return [
        BoolQExample(idx=i, question=f"q{i}", passage=f"passage {i}", label=i % 3 == 0)
        for i in range(n)
    ]


def test_one_request_per_example_in_order_and_batched():
    examples = _boolq(20)
    model = ScriptedModel.always(1)
    result = evaluate("BoolQ", examples, model, char_tokenize, batch_size=7)
    assert model.calls == 3  # 7 + 7 + 6
    assert len(model.requests) == 20
    for example, (context, options) in zip(examples, model.requests, strict=True):
        assert char_decode(context) == f"{example.passage}\nQuestion: {example.question}?\nAnswer:"
        assert [char_decode(o) for o in options] == [" no", " yes"]
    # always " yes": accuracy is the fraction of True labels (i % 3 == 0 for i < 20: 7 of 20)
    assert result.metrics == {"acc": pytest.approx(100 * 7 / 20)}
    assert result.predictions == [1] * 20
    assert result.num_examples == 20 and result.seconds >= 0


class FixedScores:
    """Option 0: -2.0 over 1 token; option 1: -3.0 over 6 tokens (better per token)."""

    def loglikelihood(self, requests):
        return [[(-2.0, 1), (-3.0, 6)] for _ in requests]


def test_length_normalization_changes_the_ranking_and_defaults_per_task():
    copa = [
        COPAExample(
            idx=i, premise="It rained.", choice1="A.", choice2="B.", question="effect", label=1
        )
        for i in range(4)
    ]
    raw = evaluate("COPA", copa, FixedScores(), char_tokenize, normalize=False)
    per_token = evaluate("COPA", copa, FixedScores(), char_tokenize, normalize=True)
    default = evaluate("COPA", copa, FixedScores(), char_tokenize)
    assert raw.predictions == [0] * 4 and raw.metrics["acc"] == 0.0
    assert per_token.predictions == [1] * 4 and per_token.metrics["acc"] == 100.0
    assert default.normalize is True and default.predictions == per_token.predictions
    assert per_token.records[0].scores == (-2.0, -0.5)
    assert evaluate("BoolQ", _boolq(2), FixedScores(), char_tokenize).normalize is False


def test_unlabeled_examples_get_predictions_but_no_metrics():
    examples = [BoolQExample(idx=i, question="q", passage="p", label=None) for i in range(3)]
    result = evaluate("BoolQ", examples, ScriptedModel.always(0), char_tokenize)
    assert result.metrics == {} and result.score is None
    assert result.predictions == [0, 0, 0] and result.records[0].gold is None


class WrongShape:
    def loglikelihood(self, requests):
        return [[(0.0, 1)] for _ in requests]


def test_a_model_returning_the_wrong_shape_is_reported():
    with pytest.raises(ValueError, match="1 option scores for 2 options"):
        evaluate("BoolQ", _boolq(2), WrongShape(), char_tokenize)


def test_fewshot_prompts_are_deterministic_and_prefix_the_context():
    train = _boolq(30)
    examples = [
        BoolQExample(idx=100 + i, question=f"x{i}", passage=f"eval {i}", label=True)
        for i in range(5)
    ]
    first = evaluate(
        "BoolQ",
        examples,
        ScriptedModel.always(0),
        char_tokenize,
        shots=3,
        train_examples=train,
        seed=7,
    )
    again = evaluate(
        "BoolQ",
        examples,
        ScriptedModel.always(0),
        char_tokenize,
        shots=3,
        train_examples=train,
        seed=7,
    )
    assert [r.prompt for r in first.records] == [r.prompt for r in again.records]
    for example, record in zip(examples, first.records, strict=True):
        blocks = record.prompt.split("\n\n")
        assert len(blocks) == 4  # three solved shots, then the evaluated context
        assert blocks[-1] == f"{example.passage}\nQuestion: {example.question}?\nAnswer:"
        for block in blocks[:3]:
            assert re.fullmatch(r"passage \d+\nQuestion: q\d+\?\nAnswer: (yes|no)", block)
    with pytest.raises(ValueError, match="needs train examples"):
        evaluate("BoolQ", examples, ScriptedModel.always(0), char_tokenize, shots=2)


# ---------------------------------------------------------------- real data, scripted models
#
# Gold answers below are derived from the raw JSON files, independently of the readers and
# prompt functions: the gold model decodes each option (character tokenizer) and picks the one
# whose text is the expected answer.


def _raw(task: str, split: str) -> list[dict]:
    lines = (DATA_DIR / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _raw_units(task: str, split: str) -> list[dict]:
    """One raw dict per scored unit: MultiRC answer options, ReCoRD queries, else lines."""
    units = []
    for line in _raw(task, split):
        if task == "MultiRC":
            for question in line["passage"]["questions"]:
                for answer in question["answers"]:
                    units.append({"key": (line["idx"], question["idx"]), "label": answer["label"]})
        elif task == "ReCoRD":
            text = line["passage"]["text"]
            entities = [text[e["start"] : e["end"] + 1] for e in line["passage"]["entities"]]
            for qa in line["qas"]:
                units.append(
                    {
                        "query": qa["query"],
                        "answers": [a["text"] for a in qa["answers"]],
                        "entities": entities,
                    }
                )
        else:
            units.append(line)
    return units


def _expected_answer(task: str, unit: dict) -> str:
    """The text of the right option, from the raw unit."""
    yes_no = {True: " yes", False: " no"}  # MultiRC labels 1/0 hash like True/False
    if task in ("BoolQ", "WiC", "WSC", "MultiRC"):
        return yes_no[unit["label"]]
    if task == "CB":
        return {"entailment": " True", "contradiction": " False", "neutral": " Neither"}[
            unit["label"]
        ]
    if task == "RTE":
        return {"entailment": " True", "not_entailment": " False"}[unit["label"]]
    if task == "COPA":
        choice = unit["choice1"] if unit["label"] == 0 else unit["choice2"]
        return choice[1:]  # compared without its (case-adjusted) first letter
    if task == "ReCoRD":
        return unit["query"].replace("@placeholder", unit["answers"][0])
    raise AssertionError(task)


def _gold_choice(task: str, unit: dict, options: list[str]) -> int:
    expected = _expected_answer(task, unit)
    if task == "COPA":
        matches = [i for i, option in enumerate(options) if option[2:] == expected]
    elif task == "ReCoRD":
        matches = [i for i, option in enumerate(options) if option == "  - " + expected]
    else:
        matches = [i for i, option in enumerate(options) if option == expected]
    assert matches, (task, expected, options)
    return matches[0]


EVAL_SPLITS = {
    "BoolQ": "val",
    "CB": "val",
    "COPA": "val",
    "MultiRC": "val",
    "ReCoRD": "dev32",
    "RTE": "val",
    "WiC": "val",
    "WSC": "val",
}


@needs_data
@pytest.mark.parametrize("task", list(EVAL_SPLITS))
def test_a_model_that_prefers_the_gold_option_scores_100(task):
    split = EVAL_SPLITS[task]
    units = _raw_units(task, split)

    def choose(number, context, options):
        return _gold_choice(task, units[number], [char_decode(o) for o in options])

    result = evaluate(task, read_task(DATA_DIR, task, split), ScriptedModel(choose), char_tokenize)
    assert result.num_examples == len(units)
    assert set(result.metrics) == set(get_task(task).metric_names)
    for name, value in result.metrics.items():
        assert value == pytest.approx(100.0), name
    assert result.score == pytest.approx(100.0)


def _squad_normalize(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return [word for word in text.split() if word not in ("a", "an", "the")]


def _squad_f1(prediction: str, gold: str) -> float:
    p, g = _squad_normalize(prediction), _squad_normalize(gold)
    common = sum((Counter(p) & Counter(g)).values())
    return 0.0 if common == 0 else 2 * common / (len(p) + len(g))


def _first_option_expectation(task: str, units: list[dict]) -> dict[str, float]:
    """Metrics (in percent) of always choosing option 0, from the raw labels."""
    n = len(units)
    if task in ("BoolQ", "WiC", "WSC"):  # option 0 is " no"
        return {"acc": 100 * sum(u["label"] is False for u in units) / n}
    if task == "COPA":
        return {"acc": 100 * sum(u["label"] == 0 for u in units) / n}
    if task == "RTE":  # option 0 is " True" = entailment
        return {"acc": 100 * sum(u["label"] == "entailment" for u in units) / n}
    if task == "CB":  # always entailment: F1 of entailment 2tp/(2tp+fp) = 2k/(n+k), others 0
        k = sum(u["label"] == "entailment" for u in units)
        return {"acc": 100 * k / n, "f1": 100 * (2 * k / (n + k)) / 3}
    if task == "MultiRC":  # always " no": no true positive, EM = questions with only wrong answers
        questions: dict = {}
        for unit in units:
            questions.setdefault(unit["key"], []).append(unit["label"])
        em = sum(all(label == 0 for label in labels) for labels in questions.values())
        return {"f1a": 0.0, "em": 100 * em / len(questions)}
    if task == "ReCoRD":  # option 0 is the first-mentioned entity
        em = f1 = 0.0
        for unit in units:
            first = unit["entities"][0]
            em += max(
                float(_squad_normalize(first) == _squad_normalize(a)) for a in unit["answers"]
            )
            f1 += max(_squad_f1(first, a) for a in unit["answers"])
        return {"f1": 100 * f1 / n, "em": 100 * em / n}
    raise AssertionError(task)


@needs_data
@pytest.mark.parametrize("task", list(EVAL_SPLITS))
def test_a_model_that_prefers_the_first_option_scores_the_first_option_rate(task):
    split = EVAL_SPLITS[task]
    expected = _first_option_expectation(task, _raw_units(task, split))
    result = evaluate(
        task, read_task(DATA_DIR, task, split), ScriptedModel.always(0), char_tokenize
    )
    assert result.metrics == pytest.approx(expected)
    assert set(result.predictions) == {0}


# ---------------------------------------------------------------- MultiRC: metric and --limit


def _multirc_file(path: Path) -> Path:
    """Two paragraphs, three questions, nine answer options (made up)."""

    def question(idx, labels):
        return {
            "idx": idx,
            "question": f"Question {idx}?",
            "answers": [
                {"idx": 10 * idx + k, "text": f"answer {k}", "label": label}
                for k, label in enumerate(labels)
            ],
        }

    lines = [
        {
            "idx": 0,
            "passage": {
                "text": "Paragraph zero.",
                "questions": [question(0, [1, 0, 1]), question(1, [0, 1])],
            },
        },
        {"idx": 1, "passage": {"text": "Paragraph one.", "questions": [question(2, [1, 1, 0, 0])]}},
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_multirc_f1a_and_em_through_the_evaluator_equal_the_definition(tmp_path):
    """F1a: binary F1 over all answer options pooled; EM: share of questions with every option
    right (Khashabi et al., 2018; SuperGLUE's scorer). Computed here by hand."""
    from gkd_cli.superglue import evaluate_tasks

    _multirc_file(tmp_path / "MultiRC" / "val.jsonl")
    # golds (yes=1):   q0: 1 0 1 | q1: 0 1 | q2: 1 1 0 0
    choices = [1, 1, 1, 0, 1, 1, 0, 0, 1]
    # q0: option 1 wrong; q1: right; q2: option 1 and 3 wrong.
    # pooled: tp = 2 (q0) + 1 (q1) + 1 (q2) = 4, fp = 1 (q0) + 1 (q2) = 2, fn = 1 (q2)
    # F1a = 2*4 / (2*4 + 2 + 1) = 8/11; EM = 1/3
    (result,) = evaluate_tasks(
        tmp_path, ["MultiRC"], ScriptedModel.from_choices(choices), char_tokenize
    )
    assert result.num_examples == 9
    assert result.metrics["f1a"] == pytest.approx(100 * 8 / 11)
    assert result.metrics["em"] == pytest.approx(100 / 3)
    # A model that always answers " no" scores F1a 0 and EM 0 whenever every question has a
    # correct option, as the real-model run did on its first 4 questions.
    (never,) = evaluate_tasks(tmp_path, ["MultiRC"], ScriptedModel.always(0), char_tokenize)
    assert never.metrics == {"f1a": 0.0, "em": 0.0}


def test_multirc_limit_counts_questions_with_all_their_options(tmp_path):
    from gkd_cli.superglue import evaluate_tasks

    _multirc_file(tmp_path / "MultiRC" / "val.jsonl")
    model = ScriptedModel.always(1)
    (result,) = evaluate_tasks(tmp_path, ["MultiRC"], model, char_tokenize, limit=2)
    # Questions 0 and 1 whole (3 + 2 options), not the first two answer options.
    assert [record.example_id for record in result.records] == [
        "0-0-0",
        "0-0-1",
        "0-0-2",
        "0-1-10",
        "0-1-11",
    ]
    # always yes: tp 3, fp 2, fn 0 -> F1a 6/8; no question all right -> EM 0
    assert result.metrics == {"f1a": pytest.approx(75.0), "em": 0.0}
    (one,) = evaluate_tasks(tmp_path, ["MultiRC"], model, char_tokenize, limit=1)
    assert one.num_examples == 3


@needs_data
def test_multirc_limit_on_the_real_validation_set():
    from gkd_cli.superglue import evaluate_tasks, limit_examples, read_task

    examples = read_task(DATA_DIR, "MultiRC", "val")
    kept = limit_examples(examples, 20)
    keys = list(dict.fromkeys(example.question_key for example in kept))
    assert len(keys) == 20
    # Every kept question has all its answer options, and nothing else was kept.
    assert kept == [example for example in examples if example.question_key in set(keys)]
    (result,) = evaluate_tasks(
        DATA_DIR, ["MultiRC"], ScriptedModel.always(1), char_tokenize, limit=20
    )
    golds = [example.label for example in kept]
    tp, fp = sum(golds), len(golds) - sum(golds)
    assert result.num_examples == len(kept) > 20
    assert result.metrics["f1a"] == pytest.approx(100 * 2 * tp / (2 * tp + fp))
    assert result.metrics["em"] == pytest.approx(
        100 * sum(all(e.label for e in kept if e.question_key == key) for key in keys) / 20
    )
    # Other tasks: the first N examples.
    assert (
        limit_examples(read_task(DATA_DIR, "CB", "val"), 5) == read_task(DATA_DIR, "CB", "val")[:5]
    )
