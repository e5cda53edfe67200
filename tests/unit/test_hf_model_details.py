"""RoPE scaling, ``rope_theta`` and sliding-window attention between ``config.json`` and
:class:`~parallel.config.ModelArch` (no weights): the inverse frequencies against transformers'
own ``ROPE_INIT_FUNCTIONS`` for the config's exact values, exported configs that transformers
reads back to the same RoPE and window, and the refusals, by their message, of what gkd cannot
represent. Import/export errors name the ``config.json`` keys and the valid ``--tp``/``--pp``
values. (Logits against transformers: ``tests/dist/test_hf_model_details.py``.)"""

from __future__ import annotations

import json

import pytest
import torch

from parallel import rope
from parallel.config import ModelArch
from parallel.hf.spec import HFConversionError, check_layout, hf_config_for, spec_from_config

pytestmark = pytest.mark.unit

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
}
LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# (rope block of config.json, rope_theta, max_position_embeddings)
ROPE_CASES = {
    "linear": ({"rope_type": "linear", "factor": 2.5}, 10000.0, 4096),
    "llama3.1": (LLAMA31, 500000.0, 131072),
    "llama3.2": ({**LLAMA31, "factor": 32.0}, 500000.0, 131072),
    "llama3_other_values": (
        {
            **LLAMA31,
            "factor": 6.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 2048,
        },
        10000.0,
        16384,
    ),
    "yarn_defaults": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        1000000.0,
        131072,
    ),
    "yarn_mscale": (
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
        10000.0,
        163840,
    ),
    "yarn_explicit": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 2048,
            "attention_factor": 1.3,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
        },
        50000.0,
        16384,
    ),
    "yarn_factor_from_lengths": (
        {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096},
        10000.0,
        16384,
    ),
}


def _transformers_rope(block: dict, theta: float, max_pos: int, head_dim: int):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=max_pos,
        rope_parameters={**block, "rope_theta": theta},
    )
    return ROPE_INIT_FUNCTIONS[block["rope_type"]](config, "cpu")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_inverse_frequencies_equal_transformers(case, head_dim):
    block, theta, max_pos = ROPE_CASES[case]
    expected, expected_factor = _transformers_rope(block, theta, max_pos, head_dim)
    scaling = rope.from_hf(block, max_position_embeddings=max_pos)
    ours = rope.inv_freq(head_dim, theta, scaling)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert torch.allclose(ours, expected.float(), rtol=1e-6, atol=0), (ours - expected).abs().max()
    assert rope.attention_factor(scaling) == pytest.approx(expected_factor, rel=1e-12)
    assert not torch.allclose(ours, rope.inv_freq(head_dim, theta, None))  # scaling changes them


