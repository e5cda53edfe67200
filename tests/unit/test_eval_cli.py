"""``gkd eval superglue`` through CliRunner with the launcher patched: the launch plan and job it
builds, defaults (tokenizer from the checkpoint, data from $GKD_SUPERGLUE_DIR), the printed
table, ``--compare``, and input errors as one red line with exit code 2. Also the worker's
vocabulary hook and tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from gkd_cli import eval as eval_cli
from gkd_cli import launch
from gkd_cli.eval_worker import EvalJob, find_vocab_mapping, make_tokenize, vocabulary_hook
from gkd_cli.superglue import ScriptedModel, evaluate_tasks, load_results, save_results
from tests.dist.test_eval_scoring import train_tokenizer, write_superglue

pytestmark = pytest.mark.unit

runner = CliRunner()
ARCH = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300, max_seq_len=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def tokenize(tokenizer):
    from gkd_cli.data import load_tokenizer

    return make_tokenize(load_tokenizer(tokenizer), None)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_superglue(tmp_path / "superglue")


def fake_checkpoint(folder: Path, **meta) -> Path:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"arch": ARCH, **meta}))
    (folder / "manifest.json").write_text(json.dumps({"files": {}}))
    return folder


@pytest.fixture
def checkpoint(tmp_path, tokenizer) -> Path:
    return fake_checkpoint(
        tmp_path / "run" / "checkpoints" / "step_0000004", tokenizer=str(tokenizer)
    )


@pytest.fixture
def launched(monkeypatch):
    """Patch ``run_local``: record the plan, and do what the workers would with a scripted model
    that always prefers option 0."""
    plans = []

    def fake_run_local(plan):
        plans.append(plan)
        job = EvalJob.load(plan.args[plan.args.index("--spec") + 1])
        from gkd_cli.data import load_tokenizer

        tok = load_tokenizer(job.tokenizer)
        results = evaluate_tasks(
            job.data_dir,
            job.tasks,
            ScriptedModel.always(0),
            make_tokenize(tok, None),
            split=job.split,
            shots=job.shots,
            limit=job.limit,
        )
        save_results(job.out, results, model=job.model_name, include_predictions=job.predictions)

    monkeypatch.setattr(launch, "run_local", fake_run_local)
    monkeypatch.delenv(eval_cli.DATA_ENV, raising=False)
    return plans


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(eval_cli.eval_app, ["superglue", *args], env=env)


def test_evaluates_a_checkpoint_with_its_tokenizer_and_writes_results(
    launched, checkpoint, tokenizer, data, tmp_path
):
    out = tmp_path / "res" / "sg.json"
    result = invoke(
        str(checkpoint.parent.parent),
        "--tasks",
        "cb,COPA",
        "--tp",
        "2",
        "--limit",
        "3",
        "--out",
        str(out),
        "--predictions",
        env={eval_cli.DATA_ENV: str(data)},
    )
    assert result.exit_code == 0, result.output
    (plan,) = launched
    assert (
        plan.entry_module == "gkd_cli.eval_worker" and plan.nproc_per_node == 2 and plan.nnodes == 1
    )
    assert Path(plan.log_dir) == out.parent / "sg.logs"
    job = EvalJob.load(Path(plan.log_dir) / "job.json")
    assert job.checkpoint == str(checkpoint.resolve())  # the newest checkpoint of the run
    assert job.tokenizer == str(tokenizer.resolve()) and job.data_dir == str(data.resolve())
    assert job.tasks == ["CB", "COPA"] and job.tp == 2 and job.limit == 3 and job.predictions
    assert job.model_name == "run@step_0000004"
    document = load_results(out)
    assert list(document["tasks"]) == ["CB", "COPA"] and document["tasks"]["CB"]["n"] == 3
    # The table and the average line.
    for text in ("CB", "COPA", "acc", "SuperGLUE average: n/a"):
        assert text in result.output
    # Option 0 always: the synthetic CB labels are entailment, contradiction, neutral.
    assert document["tasks"]["CB"]["metrics"]["acc"] == pytest.approx(100 / 3)


def test_all_tasks_and_default_split(launched, checkpoint, data, tmp_path):
    result = invoke(str(checkpoint), "--data", str(data), "--out", str(tmp_path / "r.json"))
    # The synthetic folder lacks most tasks: the first missing one is named, before launching.
    assert result.exit_code == 2 and not launched
    assert "MultiRC" in result.output and "val.jsonl does not exist" in result.output


def test_compare_two_results_files(launched, tmp_path, data, tokenize):
    a = evaluate_tasks(data, ["CB", "COPA"], ScriptedModel.always(0), tokenize)
    b = evaluate_tasks(data, ["CB", "COPA"], ScriptedModel.always(1), tokenize)
    save_results(tmp_path / "a.json", a, model="teacher")
    save_results(tmp_path / "b.json", b, model="student")
    result = invoke("--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert result.exit_code == 0, result.output
    assert not launched  # no model to run
    assert "teacher" in result.output and "student" in result.output
    # COPA: option 0 is right on all three synthetic examples, option 1 on none.
    copa_line = next(line for line in result.output.splitlines() if "COPA" in line)
    assert "100.0" in copa_line and "-100.0" in copa_line


def test_compare_a_checkpoint_with_a_results_file(launched, checkpoint, data, tmp_path, tokenize):
    results = evaluate_tasks(data, ["CB"], ScriptedModel.always(1), tokenize)
    save_results(tmp_path / "b.json", results, model="b")
    out = tmp_path / "cmp.json"
    result = invoke(
        "--compare",
        str(checkpoint),
        str(tmp_path / "b.json"),
        "--tasks",
        "cb",
        "--data",
        str(data),
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert len(launched) == 1 and (tmp_path / "cmp.a.json").is_file()
    assert "vs b" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "--data", "{data}"], "does not exist"),
        (["{ckpt}", "--tasks", "boolq,nope", "--data", "{data}"], "unknown SuperGLUE task 'nope'"),
        (["{ckpt}"], "pass --data DIR"),
        (["{ckpt}", "--data", "{missing}"], "no such directory"),
        (["{ckpt}", "--data", "{data}", "--tp", "3"], "not divisible by parallel.tp=3"),
        (["{ckpt}", "--data", "{data}", "--split", "dev"], "--split 'dev' is not one of"),
        (["{ckpt}", "--data", "{data}", "--tasks", "cb", "--shots", "-1"], "--shots must be >= 0"),
        (["{ckpt}", "--data", "{data}", "--tasks", "cb", "--seq-length", "65"], "--seq-length 65"),
        ([], "give a CHECKPOINT"),
        (["{ckpt}", "--compare", "{data}", "{data}"], "not both"),
        (["--compare", "{missing}.json", "{ckpt}", "--data", "{data}"], "does not exist"),
        (["{tmp}", "--data", "{data}"], "no complete gkd checkpoint"),
    ],
)
def test_bad_input_is_one_red_line_and_exit_code_2(
    launched, checkpoint, data, tmp_path, args, message
):
    values = {
        "ckpt": str(checkpoint),
        "data": str(data),
        "missing": str(tmp_path / "nope"),
        "tmp": str(tmp_path),
    }
    result = invoke(*(a.format(**values) for a in args))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.strip().startswith("error:") and not launched


def test_tokenizer_falls_back_to_the_run_config(launched, tmp_path, tokenizer, data):
    run = tmp_path / "run"
    folder = fake_checkpoint(run / "checkpoints" / "step_0000002")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": str(tokenizer)}}))
    result = invoke(
        str(run), "--tasks", "cb", "--data", str(data), "--out", str(tmp_path / "o.json")
    )
    assert result.exit_code == 0, result.output
    assert EvalJob.load(Path(launched[0].log_dir) / "job.json").tokenizer == str(
        tokenizer.resolve()
    )
    (run / "config.yaml").unlink()
    result = invoke(str(folder), "--tasks", "cb", "--data", str(data))
    assert result.exit_code == 2 and "pass --tokenizer" in result.output


def test_tokenizer_larger_than_the_model_is_refused(launched, tmp_path, data):
    big = train_tokenizer(tmp_path / "big.json", vocab_size=400)
    folder = fake_checkpoint(tmp_path / "ckpt", tokenizer=str(big))
    result = invoke(str(folder), "--tasks", "cb", "--data", str(data))
    assert result.exit_code == 2 and "vocab_size=300" in result.output


# ---------------------------------------------------------------------------------------------
# the worker's tokenization and vocabulary hook
# ---------------------------------------------------------------------------------------------


def _mapping(path: Path) -> Path:
    """300 original ids; ids 0..199 kept in slots 0..199, slots 200..255 padding, ids 200..299
    replaced by the kept id 100 below them."""
    from gkd_cli.vocab.mapping import write_mapping_arrays

    orig_to_comp = np.concatenate([np.arange(200), np.arange(100, 200)])
    comp_to_orig = np.concatenate([np.arange(200), -np.ones(56, dtype=np.int64)])
    write_mapping_arrays(path, orig_to_comp, comp_to_orig, {})
    return path


def test_compressed_vocabulary_remaps_ids_and_excludes_padding_slots(tmp_path, tokenizer):
    from gkd_cli.data import load_tokenizer

    tok = load_tokenizer(tokenizer)
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    assert find_vocab_mapping(step) is None
    mapping = _mapping(run / "vocab_mapping.safetensors")
    assert find_vocab_mapping(step) == mapping
    map_ids, excluded = vocabulary_hook(tok, 256, mapping)
    assert map_ids([0, 5, 199, 250, 299]) == [0, 5, 199, 150, 199]
    assert excluded.tolist() == list(range(200, 256))
    tokenize = make_tokenize(tok, map_ids, [tok.eos_id])
    text = "Question: what is it?"
    raw = [tok.eos_id, *tok.encode(text)]
    assert tokenize(text) == [i if i < 200 else i - 100 for i in raw]
    with pytest.raises(ValueError, match="vocab_size=128"):
        vocabulary_hook(tok, 128, mapping)
    # Without a mapping the ids are the tokenizer's, after the prefix.
    assert vocabulary_hook(tok, 300, None) == (None, None)
    assert make_tokenize(tok, None, [tok.eos_id])(text) == raw and raw[0] == tok.eos_id
    assert make_tokenize(tok, None)(text) == raw[1:]


def _hf_folder(
    folder: Path, source: Path, *, bos_post_processor: bool, tokenizer_class: str
) -> Path:
    """``source`` plus a ``<s>`` token, with or without a post-processor putting it first."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    hf = HFTokenizer.from_file(str(source))
    hf.add_special_tokens(["<s>"])
    if bos_post_processor:
        bos = hf.token_to_id("<s>")
        hf.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    folder.mkdir(parents=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": tokenizer_class,
                "bos_token": "<s>",
                "eos_token": "<|endoftext|>",
            }
        )
    )
    return folder


