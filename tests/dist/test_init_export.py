"""Fresh random initialization, seen from outside gkd: export to Hugging Face and compare.

One gloo rank builds every supported architecture (GPT-2 style tied and untied, Llama with
grouped-query attention, Llama with biases, Qwen2 q/k/v biases, Qwen3 q/k norms), fills every
parameter with NaN and runs :func:`parallel.init_weights.init_layout_independent`; GPT-2, Llama,
Qwen2 and Qwen3 are written as gkd checkpoints and ``gkd convert export-hf`` (one subprocess, the
CLI's code path) writes Hugging Face folders. The checks, by Hugging Face tensor name, against independent references:

* transformers' own initialization of the same ``config.json`` (``_init_weights``: norms 1,
  biases 0, matrices and embeddings N(0, 0.02)); GPT-2's also scales the residual output
  projections ``c_proj`` to 0.02 / sqrt(2 L), megatron's convention, which gkd uses for Llama's
  ``o_proj`` / ``down_proj`` too (transformers' Llama leaves those at 0.02);
* every constant is exact (norm gains exactly 1, biases exactly 0), every random tensor has mean
  ~0 and the expected std within 10 % (>= 2048 draws: the sampling error of a std is 1.6 %);
* ``config.json``'s ``bos_token_id`` / ``eos_token_id`` equal what transformers' tokenizer
  loaded from the same folder says, and the ids the tokenizer itself adds.

A second test enumerates the sharded-state-dict keys megatron-core produces for each
architecture (plus LayerNorm with q/k norms, which has norm biases) and checks that every one
has a declared value kind and that no parameter is left uninitialized.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_ranks

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
LAYERS, HIDDEN, HEADS, VOCAB = 3, 64, 4, 304
STD = 0.02
COMMON = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, vocab_size=VOCAB)
# name -> (ModelArch factory, overrides, tokenizer case)
ARCHS = {
    "gpt2": ("gpt2", dict(max_seq_len=64), "plain"),
    "llama": ("llama", dict(num_query_groups=2), "bos_template"),
    "qwen2": ("llama", dict(num_query_groups=2, add_qkv_bias=True, tie_embeddings=True), "own_config"),
    "qwen3": ("llama", dict(num_query_groups=2, qk_layernorm=True, kv_channels=32), "plain"),
}
# Only their megatron keys are checked (exports of the variants above would add little but time);
# LayerNorm with q/k norms is a valid gkd student without a Hugging Face counterpart.
KEYS_ONLY = {
    "gpt2_untied": ("gpt2", dict(max_seq_len=64, tie_embeddings=False), None),
    "llama_bias": ("llama", dict(num_query_groups=2, add_bias_linear=True), None),
    "layernorm_qk_norm": ("gpt2", dict(max_seq_len=64, qk_layernorm=True), None),
}


def _arch(factory: str, overrides: dict):
    from parallel.config import ModelArch

    return getattr(ModelArch, factory)(**COMMON, **overrides)


def _init_job(root: str) -> dict:
    """One rank: build, NaN-fill, initialize, save each architecture; report the sharded keys,
    their kinds and whether any parameter kept a NaN."""
    from megatron.core import parallel_state as ps

    from parallel.checkpoint import save_model_weights
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize
    from parallel.init_weights import _leaves, init_layout_independent, value_kind
    from parallel.model import build_gpt

    initialize(ParallelConfig(), seed=0)
    report: dict = {}
    for name, (factory, overrides, tokenizer) in {**ARCHS, **KEYS_ONLY}.items():
        arch = _arch(factory, overrides)
        model = build_gpt(arch, params_dtype=torch.float32, perform_initialization=False)
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))
        init_layout_independent(model, seed=5, num_layers=arch.num_layers, std=STD)
        keys = sorted({leaf.key for leaf in _leaves(model.sharded_state_dict())})
        report[name] = {
            "kinds": {key: value_kind(key) for key in keys},
            "nan_parameters": [n for n, p in model.named_parameters() if torch.isnan(p).any()],
        }
        if tokenizer is not None:
            save_model_weights(Path(root) / name, model=model, meta={"arch": vars(arch)})
    ps.destroy_model_parallel()
    return report


def _tokenizers(root: Path) -> dict[str, Path]:
    """``plain``: gkd's byte-level BPE (no BOS, ``<|endoftext|>`` ends documents);
    ``bos_template``: the same plus ``<s>`` that its post-processor puts before every text;
    ``own_config``: that one with a ``tokenizer_config.json`` naming ``<s>`` and ``<unk>`` as
    BOS and EOS (the shipped config wins over gkd's guesses)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    from gkd_cli.data import train_bpe

    plain = root / "tok_plain" / "tokenizer.json"
    train_bpe([REPO / "gkd_cli/assets/demo_corpus.txt"], 300, plain)
    raw = Tokenizer.from_file(str(plain))
    raw.add_special_tokens(["<s>"])
    raw.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", raw.token_to_id("<s>"))]
    )
    for case in ("bos_template", "own_config"):
        (root / f"tok_{case}").mkdir()
        raw.save(str(root / f"tok_{case}" / "tokenizer.json"))
    (root / "tok_own_config" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<unk>"})
    )
    return {"plain": plain, "bos_template": root / "tok_bos_template", "own_config": root / "tok_own_config"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("init_export")
    start = time.perf_counter()
    (report,) = run_on_ranks(_init_job, 1, str(root))
    tokenizers = _tokenizers(root)
    commands = [
        ["export-hf", str(root / name), "--out", str(root / f"hf_{name}"), "--tokenizer", str(tokenizers[case])]
        for name, (_, _, case) in ARCHS.items()
    ]
    script = (
        "import sys, json; from gkd_cli.convert import convert_app\n"
        "codes = [convert_app(args, standalone_mode=False) for args in json.loads(sys.argv[1])]\n"
        "print('codes', json.dumps(codes))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0 and f"codes {json.dumps([None] * len(commands))}" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    print(f"init + save + {len(commands)} exports: {time.perf_counter() - start:.1f} s")
    return root, report, tokenizers


def _kind(tensor: torch.Tensor) -> str:
    if torch.all(tensor == 1):
        return "ones"
    if torch.all(tensor == 0):
        return "zeros"
    return "random"


@pytest.mark.parametrize("name", list(ARCHS))
def test_fresh_init_exported_to_hf_matches_transformers_init(exported, name):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    root, _, _ = exported
    folder = root / f"hf_{name}"
    got = load_file(str(folder / "model.safetensors"))
    config = AutoConfig.from_pretrained(folder)
    assert config.initializer_range == STD  # transformers' reference draws with gkd's std
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config).state_dict()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(got) == set(reference) - tied

    scaled = STD / math.sqrt(2 * LAYERS)
    norms = biases = 0
    for hf_name, tensor in got.items():
        expected_kind = _kind(reference[hf_name])
        assert _kind(tensor) == expected_kind, f"{hf_name}: {_kind(tensor)}, transformers: {expected_kind}"
        norms += expected_kind == "ones"
        biases += hf_name.endswith(".bias")
        if expected_kind != "random":
            continue
        residual_out = hf_name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight"))
        expected_std = scaled if residual_out else STD
        if config.model_type == "gpt2":  # transformers' GPT-2 init is megatron's convention
            assert abs(reference[hf_name].std().item() - expected_std) < 0.1 * expected_std, hf_name
        assert tensor.numel() >= 2048
        assert abs(tensor.std().item() - expected_std) < 0.1 * expected_std, (hf_name, tensor.std().item())
        assert abs(tensor.mean().item()) < 0.1 * expected_std, hf_name
    # Two norms per layer plus the final one (Qwen3: plus q and k norms); every bias zero.
    assert norms == 2 * LAYERS + 1 + (2 * LAYERS if name == "qwen3" else 0)
    assert biases == {"gpt2": 4, "qwen2": 3}.get(name, 0) * LAYERS + (
        2 * LAYERS + 1 if name.startswith("gpt2") else 0  # GPT-2's LayerNorm biases
    )
    # transformers loads the folder as written (nothing missing that it would initialize itself).
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[hf_name], tensor) for hf_name, tensor in got.items())


