"""``gkd eval superglue`` against transformers, on a model converted from transformers.

A tiny random Llama is built with transformers from a config (offline) with a tokenizer whose
``tokenizer.json`` post-processor puts ``<s>`` in front of every text (as Llama's does), imported
with ``gkd convert import-hf``, and scored with ``gkd eval superglue --predictions`` on real
SuperGLUE examples (``../shared/data/superglue``; skipped without it), once with the tokenizer's
convention (the default) and once with ``--no-add-bos``.

The reference is independent of gkd: transformers' own tokenizer (``AutoTokenizer``) encodes the
prompt and ``prompt + option`` strings that gkd reports (with and without its special tokens),
the continuation is the whole encoding after the prompt's (lm-evaluation-harness's
``_encode_pair``), and its log-likelihood is the sum of ``log_softmax`` of the transformers model
run in float64. gkd scores in float32 (CPU): per option the sums agree within ``ATOL`` (prompts of
up to ~1000 tokens, a few option tokens; the float32 rounding seen is ~1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist.test_convert_hf import _randomize

REPO = Path(__file__).resolve().parents[2]
SUPERGLUE = REPO.parent / "shared" / "data" / "superglue"
ASSETS = REPO / "gkd_cli" / "assets"
TASKS = "boolq,cb,copa,multirc,rte,wic"
ATOL = 2e-4

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not SUPERGLUE.is_dir(), reason=f"needs the SuperGLUE data at {SUPERGLUE}"),
]


def gkd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("GKD_SUPERGLUE_DIR", None)
    result = subprocess.run(
        [sys.executable, "-m", "gkd_cli.app", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def build_llama(folder: Path) -> None:
    """A random Llama (GQA, untied, RoPE) and a byte-level BPE whose post-processor adds ``<s>``."""
    import transformers
    from tokenizers import processors

    from gkd_cli.data import train_bpe

    hf = train_bpe([ASSETS / "demo_corpus.txt"], 300, None)._backend.tokenizer
    hf.add_special_tokens(["<s>"])
    bos = hf.token_to_id("<s>")
    hf.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    folder.mkdir(parents=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            }
        )
    )
    config = transformers.LlamaConfig(
        vocab_size=bos + 1,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    _randomize(model, seed=3)
    model.save_pretrained(folder)


def reference_logprobs(
    model, tokenizer, prompt: str, option: str, special: bool
) -> tuple[float, int]:
    """transformers' log-likelihood of ``option`` after ``prompt`` (float64) and its token count."""
    context = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    whole = tokenizer(prompt + option, add_special_tokens=special)["input_ids"]
    assert whole[: len(context)] == context  # no merge across the boundary in these prompts
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    total = sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole)))
    return total, len(whole) - len(context)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-vs-hf")
    build_llama(root / "hf")
    start = time.perf_counter()
    gkd("convert", "import-hf", str(root / "hf"), "--out", str(root / "ckpt"), cwd=root)
    seconds = {"import-hf": time.perf_counter() - start}
    outputs = {}
    for name, flags in (("default", ()), ("no-bos", ("--no-add-bos",))):
        out = root / f"{name}.json"
        start = time.perf_counter()
        result = gkd(
            "eval",
            "superglue",
            str(root / "ckpt"),
            "--data",
            str(SUPERGLUE),
            "--tasks",
            TASKS,
            "--limit",
            "2",
            "--predictions",
            "--out",
            str(out),
            *flags,
            cwd=root,
        )
        seconds[f"eval {name}"] = time.perf_counter() - start
        outputs[name] = (json.loads(out.read_text()), result.stdout)
    print("wall seconds:", {k: round(v, 1) for k, v in seconds.items()})
    return root, outputs


@pytest.mark.parametrize("name", ["default", "no-bos"])
def test_option_logprobs_equal_transformers_on_the_same_strings(runs, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, outputs = runs
    document, stdout = outputs[name]
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    model = AutoModelForCausalLM.from_pretrained(root / "hf", torch_dtype=torch.float64).eval()
    special = name == "default"  # the tokenizer's convention is to add <s>
    # The console and the results say which prefix was used.
    if special:
        assert "prompts start with '<s>' (id 300) (the tokenizer's convention" in stdout
        assert document["settings"]["prompt_prefix"] == ["<s>"]
    else:
        assert "prompts start with no special token (--no-add-bos)" in stdout
        assert document["settings"]["prompt_prefix"] == []
    worst, scored = 0.0, 0
    for task, entry in document["tasks"].items():
        assert entry["predictions"], task
        for prediction in entry["predictions"]:
            reference = [
                reference_logprobs(model, tokenizer, prediction["prompt"], option, special)
                for option in prediction["options"]
            ]
            assert prediction["tokens"] == [count for _, count in reference], task
            for got, (want, _) in zip(prediction["logprobs"], reference, strict=True):
                worst = max(worst, abs(got - want))
                scored += 1
            best = max(
                range(len(reference)),
                key=lambda i: (
                    reference[i][0] / (reference[i][1] if entry["normalize"] else 1),
                    -i,
                ),
            )
            assert prediction["pred"] == best, task
    print(f"{name}: {scored} options, max |gkd - transformers| = {worst:.2e}")
    assert scored > 30 and worst < ATOL


def test_the_prefix_changes_the_scores(runs):
    """The two runs differ by far more than the tolerance: the comparison above sees the prefix."""
    _, outputs = runs
    with_bos, without = outputs["default"][0]["tasks"], outputs["no-bos"][0]["tasks"]
    gap = max(
        abs(a - b)
        for task in with_bos
        for p, q in zip(with_bos[task]["predictions"], without[task]["predictions"], strict=True)
        for a, b in zip(p["logprobs"], q["logprobs"], strict=True)
    )
    assert gap > 100 * ATOL
    # --limit 2 on MultiRC keeps two whole questions (all their answer options).
    multirc = with_bos["MultiRC"]["predictions"]
    assert len({tuple(p["id"].split("-")[:2]) for p in multirc}) == 2 and len(multirc) > 2