@pytest.mark.parametrize(
    ("bos_post_processor", "tokenizer_class"),
    [
        (True, "PreTrainedTokenizerFast"),
        (False, "PreTrainedTokenizerFast"),
        (False, "GPT2TokenizerFast"),
    ],
)
def test_prompts_are_tokenized_as_transformers_tokenizes_them(
    tmp_path, tokenizer, bos_post_processor, tokenizer_class
):
    """The default prefix is the tokenizer's own: the ids equal transformers' ``tokenizer(text)``
    (what lm-evaluation-harness's hf model encodes). Before 2026-12 every prompt got the
    end-of-document token instead."""
    from transformers import AutoTokenizer

    from gkd_cli.data import load_tokenizer
    from gkd_cli.eval_worker import prompt_prefix

    folder = _hf_folder(
        tmp_path / "hf",
        tokenizer,
        bos_post_processor=bos_post_processor,
        tokenizer_class=tokenizer_class,
    )
    tok = load_tokenizer(folder)
    reference = AutoTokenizer.from_pretrained(folder)
    prefix = prompt_prefix(tok, None)
    assert prefix.tokens == (("<s>",) if bos_post_processor else ())
    assert "the tokenizer's convention" in prefix.reason and "post-processor" in prefix.reason
    for text in ("Is the answer correct? yes", "The cat sat.\nQuestion: True or False?\nAnswer:"):
        assert make_tokenize(tok, None, prefix.ids)(text) == reference(text)["input_ids"]
    # Explicit choices: --no-add-bos nothing; --add-bos the BOS token (named by the config when
    # the post-processor adds none).
    assert prompt_prefix(tok, False).ids == ()
    bos = prompt_prefix(tok, True)
    assert bos.tokens == ("<s>",) and bos.ids == (reference.bos_token_id,)
    assert "'<s>' (id 300)" in bos.describe()