def test_megatron_llama3_scaling_fixes_values_a_config_may_change():
    """Why gkd computes the frequencies itself: megatron-core's llama3 scaling hard-codes
    low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    block, theta, _ = ROPE_CASES["llama3_other_values"]
    plain = rope.inv_freq(128, theta, None)
    megatron = RotaryEmbedding._apply_scaling(None, plain.clone(), factor=block["factor"])  # type: ignore[arg-type]
    ours = rope.inv_freq(128, theta, rope.from_hf(block, max_position_embeddings=16384))
    assert not torch.allclose(megatron, ours)
    llama31 = rope.inv_freq(128, 500000.0, rope.from_hf(LLAMA31, max_position_embeddings=131072))
    megatron31 = RotaryEmbedding._apply_scaling(
        None, rope.inv_freq(128, 500000.0, None), factor=8.0
    )  # type: ignore[arg-type]
    assert torch.allclose(megatron31, llama31, rtol=1e-6, atol=0)  # the values it was written for


def test_rope_blocks_of_old_and_new_transformers_are_read():
    new = dict(BASE, rope_parameters={**LLAMA31, "rope_theta": 500000.0})
    del new["rope_theta"]
    old = dict(BASE, rope_scaling=dict(LLAMA31))
    legacy_linear = dict(BASE, rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=20000)
    for config in (new, old):
        arch = spec_from_config(config).arch
        assert arch.rope_scaling == LLAMA31 and arch.rotary_base == 500000
    arch = spec_from_config(legacy_linear).arch
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 2.0} and arch.rotary_base == 20000
    # a top-level original_max_position_embeddings wins over the block's, as in transformers
    yarn = dict(
        BASE,
        original_max_position_embeddings=4096,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1},
    )
    assert spec_from_config(yarn).arch.rope_scaling["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize(
    "changes, words",
    [
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            [
                "rope_scaling.rope_type=dynamic is not supported; supported: default (unscaled), "
                "linear, llama3, yarn"
            ],
        ),
        (
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            ["rope_parameters.rope_type=longrope is not supported"],
        ),
        (
            {"rope_scaling": {k: v for k, v in LLAMA31.items() if k != "high_freq_factor"}},
            [
                "rope_scaling.high_freq_factor is missing (rope_type=llama3 needs factor, "
                "low_freq_factor, high_freq_factor, original_max_position_embeddings)"
            ],
        ),
        (
            {"rope_scaling": {**LLAMA31, "high_freq_factor": 1.0}},
            ["high_freq_factor=1.0 must be greater than low_freq_factor=1.0"],
        ),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": -2.0}},
            ["rope_scaling.factor=-2.0 must be > 0"],
        ),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "short_factor": [1.0]}},
            ["rope_scaling.short_factor=[1.0] is not a parameter of rope_type=linear"],
        ),
        (
            {
                "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                "rope_parameters": {"rope_type": "yarn", "factor": 2.0},
            },
            ["rope_parameters.rope_type=yarn and rope_scaling.rope_type=linear disagree"],
        ),
        ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor=0.5", "not supported"]),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "default"},
                    "sliding_attention": {"rope_type": "default"},
                }
            },
            ["one block per layer type", "not supported"],
        ),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "use_sliding_window": True,
                "sliding_window": 4096,
                "max_window_layers": 1,
            },
            [
                "sliding-window attention in 3 of 4 layers only (max_window_layers=1) is not "
                "supported"
            ],
        ),
        (
            {
                "architectures": ["MistralForCausalLM"],
                "model_type": "mistral",
                "sliding_window": 4096,
                "layer_types": ["sliding_attention", "full_attention"] * 2,
            },
            ["in 2 of 4 layers only (layer_types)"],
        ),
    ],
)
def test_unsupported_rope_and_window_configs_are_refused_by_name(changes, words):
    with pytest.raises(HFConversionError) as err:
        spec_from_config(dict(BASE, **changes), where="m/config.json")
    message = str(err.value)
    assert message.startswith("m/config.json: "), message
    for word in words:
        assert word in message, message


def test_qwen_window_settings_that_mean_full_attention_are_accepted():
    qwen = dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096)
    assert spec_from_config(dict(qwen, use_sliding_window=False)).arch.sliding_window is None
    off = dict(qwen, use_sliding_window=True, max_window_layers=4)  # no layer at or above 4
    assert spec_from_config(off).arch.sliding_window is None
    unsaid = dict(qwen, use_sliding_window=True)  # transformers' default max_window_layers: 28
    assert spec_from_config(unsaid).arch.sliding_window is None
    on = dict(qwen, use_sliding_window=True, max_window_layers=0)
    assert spec_from_config(on).arch.sliding_window == 4096


def test_gkd_configs_are_checked_before_launch():
    """A hand-written teacher/student section with a bad rope_scaling or window fails in
    ``check_parallel`` (what ``gkd distill`` validates), naming the section's key."""
    arch = ModelArch.llama(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=100,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    with pytest.raises(ValueError, match="teacher.rope_scaling.rope_type=dynamic is not supported"):
        arch.check_parallel(1, 1, where="teacher")
    arch.rope_scaling = {"rope_type": "linear"}
    with pytest.raises(ValueError, match="teacher.rope_scaling.factor is missing"):
        arch.check_parallel(1, 1, where="teacher")
    arch.rope_scaling = None
    arch.sliding_window = 0
    with pytest.raises(ValueError, match="student.sliding_window=0 must be a positive"):
        arch.check_parallel(1, 1, where="student")
    gpt2 = ModelArch.gpt2(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=100,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    with pytest.raises(ValueError, match="needs position_embedding: rope"):
        gpt2.check_parallel(1, 1, where="student")


COMMON = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=256,
    max_seq_len=4096,
)


@pytest.mark.parametrize(
    "arch, architecture",
    [
        (
            ModelArch.llama(
                **COMMON,
                rope_scaling=rope.from_hf(
                    ROPE_CASES["llama3_other_values"][0], max_position_embeddings=None
                ),
            ),
            "LlamaForCausalLM",
        ),
        (
            ModelArch.llama(
                **COMMON,
                rotary_base=1000000,
                rope_scaling=rope.from_hf(
                    ROPE_CASES["yarn_mscale"][0], max_position_embeddings=None
                ),
            ),
            "LlamaForCausalLM",
        ),
        (
            ModelArch.llama(
                **COMMON, sliding_window=512, rope_scaling={"rope_type": "linear", "factor": 2.0}
            ),
            "MistralForCausalLM",
        ),
        (ModelArch.llama(**COMMON, add_qkv_bias=True, sliding_window=512), "Qwen2ForCausalLM"),
        (ModelArch.llama(**COMMON, qk_layernorm=True, sliding_window=512), "Qwen3ForCausalLM"),
    ],
)
def test_exported_config_gives_transformers_the_same_rope_and_window(arch, architecture):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config_for(arch)
    assert config["architectures"] == [architecture]
    back = spec_from_config(json.loads(json.dumps(config))).arch
    assert back.rope_scaling == arch.rope_scaling and back.sliding_window == arch.sliding_window
    assert back.rotary_base == arch.rotary_base
    hf = transformers.AutoConfig.for_model(
        config["model_type"], **{k: v for k, v in config.items() if k != "model_type"}
    )
    kind = hf.rope_parameters["rope_type"]
    assert kind == rope.rope_type_of(arch.rope_scaling)
    if kind != "default":
        inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
        ours = rope.inv_freq(arch.head_dim, arch.rotary_base, arch.rope_scaling)
        assert torch.allclose(ours, inv_freq.float(), rtol=1e-6, atol=0)
        assert factor == pytest.approx(rope.attention_factor(arch.rope_scaling))
    assert getattr(hf, "sliding_window", None) == arch.sliding_window
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert hf.layer_types == ["sliding_attention"] * arch.num_layers


def test_export_refuses_what_no_architecture_represents():
    from parallel.hf.spec import hf_architecture_for

    with pytest.raises(HFConversionError, match="sliding_window with biases on all linears"):
        hf_architecture_for(ModelArch.llama(**COMMON, add_bias_linear=True, sliding_window=8))
    with pytest.raises(HFConversionError, match="GPT-2 has no sliding-window attention"):
        hf_architecture_for(
            ModelArch.gpt2(
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                vocab_size=100,
                sliding_window=8,
            )
        )


# ---------------------------------------------------------------------------------------------
# import errors that name config.json keys and the valid layouts (issue 16, item 5)
# ---------------------------------------------------------------------------------------------

LAYOUT_CONFIG = dict(
    BASE,
    num_hidden_layers=6,
    num_attention_heads=12,
    num_key_value_heads=4,
    hidden_size=768,
    intermediate_size=2050,
)
GPT2_CONFIG = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_embd": 96,
    "n_layer": 4,
    "n_head": 6,
    "vocab_size": 300,
}


