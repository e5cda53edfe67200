"""The one parameter count (``ModelArch.layer_parameters`` / ``stage_parameters`` /
``num_parameters``, used by the planner, ``gkd convert`` and the methods' ``ModelInfo``) against
an independent reference: the ``numel`` of the parameters megatron-core's GPTModel allocates on
each rank, built at TP1 x PP1, TP2 x PP1 and TP1 x PP2 (two gloo ranks).

Per rank, the count must equal what the rank holds; over the ranks, the parameters megatron marks
tensor-parallel (``tensor_model_parallel``) summed plus the replicated ones counted once must
equal the total (with PP2 and tied embeddings, plus the last stage's copy of the embedding)."""

from __future__ import annotations

import pytest

from tests.distributed import run_on_ranks

pytestmark = pytest.mark.dist

COMMON = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300)
# name -> (ModelArch factory, overrides): every family variant, and a LayerNorm model with q/k
# norms (LayerNorm q/k norms have biases).
ARCHS = {
    "gpt2": ("gpt2", dict(max_seq_len=16)),
    "gpt2_untied": ("gpt2", dict(max_seq_len=16, tie_embeddings=False)),
    "gpt2_tanh": ("gpt2", dict(max_seq_len=16, activation="gelu_tanh", ffn_hidden_size=48)),
    "llama_gqa": ("llama", dict(num_query_groups=2)),
    "llama_bias": ("llama", dict(num_query_groups=2, add_bias_linear=True)),
    "qwen2_tied": ("llama", dict(num_query_groups=2, add_qkv_bias=True, tie_embeddings=True)),
    "qwen3": ("llama", dict(num_query_groups=2, qk_layernorm=True, kv_channels=16)),
    "layernorm_qk_norm": ("gpt2", dict(max_seq_len=16, qk_layernorm=True)),
}
LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def _arch(name: str):
    from parallel.config import ModelArch

    factory, overrides = ARCHS[name]
    return getattr(ModelArch, factory)(**COMMON, **overrides)


def _count_job() -> dict:
    """Every layout of a 2-rank job (TP1 x PP1 as two replicas): for each architecture, this
    rank's (tp rank, pp rank, tensor-parallel numel, replicated numel, numel of its first
    decoder layer)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.config import ParallelConfig
    from parallel.distributed import initialize
    from parallel.model import build_gpt

    report: dict = {}
    for tp, pp in LAYOUTS:
        initialize(ParallelConfig(tp=tp, pp=pp, dp=dist.get_world_size() // (tp * pp)), seed=0)
        for name in ARCHS:
            model = build_gpt(_arch(name), params_dtype=torch.float32)
            params = list({id(p): p for p in model.parameters()}.values())
            sharded = sum(p.numel() for p in params if getattr(p, "tensor_model_parallel", False))
            replicated = sum(p.numel() for p in params) - sharded
            layer = sum(
                p.numel() for n, p in model.named_parameters() if n.startswith("decoder.layers.0.")
            )
            report[(tp, pp, name)] = (
                ps.get_tensor_model_parallel_rank(),
                ps.get_pipeline_model_parallel_rank(),
                sharded,
                replicated,
                layer,
            )
        ps.destroy_model_parallel()
    return report


@pytest.fixture(scope="module")
def counts() -> list[dict]:
    return run_on_ranks(_count_job, 2)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"tp{t[0]}pp{t[1]}")
@pytest.mark.parametrize("name", list(ARCHS))
def test_count_matches_megatrons_parameters(counts, name, layout):
    tp, pp = layout
    arch = _arch(name)
    ranks = [report[(tp, pp, name)] for report in counts]
    for tp_rank, stage, sharded, replicated, layer in ranks:
        assert arch.stage_parameters(tp, pp, stage) == sharded + replicated, (tp_rank, stage)
        assert arch.layer_parameters(tp) == layer, (tp_rank, stage)
    if tp == 2:  # the two ranks are the two tensor shards of one model
        total = sum(r[2] for r in ranks) + ranks[0][3]
        assert ranks[0][3] == ranks[1][3]  # replicated parameters are the same on both
        assert total == arch.num_parameters(tp)
    elif pp == 2:  # the two ranks are the two stages
        copy = arch.embedding_parameters(1) if arch.tie_embeddings else 0
        assert sum(r[2] + r[3] for r in ranks) == arch.num_parameters(1) + copy
    else:
        assert all(r[2] + r[3] == arch.num_parameters(1) for r in ranks)
