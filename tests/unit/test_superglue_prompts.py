"""SuperGLUE prompts, verbalizers and few-shot draws."""

from pathlib import Path

import pytest

from gkd_cli.superglue import prompts, readers
from gkd_cli.superglue.examples import (
    BoolQExample,
    CBExample,
    COPAExample,
    EntitySpan,
    MultiRCExample,
    ReCoRDExample,
    WiCExample,
    WSCExample,
)

pytestmark = pytest.mark.unit

DATA_DIR = Path(__file__).parents[3] / "shared/data/superglue"
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"SuperGLUE data not found at {DATA_DIR} (../shared beside repo)"
)


def test_boolq_prompt_format():
    example = BoolQExample(
        idx=0, question="is the sky blue", passage="Sky -- It is blue.", label=True
    )
    prompt = prompts.boolq_prompt(example)
    assert prompt.context == "Sky -- It is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert prompt.options[prompt.gold] == " yes"
    assert prompts.boolq_prompt(
        BoolQExample(idx=0, question="really?", passage="p", label=False)
    ).context.endswith("Question: really?\nAnswer:")


@pytest.mark.parametrize(
    ("label", "word"),
    [("entailment", " True"), ("contradiction", " False"), ("neutral", " Neither")],
)
def test_cb_verbalizer(label, word):
    prompt = prompts.cb_prompt(CBExample(idx=0, premise="P.", hypothesis="h", label=label))
    assert prompt.context == "P.\nQuestion: h. True, False, or Neither?\nAnswer:"
    assert prompt.options[prompt.gold] == word


def test_copa_connectors_and_lowercased_choices():
    example = COPAExample(
        idx=0,
        premise="The man turned on the faucet.",
        choice1="The toilet filled.",
        choice2="I saw water.",
        question="effect",
        label=1,
    )
    prompt = prompts.copa_prompt(example)
    assert prompt.context == "The man turned on the faucet therefore"
    assert prompt.options == (" the toilet filled.", " I saw water.")
    cause = prompts.copa_prompt(
        COPAExample(
            idx=1, premise="It broke.", choice1="A", choice2="B", question="cause", label=None
        )
    )
    assert cause.context == "It broke because" and cause.gold is None


def test_multirc_prompt_closes_with_the_question_of_correctness():
    example = MultiRCExample(
        paragraph_idx=0,
        question_idx=1,
        answer_idx=2,
        paragraph="Para.",
        question="Why?",
        answer="Because.",
        label=False,
    )
    prompt = prompts.multirc_prompt(example)
    assert prompt.context == "Para.\nQuestion: Why?\nAnswer: Because.\nIs the answer correct?"
    assert prompt.options == (" no", " yes") and prompt.gold == 0


def _record_example(answers):
    passage = "Paris met Rome in Oslo.\n@highlight\nParis won\n@highlight\nRome lost"
    spans = [(0, 5), (10, 14), (18, 22), (0, 5)]
    return ReCoRDExample(
        passage_idx=0,
        query_idx=0,
        source="CNN",
        passage=passage,
        entities=tuple(EntitySpan(start=s, end=e, text=passage[s:e]) for s, e in spans),
        query="@placeholder was happy",
        answers=answers,
    )


def test_record_one_option_per_distinct_entity():
    prompt = prompts.record_prompt(_record_example(("Oslo",)))
    assert prompt.context == "Paris met Rome in Oslo.\n\n  - Paris won.\n  - Rome lost.\n"
    assert prompt.options == (
        "  - Paris was happy",
        "  - Rome was happy",
        "  - Oslo was happy",
    )
    assert prompt.gold == 2
    assert prompts.record_prompt(_record_example(None)).gold is None


def test_wic_prompt_quotes_the_word_as_in_sentence1():
    example = WiCExample(
        idx=0,
        word="run",
        sentence1="They ran home.",
        sentence2="A run.",
        start1=5,
        end1=8,
        start2=2,
        end2=5,
        label=True,
    )
    prompt = prompts.wic_prompt(example)
    assert "Is the word 'ran' used in the same way" in prompt.context
    assert prompt.options[prompt.gold] == " yes"


