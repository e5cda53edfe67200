"""GGUF import (``parallel.hf.gguf``, ``gkd convert import-gguf``) against transformers' own GGUF
loader: tiny Llama (grouped-query attention, untied, Q/K rows permuted by llama.cpp) and Qwen2
(q/k/v biases, tied) files with F32, F16, Q8_0 and Q4_1 tensors (``tests/gguf_models.py``).

* The Hugging Face folder written from the GGUF gives transformers' logits of the GGUF itself
  (``from_pretrained(dir, gguf_file=...)``) within 1e-5, also when dequantized in small blocks.
* Its ``tokenizer.json`` tokenizes like transformers' GGUF tokenizer and like the trained original;
  gkd's own tokenizer loader reads it with the GGUF's end-of-text token; the chat template renders.
* Bad input is refused with one red line before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to read GGUF

from gkd_cli.convert import convert_app  # noqa: E402
from parallel.hf.gguf import inspect_gguf, unpermute_rows, write_hf_folder  # noqa: E402
from tests.gguf_models import (  # noqa: E402
    SPECIALS,
    llama_cpp_permute,
    reference_logits,
    write_gguf,
)

pytestmark = pytest.mark.unit

runner = CliRunner()
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2023, 17 models scored 91.5 points!",
    "  two  spaces\n\nand new lines\tand tabs",
    "<|im_start|>user\nIs it true?<|im_end|>",
    "Ünïcödé – “quotes” 日本語 emoji 🙂",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    facts = {}
    for kind in ("llama", "qwen2"):
        path = root / kind / f"{kind}.gguf"
        path.parent.mkdir()
        facts[kind] = dict(write_gguf(path, kind, seed=3), path=path)
    return facts


def test_unpermute_inverts_llama_cpp_permutation():
    rows = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    assert np.array_equal(unpermute_rows(llama_cpp_permute(rows, 4), 4), rows)
    # a block of whole heads unpermutes on its own (the streaming reader works per block)
    permuted = llama_cpp_permute(rows, 4)
    blocks = [unpermute_rows(permuted[i : i + 16], 2) for i in (0, 16)]
    assert np.array_equal(np.concatenate(blocks), rows)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("block_bytes", [16 << 20, 300], ids=["one-block", "small-blocks"])
def test_hf_folder_gives_transformers_gguf_logits(files, tmp_path, kind, block_bytes):
    from transformers import AutoModelForCausalLM

    facts = files[kind]
    model = inspect_gguf(facts["path"])
    assert model.quantization.keys() == {"F32", "F16", "Q8_0", "Q4_1"}
    assert model.config["tie_word_embeddings"] == (kind == "qwen2")
    out = write_hf_folder(model, tmp_path / "hf", block_bytes=block_bytes)
    tokens = torch.randint(0, facts["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(facts["path"], tokens)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ours(tokens).logits.double()
    assert ref.abs().max() > 0.5  # not a near-zero comparison
    assert (logits - ref).abs().max().item() < 1e-5


def test_tokenizer_matches_transformers_gguf_tokenizer(files, tmp_path):
    from transformers import AutoTokenizer

    from gkd_cli.data.tokenizer import load_tokenizer

    path = files["llama"]["path"]
    out = write_hf_folder(inspect_gguf(path), tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(out)
    gkd = load_tokenizer(out)
    for text in SAMPLES:
        expected = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == expected, text
        assert gkd.encode(text) == expected, text
        assert ours.decode(expected) == text
    assert gkd.eos_id == ours.eos_token_id == 2 and ours.bos_token == SPECIALS[1]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["eos_token"] == SPECIALS[2]
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"
    assert len(ours("<|im_start|>")["input_ids"]) == 1  # control tokens stay whole


# ---------------------------------------------------------------------------------------------
# bad input: one red line, exit code 2, nothing written
# ---------------------------------------------------------------------------------------------


def _refused(tmp_path, gguf_file, *words, args=()):
    out = tmp_path / "out"
    result = runner.invoke(convert_app, ["import-gguf", str(gguf_file), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") or lines[0].startswith("error: "), result.output
    for word in words:
        assert word in result.output, result.output
    assert not out.exists()
    assert not list(tmp_path.glob(".gkd-gguf-*"))  # no staging left behind
    return result


def test_refuses_unsupported_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", architecture="falcon")
    _refused(tmp_path, path, "general.architecture='falcon'", "llama, qwen2, qwen3")


def test_refuses_missing_tokenizer(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", tokenizer=False)
    _refused(tmp_path, path, "has no tokenizer", "tokenizer.ggml.tokens")


def test_refuses_sentencepiece_tokenizer_by_name(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", tokenizer_model="llama")
    _refused(tmp_path, path, "tokenizer.ggml.model='llama'", "SentencePiece", "gpt2")


def test_refuses_truncated_file(files, tmp_path):
    data = files["llama"]["path"].read_bytes()
    path = tmp_path / "m.gguf"
    path.write_bytes(data[: len(data) - 1000])
    _refused(tmp_path, path, "truncated")
    path.write_bytes(data[:100])  # cut inside the metadata
    _refused(tmp_path, path, "truncated")


def test_refuses_quantization_type_gguf_cannot_dequantize(files, tmp_path, monkeypatch):
    import gguf

    original = gguf.quants.dequantize

    def no_q4_1(data, qtype):  # an older gguf package without Q4_1
        if qtype == gguf.GGMLQuantizationType.Q4_1:
            raise NotImplementedError("Q4_1")
        return original(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", no_q4_1)
    _refused(tmp_path, files["llama"]["path"], "Q4_1", "blk.0.ffn_")


def test_refuses_layouts_that_do_not_divide(files, tmp_path):
    path = files["llama"]["path"]
    _refused(
        tmp_path, path, "num_key_value_heads=2", "--tp=4", "valid --tp values", args=["--tp", "4"]
    )
    _refused(
        tmp_path, path, "num_hidden_layers=2", "--pp=3", "valid --pp values", args=["--pp", "3"]
    )


def test_refuses_not_a_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_text("{}")
    _refused(tmp_path, path, "is not a GGUF file")


def test_real_teacher_config_describes_smollm2():
    """gkd_cli/configs/smollm2_student.yaml (scripts/real_teacher.sh): SmolLM2-135M's published
    shape (30 x 576, 9 heads / 3 key/value heads, MLP 1536, 49152 tokens, tied: 134.5M
    parameters) and a student on the compressed vocabulary."""
    from gkd_cli.config import load_config

    path = Path(__file__).resolve().parents[2] / "gkd_cli" / "configs" / "smollm2_student.yaml"
    config = load_config(path, check_paths=False)
    teacher = config.teacher.arch()
    assert (teacher.num_layers, teacher.hidden_size, teacher.query_groups) == (30, 576, 3)
    assert teacher.ffn_size == 1536 and teacher.tie_embeddings and teacher.rotary_base == 100000
    assert round(config.teacher.num_parameters() / 1e6, 1) == 134.5
    assert config.student.vocab_size == 8192 and config.data.vocab_mapping
