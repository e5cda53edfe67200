"""``gkd eval lm-eval`` against lm-evaluation-harness's own ``hf`` model, on local task files.

A tiny random Llama with a tokenizer that puts ``<s>`` in front of every text (built with
transformers, :func:`tests.e2e.test_eval_vs_transformers.build_llama`) is imported with
``gkd convert import-hf``. Three lm-eval tasks are written as YAMLs over local JSON lines
(``dataset_path: json``; the Hugging Face hub is not reachable): a multiple-choice task
(``loglikelihood``), a wikitext-style ``loglikelihood_rolling`` task whose documents span several
rolling windows (``max_length`` 32), and a ``generate_until`` task (greedy).

The reference is independent of gkd: ``lm_eval.models.huggingface.HFLM`` on the transformers
weights, float32, same ``max_length``. gkd runs once in one process through lm-eval's Python API
(``simple_evaluate(model="gkd")``, TP=1) and once through the CLI at TP=2 (torchrun, gloo). Per
example the log-likelihoods (and per-window sums) agree within ``ATOL``, the is_greedy flags and
the generated texts are equal, and so are the task metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it

from typer.testing import CliRunner  # noqa: E402

from tests.e2e.test_eval_vs_transformers import build_llama  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "gkd_cli" / "assets"
TASKS = ["tiny_mc", "tiny_wiki", "tiny_gen"]
MAX_LENGTH = 32
ATOL = 1e-4
EXPECTED = {  # examples per task; the TP=2 run has --limit 5
    "tp1": {"tiny_mc": 6, "tiny_wiki": 3, "tiny_gen": 3},
    "tp2": {"tiny_mc": 5, "tiny_wiki": 3, "tiny_gen": 3},
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_tasks(folder: Path) -> Path:
    """Three lm-eval task YAMLs over JSON-lines files in ``folder``."""
    folder.mkdir(parents=True)
    sentences = (ASSETS / "demo_corpus.txt").read_text(encoding="utf-8").split(" . ")
    mc = []
    for i in range(6):
        words = sentences[i].split()
        choices = [" ".join(words[8:11]), " ".join(words[11:13]), "the town", "a saloon singer"]
        mc.append({"question": " ".join(words[:8]), "choices": choices, "answer": i % 4})
    docs = [{"text": " . ".join(sentences[10 + 2 * i : 12 + 2 * i])} for i in range(3)]
    prompts = [{"prompt": sentences[20 + i][:60], "target": "x"} for i in range(3)]
    for name, rows in (("mc", mc), ("wiki", docs), ("gen", prompts)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def task(name: str, data: str, body: str) -> None:
        head = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {folder / data}\ntest_split: test\n"
        )
        (folder / f"{name}.yaml").write_text(head + textwrap.dedent(body))

    task(
        "tiny_mc",
        "mc.jsonl",
        """\
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: choices
        doc_to_target: answer
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """,
    )
    task(
        "tiny_wiki",
        "wiki.jsonl",
        """\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
            aggregation: weighted_perplexity
            higher_is_better: false
        """,
    )
    task(
        "tiny_gen",
        "gen.jsonl",
        """\
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{target}}"
        generation_kwargs:
          until: ["."]
          max_gen_toks: 6
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """,
    )
    return folder


def env() -> dict[str, str]:
    return {
        **os.environ,
        **OFFLINE,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "COLUMNS": "200",
    }


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env(), cwd=cwd, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


SINGLE_PROCESS = """
import json, sys
import lm_eval
import gkd_cli.lm_eval_model  # registers "gkd"
from gkd_cli.lm_eval_worker import _jsonable
from lm_eval.tasks import TaskManager
ckpt, tasks, out, max_length = sys.argv[1:5]
results = lm_eval.simple_evaluate(
    model="gkd", model_args=f"checkpoint={ckpt},max_length={max_length},batch_size=16",
    tasks=TASK_NAMES, task_manager=TaskManager(include_path=tasks, include_defaults=False),
    log_samples=True, bootstrap_iters=0,
)
json.dump(_jsonable({k: results[k] for k in ("results", "samples")}), open(out, "w"))
""".replace("TASK_NAMES", repr(TASKS))


def reference(hf: Path, tasks: Path) -> dict:
    """lm-eval's own hf model on the transformers weights."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gkd_cli.lm_eval_worker import _jsonable

    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    model = HFLM(
        pretrained=str(hf), max_length=MAX_LENGTH, dtype="float32", batch_size=8, device="cpu"
    )
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    return _jsonable({k: results[k] for k in ("results", "samples")})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    build_llama(root / "hf")
    tasks = write_tasks(root / "tasks")
    run(["-m", "gkd_cli.app", "convert", "import-hf", str(root / "hf"), "--out", "ckpt"], root)
    (root / "single.py").write_text(SINGLE_PROCESS)
    run(["single.py", "ckpt", str(tasks), "tp1.json", str(MAX_LENGTH)], root)
    cli = run(
        [
            "-m", "gkd_cli.app", "eval", "lm-eval", "ckpt", "--tasks", ",".join(TASKS),
            "--include-path", str(tasks), "--tp", "2", "--max-length", str(MAX_LENGTH),
            "--limit", "5", "--log-samples", "--out", "tp2.json",
        ],
        root,
    )  # fmt: skip
    outputs = {name: json.loads((root / f"{name}.json").read_text()) for name in ("tp1", "tp2")}
    return root, reference(root / "hf", tasks), outputs, cli.stdout


