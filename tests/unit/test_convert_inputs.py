"""config.json -> ModelArch, ModelArch -> config.json, and clear errors on bad Hugging Face folders
(all before any weight is read; no torch needed for the checks themselves)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from parallel.config import ModelArch
from parallel.hf.files import inspect_hf_dir
from parallel.hf.spec import (
    SUPPORTED_ARCHITECTURES,
    HFConversionError,
    hf_architecture_for,
    hf_config_for,
    is_hf_dir,
    spec_from_config,
)

pytestmark = pytest.mark.unit

# Public config.json files of well-known models (abridged to the fields that matter).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
GPT2 = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
    "layer_norm_epsilon": 1e-05,
    "activation_function": "gelu_new",
}


def test_llama3_maps_to_grouped_query_rope_arch():
    spec = spec_from_config(LLAMA3_8B)
    a = spec.arch
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.query_groups) == (32, 4096, 32, 8)
    assert (a.ffn_size, a.vocab_size, a.head_dim) == (14336, 128256, 128)
    assert a.rotary_base == 500000 and a.norm_epsilon == 1e-5
    assert (a.normalization, a.activation, a.position_embedding) == ("RMSNorm", "swiglu", "rope")
    assert not (a.tie_embeddings or a.add_bias_linear or a.add_qkv_bias or a.qk_layernorm)
    assert spec.dtype == "bfloat16" and spec.family.name == "llama"


def test_transformers5_rope_parameters_are_read():
    config = {k: v for k, v in LLAMA3_8B.items() if k not in ("rope_theta", "rope_scaling")}
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    assert spec_from_config(config).arch.rotary_base == 250000


def test_mistral_sliding_window_is_kept_not_capped():
    """Sliding-window attention is built (ModelArch.sliding_window), so the sequence length is
    no longer capped at the window (issue 16: never silently capped)."""
    spec = spec_from_config(MISTRAL_7B_V01)
    assert spec.arch.max_seq_len == 32768 and spec.arch.sliding_window == 4096
    no_window = dict(MISTRAL_7B_V01, sliding_window=None)
    assert spec_from_config(no_window).arch.max_seq_len == 32768
    assert spec_from_config(no_window).arch.sliding_window is None


def test_qwen2_has_qkv_bias_and_tied_embeddings():
    a = spec_from_config(QWEN2_05B).arch
    assert a.add_qkv_bias and not a.add_bias_linear and a.tie_embeddings
    assert a.max_seq_len == 32768  # use_sliding_window is false
    assert a.sliding_window is None
    assert a.rotary_base == 1000000 and a.query_groups == 2


def test_qwen3_has_qk_norm_and_explicit_head_dim():
    a = spec_from_config(QWEN3_06B).arch
    assert a.qk_layernorm and a.head_dim == 128 and a.kv_channels == 128
    assert a.hidden_size // a.num_attention_heads == 64  # head_dim differs from hidden/heads


def test_gpt2_maps_to_learned_positions_and_tanh_gelu():
    spec = spec_from_config(GPT2)
    a = spec.arch
    assert spec.mlp_activation == "gelu_tanh" and a.activation in ("gelu", "gelu_tanh")
    assert (a.position_embedding, a.normalization, a.max_seq_len) == ("learned", "LayerNorm", 1024)
    assert a.tie_embeddings and a.add_bias_linear and a.ffn_size == 3072


@pytest.mark.parametrize(
    "config, words",
    [
        (
            dict(LLAMA3_8B, architectures=["FalconForCausalLM"]),
            ["FalconForCausalLM", *SUPPORTED_ARCHITECTURES],
        ),
        ({k: v for k, v in LLAMA3_8B.items() if k != "architectures"}, ["architectures"]),
        (
            dict(LLAMA3_8B, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            ["rope_type", "llama3"],
        ),
        (dict(LLAMA3_8B, attention_bias=True), ["biases", "q/k/v and o_proj"]),
        (dict(LLAMA3_8B, hidden_act="gelu"), ["hidden_act"]),
        (dict(GPT2, scale_attn_by_inverse_layer_idx=True), ["scale_attn_by_inverse_layer_idx"]),
        (dict(LLAMA3_8B, num_key_value_heads=7), ["num_key_value_heads=7"]),
        ({k: v for k, v in LLAMA3_8B.items() if k != "hidden_size"}, ["hidden_size"]),
    ],
)
def test_unsupported_configs_fail_clearly(config, words):
    with pytest.raises(HFConversionError) as err:
        spec_from_config(config)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "arch, expected",
    [
        (
            ModelArch.gpt2(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=500),
            "GPT2LMHeadModel",
        ),
        (
            ModelArch.llama(
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                num_query_groups=2,
                vocab_size=500,
                rotary_base=500000,
            ),
            "LlamaForCausalLM",
        ),
        (
            ModelArch.llama(
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                vocab_size=500,
                add_qkv_bias=True,
                tie_embeddings=True,
            ),
            "Qwen2ForCausalLM",
        ),
        (
            ModelArch.llama(
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                vocab_size=500,
                qk_layernorm=True,
                kv_channels=32,
                ffn_hidden_size=96,
            ),
            "Qwen3ForCausalLM",
        ),
        (
            ModelArch.llama(
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                vocab_size=500,
                add_bias_linear=True,
            ),
            "LlamaForCausalLM",
        ),
    ],
)
def test_exported_config_reads_back_as_the_same_arch(arch, expected):
    config = hf_config_for(arch)
    assert config["architectures"] == [expected]
    back = spec_from_config(json.loads(json.dumps(config))).arch
    for field in vars(arch):
        if field == "activation" and arch.activation == "gelu":
            assert config["activation_function"] == "gelu"  # exact GeLU, not GPT-2's tanh default
            continue
        mine = getattr(
            arch,
            {
                "num_query_groups": "query_groups",
                "kv_channels": "head_dim",
                "ffn_hidden_size": "ffn_size",
            }.get(field, field),
        )
        theirs = getattr(
            back,
            {
                "num_query_groups": "query_groups",
                "kv_channels": "head_dim",
                "ffn_hidden_size": "ffn_size",
            }.get(field, field),
        )
        assert mine == theirs, field


def test_transformers_builds_exactly_the_tensors_of_an_exported_config(tmp_path):
    """For every exportable family: transformers, given our config.json, builds a model whose
    parameters are exactly the tensors the conversion reads and writes (names and shapes)."""
    transformers = pytest.importorskip("transformers")
    from parallel.hf.layout import expected_shapes

    archs = [
        ModelArch.gpt2(
            num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300, max_seq_len=16
        ),
        ModelArch.llama(
            num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=300
        ),
        ModelArch.llama(
            num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300, add_qkv_bias=True
        ),
        ModelArch.llama(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            vocab_size=300,
            qk_layernorm=True,
            kv_channels=16,
            num_query_groups=2,
        ),
        ModelArch.llama(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            vocab_size=300,
            add_bias_linear=True,
            tie_embeddings=True,
        ),
    ]
    for i, arch in enumerate(archs):
        folder = tmp_path / str(i)
        folder.mkdir()
        config = hf_config_for(arch)
        (folder / "config.json").write_text(json.dumps(config))
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(folder)
        )
        assert type(model).__name__ == config["architectures"][0]
        built = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied lm_head not listed
        spec = spec_from_config(config)
        expected = expected_shapes(spec, "transformer." if spec.family.name == "gpt2" else "")
        assert built == expected, (config["architectures"], set(built) ^ set(expected))


def test_export_of_unrepresentable_arch_names_the_problem():
    arch = ModelArch.llama(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=500,
        normalization="LayerNorm",
    )
    with pytest.raises(HFConversionError, match="RMSNorm"):
        hf_architecture_for(arch)


# ---------------------------------------------------------------------------------------------
# bad folders
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("bad_inputs")
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_good_folders_pass(llama_dirs):
    for name in ("single", "sharded"):
        checkpoint = inspect_hf_dir(llama_dirs / name)
        assert checkpoint.spec.architecture == "LlamaForCausalLM"
    assert len({t.file for t in inspect_hf_dir(llama_dirs / "sharded").tensors.values()}) > 1
    assert is_hf_dir(llama_dirs / "single") and not is_hf_dir(llama_dirs / "nowhere")


def test_missing_shard_is_named(llama_dirs, tmp_path):
    folder = _copy(llama_dirs / "sharded", tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    with pytest.raises(HFConversionError, match=f"missing.*{victim}"):
        inspect_hf_dir(folder)


def test_shape_mismatch_names_tensor_and_shapes(llama_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(llama_dirs / "single", tmp_path / "s")
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:8].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFConversionError) as err:
        inspect_hf_dir(folder)
    assert name in str(err.value) and "[8, 32]" in str(err.value) and "[16, 32]" in str(err.value)


def test_config_weights_disagreement_is_a_shape_error(llama_dirs, tmp_path):
    folder = _copy(llama_dirs / "single", tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the file holds 2 key/value heads
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFConversionError, match="k_proj.weight.*expected \\[32, 32\\]"):
        inspect_hf_dir(folder)


def test_missing_tensor_is_named(llama_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(llama_dirs / "single", tmp_path / "t")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFConversionError, match="lacks 1 tensor.*lm_head.weight \\[300, 32\\]"):
        inspect_hf_dir(folder)


def test_truncated_file_is_detected(llama_dirs, tmp_path):
    folder = _copy(llama_dirs / "single", tmp_path / "x")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(HFConversionError, match="truncated"):
        inspect_hf_dir(folder)


def test_tokenizer_larger_than_vocabulary_is_rejected(llama_dirs, tmp_path):
    folder = _copy(llama_dirs / "single", tmp_path / "k")
    vocab = {f"t{i}": i for i in range(310)}
    (folder / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": []})
    )
    with pytest.raises(HFConversionError, match="310 ids but config.json vocab_size=300"):
        inspect_hf_dir(folder)
    small = {f"t{i}": i for i in range(250)}  # a smaller tokenizer is common (padded embeddings)
    (folder / "tokenizer.json").write_text(
        json.dumps(
            {
                "model": {"type": "BPE", "vocab": small},
                "added_tokens": [{"id": 299, "content": "<x>"}],
            }
        )
    )
    assert inspect_hf_dir(folder).tokenizer_vocab_size == 300


def test_pickle_only_weights_are_explained(llama_dirs, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copy(llama_dirs / "single" / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(HFConversionError, match="safe_serialization"):
        inspect_hf_dir(folder)


def test_unsupported_architecture_fails_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(
        HFConversionError, match="BertForMaskedLM is not supported; supported: LlamaForCausalLM"
    ):
        inspect_hf_dir(tmp_path)  # no weight file exists: the architecture is checked first


def test_architecture_check_of_the_teacher_route():
    """load_hf_weights refuses a model built for another architecture, naming the fields; a rotary
    model may use a shorter max_seq_len than the Hugging Face config allows."""
    from parallel.hf.load import check_arch

    hf = spec_from_config(LLAMA3_8B).arch
    same = ModelArch.llama(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        ffn_hidden_size=14336,
        rotary_base=500000,
        max_seq_len=2048,
    )
    check_arch(same, hf, Path("llama3"))
    other = ModelArch(**{**vars(same), "num_layers": 16, "rotary_base": 10000})
    with pytest.raises(
        HFConversionError, match="num_layers: 16 here vs 32.*rotary_base: 10000 here vs 500000"
    ):
        check_arch(other, hf, Path("llama3"))
    gpt2 = spec_from_config(GPT2).arch
    with pytest.raises(HFConversionError, match="max_seq_len"):
        check_arch(ModelArch(**{**vars(gpt2), "max_seq_len": 512}), gpt2, Path("gpt2"))