@pytest.mark.parametrize("name", list(ARCHS))
def test_exported_config_token_ids_are_the_tokenizers(exported, name):
    from transformers import AutoConfig, AutoTokenizer

    from gkd_cli.data.tokenizer import load_tokenizer

    root, _, tokenizers = exported
    case = ARCHS[name][2]
    folder = root / f"hf_{name}"
    config = AutoConfig.from_pretrained(folder)
    raw_config = json.loads((folder / "config.json").read_text())
    assert "bos_token_id" in raw_config and "eos_token_id" in raw_config
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config.eos_token_id == hf_tokenizer.eos_token_id
    assert config.bos_token_id == hf_tokenizer.bos_token_id
    gkd_tokenizer = load_tokenizer(tokenizers[case])
    first = hf_tokenizer("the cat").input_ids[0]
    if case == "plain":
        assert config.eos_token_id == gkd_tokenizer.eos_id == gkd_tokenizer.token_to_id("<|endoftext|>")
        assert config.bos_token_id is None and first != gkd_tokenizer.eos_id  # adds no BOS
    elif case == "bos_template":
        assert config.bos_token_id == gkd_tokenizer.token_to_id("<s>") == first  # the BOS it adds
        assert config.eos_token_id == gkd_tokenizer.eos_id
    else:  # the shipped tokenizer_config.json names the tokens
        assert config.bos_token_id == gkd_tokenizer.token_to_id("<s>")
        assert config.eos_token_id == gkd_tokenizer.token_to_id("<unk>") != gkd_tokenizer.token_to_id("<|endoftext|>")


def test_every_megatron_key_has_a_declared_value_kind(exported):
    """The initializer decides every key megatron-core produces (an unknown one raises), and
    every parameter is written (NaN-filled before, none left after)."""
    from parallel.init_weights import value_kind

    _, report, _ = exported
    assert set(report) == {*ARCHS, *KEYS_ONLY}
    for name, entry in report.items():
        assert entry["nan_parameters"] == [], name
        kinds = entry["kinds"]
        for key, kind in kinds.items():
            leaf = key.rsplit(".", 1)[-1]
            if "norm" in key:  # norm gains 1, norm biases 0, whatever megatron calls them
                assert kind == ("zeros" if leaf.endswith("bias") else "ones"), (name, key, kind)
            elif leaf == "bias":
                assert kind == "zeros", (name, key, kind)
            else:
                assert kind in ("normal", "scaled"), (name, key, kind)
        fused = [k for k in kinds if k.endswith(("layer_norm_weight", "layer_norm_bias"))]
        assert len(fused) == (4 if name.startswith(("gpt2", "layernorm")) else 2), (name, fused)
    assert "decoder.layers.self_attention.q_layernorm.bias" in report["layernorm_qk_norm"]["kinds"]
    assert "output_layer.weight" in report["gpt2_untied"]["kinds"]
    assert report["llama_bias"]["kinds"]["decoder.layers.mlp.linear_fc2.bias"] == "zeros"
    with pytest.raises(KeyError, match="no value kind"):
        value_kind("decoder.layers.mlp.router.weight")