@pytest.mark.parametrize(
    ("text", "index", "span", "marked"),
    [
        ("Mark told Pete lies . He was wrong .", 5, "He", "Mark told Pete lies. *He* was wrong."),
        ('She asked " where is him ," he said', 5, "him", 'She asked " where is *him*," he said'),
        ('took it from him," she said', 3, "him", 'took it from *him*," she said'),
        ("they might use it , but", 2, "it", "they might use *it*, but"),  # index one off
        ("the lemon trees , but they", 1, "lemon trees", "the *lemon trees*, but they"),
        ("nothing to mark here", 1, "she", "nothing to mark here"),
    ],
)
def test_mark_pronoun(text, index, span, marked):
    assert prompts.mark_pronoun(text, index, span) == marked


def test_wsc_prompt_format():
    example = WSCExample(
        idx=0,
        text="Mark told Pete lies . He was wrong .",
        span1_index=0,
        span1_text="Mark",
        span2_index=5,
        span2_text="He",
        label=True,
    )
    prompt = prompts.wsc_prompt(example)
    assert prompt.context == (
        "Passage: Mark told Pete lies. *He* was wrong.\n"
        'Question: In the passage above, does the pronoun "*He*" refer to "*Mark*"?\nAnswer:'
    )
    assert prompt.options[prompt.gold] == " yes"


def test_verbalizer_tokens_cover_every_fixed_option():
    words = prompts.verbalizer_tokens()
    for expected in (
        " yes",
        "yes",
        " no",
        "no",
        " True",
        "True",
        " False",
        "False",
        " Neither",
        "Neither",
    ):
        assert expected in words
    assert words == sorted(set(words))
    assert prompts.verbalizer_tokens(["COPA"]) == []
    assert prompts.verbalizer_tokens(["CB"]) == sorted(
        [" True", " False", " Neither", "True", "False", "Neither"]
    )
    with pytest.raises(ValueError, match="unknown SuperGLUE task"):
        prompts.verbalizer_tokens(["GLUE"])


@needs_data
def test_every_real_option_of_fixed_verbalizer_tasks_is_in_verbalizer_tokens():
    words = set(prompts.verbalizer_tokens())
    for task in ("BoolQ", "CB", "RTE", "WiC", "WSC"):
        for example in readers.read_task(DATA_DIR, task, "dev32"):
            assert set(prompts.PROMPTS[task](example).options) <= words


def _boolq_pool(size: int) -> list[BoolQExample]:
    return [
        BoolQExample(idx=i, question=f"q{i}", passage=f"p{i}", label=i % 2 == 0)
        for i in range(size)
    ]


def test_fewshot_draws_are_deterministic_and_seed_dependent():
    pool = _boolq_pool(40)
    target = BoolQExample(idx=999, question="target", passage="t", label=True)
    first = prompts.fewshot_examples("BoolQ", target, pool, 5, seed=1)
    again = prompts.fewshot_examples("BoolQ", target, list(pool), 5, seed=1)
    assert first == again
    assert len(set(first)) == 5 and all(shot in pool for shot in first)
    draws = {
        tuple(e.idx for e in prompts.fewshot_examples("BoolQ", target, pool, 5, seed=s))
        for s in range(6)
    }
    assert (
        len(draws) > 1
    )  # 6 seeds, C(40, 5) possible draws: equal draws would mean the seed is ignored


def test_fewshot_never_draws_the_evaluated_example_and_differs_per_example():
    pool = _boolq_pool(6)
    for example in pool:
        shots = prompts.fewshot_examples("BoolQ", example, pool, 5, seed=0)
        assert example not in shots and len(shots) == 5
    per_example = {
        tuple(e.idx for e in prompts.fewshot_examples("BoolQ", x, _boolq_pool(30), 3, seed=0))
        for x in _boolq_pool(30)[:10]
    }
    assert len(per_example) > 1


