"""The one parameter count (``ModelArch.num_parameters``) against a second independent reference:
transformers' model for the ``config.json`` gkd exports (built offline from the config, every
family and variant). The vocabulary is a multiple of 256, so megatron's padding adds no rows at
TP1 or TP2 and the counts must be equal."""

from __future__ import annotations

import pytest

from parallel.config import ModelArch
from parallel.hf.spec import hf_config_for

pytestmark = pytest.mark.unit

COMMON = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=512)
ARCHS = {
    "gpt2": ModelArch.gpt2(**COMMON, max_seq_len=16),
    "gpt2_untied": ModelArch.gpt2(**COMMON, max_seq_len=16, tie_embeddings=False),
    "gpt2_ffn": ModelArch.gpt2(
        **COMMON, max_seq_len=16, activation="gelu_tanh", ffn_hidden_size=48
    ),
    "llama_gqa": ModelArch.llama(**COMMON, num_query_groups=2),
    "llama_bias": ModelArch.llama(**COMMON, num_query_groups=2, add_bias_linear=True),
    "qwen2_tied": ModelArch.llama(
        **COMMON, num_query_groups=2, add_qkv_bias=True, tie_embeddings=True
    ),
    "qwen3": ModelArch.llama(**COMMON, num_query_groups=2, qk_layernorm=True, kv_channels=16),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_count_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    arch = ARCHS[name]
    config = hf_config_for(arch)
    model_type = config["model_type"]
    hf_config = transformers.AutoConfig.for_model(
        model_type, **{k: v for k, v in config.items() if k != "model_type"}
    )
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert type(model).__name__ == config["architectures"][0]
    hf_count = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    assert arch.num_parameters(1) == hf_count
    assert arch.num_parameters(2) == hf_count  # 512 needs no padding at tp=2