@pytest.mark.parametrize(
    "config, tp, pp, words",
    [
        (
            dict(LAYOUT_CONFIG, intermediate_size=3072),
            3,
            1,
            [
                "num_key_value_heads=4 is not divisible by --tp=3",
                "valid --tp values for this model: 1, 2, 4; valid --pp values: 1, 2, 3, 6",
            ],
        ),
        (
            dict(LAYOUT_CONFIG, num_key_value_heads=12, intermediate_size=3072),
            8,
            1,
            [
                "num_attention_heads=12 is not divisible by --tp=8",
                "valid --tp values for this model: 1, 2, 3, 4, 6, 12;",
            ],
        ),
        (
            LAYOUT_CONFIG,
            4,
            1,
            [
                "intermediate_size=2050 is not divisible by --tp=4",
                "valid --tp values for this model: 1, 2;",
            ],
        ),
        (
            dict(LAYOUT_CONFIG, intermediate_size=3072),
            1,
            4,
            ["num_hidden_layers=6 is not divisible by --pp=4", "valid --pp values: 1, 2, 3, 6"],
        ),
        (
            GPT2_CONFIG,
            4,
            1,
            [
                "n_head=6 is not divisible by --tp=4",
                "valid --tp values for this model: 1, 2, 3, 6;",
            ],
        ),
        (GPT2_CONFIG, 1, 3, ["n_layer=4 is not divisible by --pp=3", "valid --pp values: 1, 2, 4"]),
    ],
)
def test_layout_errors_name_config_keys_and_valid_sizes(config, tp, pp, words):
    spec = spec_from_config(config)
    with pytest.raises(HFConversionError) as err:
        check_layout(spec.arch, tp, pp, where="m/config.json", family=spec.family)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_teacher_architecture_mismatch_names_config_keys():
    from pathlib import Path

    from parallel.hf.load import check_arch

    hf = spec_from_config(dict(BASE, rope_scaling=dict(LLAMA31))).arch
    mine = ModelArch(**{**vars(hf), "num_query_groups": 4, "rope_scaling": None})
    with pytest.raises(HFConversionError) as err:
        check_arch(mine, hf, Path("llama"))
    message = str(err.value)
    assert "num_query_groups: 4 here vs 2 in llama" in message
    assert "num_query_groups is num_key_value_heads" in message
    assert "rope_scaling is rope_scaling" in message


def test_gqa_heads_error_names_both_keys():
    with pytest.raises(
        HFConversionError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"
    ):
        spec_from_config(dict(BASE, num_key_value_heads=3))


@pytest.mark.parametrize(
    "changes, words",
    [
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
            [
                "rope_scaling.rope_type=dynamic is not supported; supported: default (unscaled), "
                "linear, llama3, yarn"
            ],
        ),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "use_sliding_window": True,
                "sliding_window": 16,
                "max_window_layers": 2,
            },
            ["sliding-window attention in 2 of 4 layers only (max_window_layers=2)"],
        ),
    ],
)
def test_cli_refuses_unsupported_features_before_reading_weights(tmp_path, changes, words):
    """``gkd convert import-hf`` on a folder with only ``config.json``: one red line naming the
    key and value, exit code 2, nothing written."""
    from typer.testing import CliRunner

    from gkd_cli.convert import convert_app

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(BASE, **changes)))
    result = CliRunner().invoke(
        convert_app, ["import-hf", str(folder), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert output.startswith("error: ") and all(w in output for w in words), output
    assert not (tmp_path / "out").exists()