def test_fewshot_prefix_format_and_errors():
    pool = _boolq_pool(3)
    prefix = prompts.fewshot_prefix("BoolQ", pool[:2])
    assert prefix == ("p0\nQuestion: q0?\nAnswer: yes\n\np1\nQuestion: q1?\nAnswer: no\n\n")
    assert prompts.fewshot_prefix("BoolQ", []) == ""
    unlabeled = [BoolQExample(idx=i, question="q", passage="p", label=None) for i in range(5)]
    with pytest.raises(ValueError, match="needs 2 labeled"):
        prompts.fewshot_examples("BoolQ", pool[0], unlabeled, 2, seed=0)
    with pytest.raises(ValueError, match="shots must be"):
        prompts.fewshot_examples("BoolQ", pool[0], pool, -1, seed=0)


# lm-evaluation-harness 0.4.13, lm_eval/tasks/super_glue/{task}/default.yaml: doc_to_text and
# doc_to_choice (a choice follows the context after target_delimiter " "), verbatim.
HARNESS_TEMPLATES = {
    "BoolQ": ("{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"]),
    "CB": (
        "{{premise}}\nQuestion: {{hypothesis}}. True, False, or Neither?\nAnswer:",
        ["True", "False", "Neither"],
    ),
    "RTE": ("{{premise}}\nQuestion: {{hypothesis}} True or False?\nAnswer:", ["True", "False"]),
    "WiC": (
        "Sentence 1: {{sentence1}}\nSentence 2: {{sentence2}}\nQuestion: Is the word '{{sentence1[start1:end1]}}' "
        "used in the same way in the two sentences above?\nAnswer:",
        ["no", "yes"],
    ),
}
# The hub's label ids (aps/super_glue) of the official files' labels.
HUB_LABELS = {
    "BoolQ": {False: 0, True: 1},
    "CB": {"entailment": 0, "contradiction": 1, "neutral": 2},
    "RTE": {"entailment": 0, "not_entailment": 1},
    "WiC": {False: 0, True: 1},
}


@needs_data
@pytest.mark.parametrize("task", list(HARNESS_TEMPLATES))
def test_prompts_equal_lm_evaluation_harness_templates_on_real_examples(task):
    """The exact strings lm-evaluation-harness scores, rendered from its task templates (Jinja2,
    as the harness does) on the first 50 validation examples: gkd's context equals doc_to_text,
    its options equal target_delimiter + doc_to_choice, its gold index the hub's label."""
    import json

    import jinja2

    text_template, choices = HARNESS_TEMPLATES[task]
    template = jinja2.Environment(keep_trailing_newline=True).from_string(text_template)
    examples = readers.read_task(DATA_DIR, task, "val")[:50]
    lines = (DATA_DIR / task / "val.jsonl").read_text(encoding="utf-8").splitlines()[:50]
    for example, line in zip(examples, lines, strict=True):
        doc = json.loads(line)
        prompt = prompts.PROMPTS[task](example)
        assert prompt.context == template.render(**doc)
        assert prompt.options == tuple(" " + choice for choice in choices)
        assert prompt.gold == HUB_LABELS[task][doc["label"]]


@needs_data
def test_copa_prompts_equal_lm_evaluation_harness_except_for_a_capital_i():
    """lm_eval/tasks/super_glue/copa/utils.py (0.4.13), verbatim in behaviour: the premise minus
    its last character, the connector, and each choice with its first letter lowercased. gkd
    keeps "I" (and all-caps words) capitalized; every other option is the same string."""
    import json

    examples = readers.read_task(DATA_DIR, "COPA", "val")
    lines = (DATA_DIR / "COPA" / "val.jsonl").read_text(encoding="utf-8").splitlines()
    compared = 0
    for example, line in zip(examples, lines, strict=True):
        doc = json.loads(line)
        prompt = prompts.copa_prompt(example)
        connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
        assert prompt.context == doc["premise"].strip()[:-1] + f" {connector}"
        for option, choice in zip(prompt.options, (doc["choice1"], doc["choice2"]), strict=True):
            if (
                choice.split(" ", 1)[0] == "I"
                or choice.startswith("I'")
                or choice.split(" ", 1)[0].isupper()
            ):
                assert option == " " + choice
            else:
                assert option == " " + choice[0].lower() + choice[1:]
                compared += 1
    assert compared > 150