def _values(response):
    """A response of lm-eval's samples: [logprob, is_greedy], [logprob] or [text]."""
    value = response[0] if isinstance(response, list) else response
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_examples_equal_lm_evals_hf_model(runs, layout):
    _, want, outputs, _ = runs
    got = outputs[layout]
    worst, compared = 0.0, {}
    for task in TASKS:
        reference = {s["doc_id"]: s for s in want["samples"][task]}
        samples = got["samples"][task]
        assert len(samples) == EXPECTED[layout][task], task
        compared[task] = len(samples)
        for sample in samples:
            ref = reference[sample["doc_id"]]
            assert len(sample["resps"]) == len(ref["resps"]), task
            for mine, theirs in zip(sample["resps"], ref["resps"], strict=True):
                a, b = _values(mine), _values(theirs)
                if isinstance(b[0], str):
                    assert a == b, (task, sample["doc_id"])  # greedy generation, same text
                    continue
                worst = max(worst, abs(a[0] - b[0]))
                assert a[1:] == b[1:], (task, sample["doc_id"])  # is_greedy
            for metric in ("acc", "exact_match"):
                if metric in ref:
                    assert sample[metric] == ref[metric], (task, metric)
    print(f"{layout}: {compared} examples, max |gkd - hf| = {worst:.2e}")
    assert worst < ATOL
    if layout == "tp1":  # all examples: the task metrics are equal too
        for task in TASKS:
            for key, value in want["results"][task].items():
                if key.split(",")[0] in ("acc", "exact_match"):
                    assert got["results"][task][key] == value, (task, key)
                elif key.startswith("word_perplexity,"):
                    assert got["results"][task][key] == pytest.approx(value, rel=1e-5)


def test_rolling_documents_span_several_windows(runs):
    """The rolling task really crosses window boundaries (else the windowing goes untested)."""
    root, _, outputs, stdout = runs
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(root / "hf" / "tokenizer.json"))
    samples = outputs["tp1"]["samples"]["tiny_wiki"]
    lengths = [len(tokenizer.encode(s["doc"]["text"]).ids) for s in samples]
    assert min(lengths) > MAX_LENGTH, lengths  # two windows or more each
    assert "tiny_mc" in stdout and "wrote tp2.json" in stdout


# --------------------------------------------------------------------------- bad input


def _cli(args: list[str]):
    from gkd_cli.app import app

    return CliRunner().invoke(app, args)


def test_unknown_task_is_refused_before_any_worker(runs):
    root, *_ = runs
    result = _cli(
        ["eval", "lm-eval", str(root / "ckpt"), "--tasks", "tiny_mc,no_such_task",
         "--include-path", str(root / "tasks"), "--out", str(root / "bad.json")]
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "unknown lm-eval task(s) no_such_task" in result.output
    assert not (root / "bad.json").exists() and not (root / "bad.logs").exists()


def test_missing_include_path_is_refused(runs, tmp_path):
    root, *_ = runs
    result = _cli(
        ["eval", "lm-eval", str(root / "ckpt"), "--tasks", "tiny_mc",
         "--include-path", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--include-path" in result.output and "no such directory" in result.output


def test_lm_eval_not_installed_names_the_extra(runs, tmp_path, monkeypatch):
    root, *_ = runs
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing fails, find_spec gives None
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = _cli(
        ["eval", "lm-eval", str(root / "ckpt"), "--tasks", "tiny_mc",
         "--out", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "pip install 'gkd[lm-eval]'" in " ".join(result.output.split())
    monkeypatch.delitem(sys.modules, "gkd_cli.lm_eval_model", raising=False)
    from gkd_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"pip install 'gkd\[lm-eval\]'"):
        import gkd_cli.lm_eval_model  # noqa: F401