def test_add_bos_without_a_bos_token_uses_the_end_of_document_token(tokenizer):
    """gkd's own BPE has no BOS: --add-bos puts its end-of-document token first (as
    lm-evaluation-harness's prefix_token_id falls back to EOS); the default adds nothing."""
    from gkd_cli.data import load_tokenizer
    from gkd_cli.eval_worker import prompt_prefix

    tok = load_tokenizer(tokenizer)
    assert prompt_prefix(tok, None).ids == ()
    eos = prompt_prefix(tok, True)
    assert eos.ids == (tok.eos_id,) and eos.tokens == ("<|endoftext|>",)
    assert "no BOS token" in eos.reason


def test_sentencepiece_convention_is_its_bos_piece_unless_the_config_says_otherwise(tmp_path):
    """A bare SentencePiece model with a BOS piece gets it (Hugging Face's LlamaTokenizer default);
    ``add_bos_token: false`` in tokenizer_config.json beside it turns that off."""
    import io

    spm = pytest.importorskip("sentencepiece")
    from gkd_cli.data import load_tokenizer
    from gkd_cli.eval_worker import prompt_prefix

    buffer = io.BytesIO()
    text = (
        (Path(eval_cli.__file__).parent / "assets" / "demo_corpus.txt")
        .read_text()
        .splitlines()[:500]
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buffer,
        vocab_size=150,
        model_type="bpe",
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(buffer.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    prefix = prompt_prefix(tok, None)
    assert prefix.ids == (processor.bos_id(),) and prefix.tokens == ("<s>",)
    assert make_tokenize(tok, None, prefix.ids)("Hello") == processor.encode("Hello", add_bos=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    off = prompt_prefix(load_tokenizer(tmp_path / "tokenizer.model"), None)
    assert off.ids == () and "add_bos_token" in off.reason
