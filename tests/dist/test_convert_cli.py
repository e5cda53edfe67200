"""``gkd convert import-hf`` (2 workers through torchrun's Python API) then ``export-hf`` (its own
process) on a tiny GPT-2 with a tokenizer: transformers loads the export and gives the original
logits; the tokenizer travels along."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from gkd_cli.data.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("gpt2")
    train_bpe([REPO / "gkd_cli/assets/demo_corpus.txt"], 300, folder / "tokenizer.json")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0)
    )
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


def test_import_then_export_through_the_cli(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from gkd_cli.convert import convert_app
    from gkd_cli.data.tokenizer import load_tokenizer, train_bpe
    from gkd_cli.vocab.mapping import write_mapping_arrays

    ckpt = tmp_path / "ckpt"
    result = CliRunner().invoke(
        convert_app, ["import-hf", str(gpt2_dir), "--out", str(ckpt), "--tp", "2"],
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert result.exit_code == 0, result.output
    assert "GPT2LMHeadModel" in result.output and "wrote" in result.output
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["source"] == "hf" and meta["layout"]["tp"] == 2 and meta["arch"]["vocab_size"] == 300
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()

    # A copy of the checkpoint posing as a student trained on a compressed vocabulary: its 300
    # ids are the first 300 of a 400-id tokenizer, the rest map to <unk> (id 2).
    compressed_ckpt = tmp_path / "compressed_ckpt"
    shutil.copytree(ckpt, compressed_ckpt)
    original = train_bpe([REPO / "gkd_cli/assets/demo_corpus.txt"], 400, tmp_path / "tok400" / "tokenizer.json")
    assert original.vocab_size == 400
    orig_to_comp = np.where(np.arange(400) < 300, np.arange(400), 2)
    write_mapping_arrays(compressed_ckpt / "vocab_mapping.safetensors", orig_to_comp, np.arange(300), {})

    out, out_compressed = tmp_path / "exported", tmp_path / "exported_compressed"
    script = (
        "import sys, json; from gkd_cli.convert import convert_app\n"
        "codes = [convert_app(args, standalone_mode=False) for args in json.loads(sys.argv[1])]\n"
        "print('codes', json.dumps(codes))"
    )
    commands = [
        ["export-hf", str(ckpt), "--out", str(out)],
        ["export-hf", str(compressed_ckpt), "--out", str(out_compressed), "--tokenizer", str(tmp_path / "tok400")],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0 and "codes [null, null]" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("wrote") == 2
    assert (out / "tokenizer.json").read_bytes() == (gpt2_dir / "tokenizer.json").read_bytes()
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
    assert torch.equal(got, expected)

    # Compressed vocabulary: the model's ids are compressed ids, so no root tokenizer.json; the
    # compressed tokenizer and the mapping travel along.
    config = json.loads((out_compressed / "config.json").read_text())
    assert config["gkd_vocab_mapping"] == "vocab_mapping.safetensors" and config["gkd_original_vocab_size"] == 400
    assert not (out_compressed / "tokenizer.json").exists()
    compressed = load_tokenizer(out_compressed / config["gkd_tokenizer"])
    assert compressed.is_compressed and compressed.vocab_size == 300
    # Generation stops at the compressed end-of-document id; the BPE tokenizer adds no BOS.
    assert config["eos_token_id"] == compressed.eos_id and config["bos_token_id"] is None
    text = "the quick brown fox"
    assert compressed.encode(text) == [int(orig_to_comp[i]) for i in original.encode(text)]
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out_compressed).eval()(tokens).logits
    assert torch.equal(got, expected)

