"""The memory planner against independent references: hand-counted parameters, the closed forms
of Korthikanti et al. 2022, and GKD's headline (a 100B teacher and a few-billion student on
8 x A100-40GB)."""

from __future__ import annotations

import dataclasses

import pytest

from gkd_cli.config import build_config
from gkd_cli.errors import ConfigError
from gkd_cli.plan import (
    GiB,
    estimate,
    layer_activation_bytes,
    parse_size,
    search_layouts,
    suggest_layout,
)
from parallel.config import ModelArch

pytestmark = pytest.mark.unit


def config(teacher: dict, student: dict, *, parallel=None, train=None, seq_length=2048):
    """A typed config without files (the planner needs none)."""
    data = {
        "teacher": {**teacher, "init": "random"},
        "student": student,
        "methods": [{"name": "glmd"}],
        "parallel": parallel or {},
        "data": {"tokenizer": "unused.json", "seq_length": seq_length},
        "train": train or {},
        "output": {"dir": "/tmp/unused"},
    }
    return build_config(data)


LLAMA = dict(
    normalization="RMSNorm",
    activation="swiglu",
    position_embedding="rope",
    tie_embeddings=False,
    add_bias_linear=False,
)
TEACHER_100B = dict(
    num_layers=80,
    hidden_size=10240,
    num_attention_heads=80,
    num_query_groups=8,
    ffn_hidden_size=32768,
    vocab_size=32000,
    max_seq_len=4096,
    **LLAMA,
)
STUDENT_3B = dict(
    num_layers=24,
    hidden_size=3072,
    num_attention_heads=24,
    ffn_hidden_size=8192,
    vocab_size=32000,
    max_seq_len=4096,
    **LLAMA,
)


# ---------------------------------------------------------------------------------------------
# Parameters per rank
# ---------------------------------------------------------------------------------------------


def test_tiny_gpt_params_counted_by_hand():
    arch = ModelArch(
        num_layers=2, hidden_size=8, num_attention_heads=2, vocab_size=100, max_seq_len=16
    )
    # One layer, from the shapes: QKV 8x24 + 24, proj 8x8 + 8, fc1 8x32 + 32, fc2 32x8 + 8,
    # two LayerNorms 2 x 16. Column-parallel weights/biases and row-parallel weights split over
    # tp=2; row-parallel biases (8 + 8) and norms (32) replicated.
    split = 8 * 24 + 24 + 8 * 8 + 8 * 32 + 32 + 32 * 8
    replicated = 8 + 8 + 32
    vocab_tp2 = 256  # 100 padded to a multiple of 128 x 2
    # pp=1: both layers, the embedding shard, positions (replicated), the final LayerNorm.
    expected = 2 * (split // 2 + replicated) + vocab_tp2 * 8 // 2 + 16 * 8 + 16
    assert arch.stage_parameters(2, 1, 0) == expected


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_stage_params_sum_to_the_model(tie, pp):
    arch = ModelArch.llama(
        num_layers=8,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=1000,
        tie_embeddings=tie,
    )
    total = sum(arch.stage_parameters(1, pp, stage) for stage in range(pp))
    extra_copy = arch.padded_vocab(1) * arch.hidden_size if (tie and pp > 1) else 0
    assert total == arch.num_parameters(1) + extra_copy


# ---------------------------------------------------------------------------------------------
# Activations: Korthikanti et al. 2022 closed forms (GPT: MHA, GeLU MLP of 4h, 16-bit)
# ---------------------------------------------------------------------------------------------

GPT = ModelArch(num_layers=4, hidden_size=1024, num_attention_heads=16, vocab_size=50257)
S, B = 512, 2
SBH = S * B * 1024
A_TERM = 5 * 16 * S / 1024  # 5as/h


def act(tp, sp, recompute, e=2, dropout=True):
    return layer_activation_bytes(
        GPT,
        seq_length=S,
        micro_batch_size=B,
        tp=tp,
        sequence_parallel=sp,
        recompute=recompute,
        bytes_per_element=e,
        dropout=dropout,
    )


def test_eq1_no_parallelism():
    assert act(1, False, "none") == SBH * (34 + A_TERM)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_eq2_tensor_parallel(tp):
    assert act(tp, False, "none") == SBH * (10 + 24 / tp + A_TERM / tp)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_eq3_tensor_and_sequence_parallel(tp):
    assert act(tp, True, "none") == SBH / tp * (34 + A_TERM)


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_selective_recompute(tp):
    assert act(tp, True, "selective") == SBH * 34 / tp
    assert act(tp, False, "selective") == SBH * (10 + 24 / tp)


def test_full_recompute_keeps_layer_input():
    assert act(1, False, "full") == 2 * SBH
    assert act(4, True, "full") == 2 * SBH / 4


def test_fp32_doubles_tensors_not_masks():
    assert act(2, False, "none", e=4, dropout=False) == 2 * act(2, False, "none", dropout=False)
    masks = act(2, False, "none") - act(2, False, "none", dropout=False)
    assert masks == 2 * SBH + 16 * S * S * B / 2  # 2sbh hidden masks + as^2b/t attention mask


def test_first_stage_holds_pp_microbatches():
    cfg = config(
        dict(num_layers=8, hidden_size=256, num_attention_heads=4, vocab_size=1024),
        dict(num_layers=8, hidden_size=128, num_attention_heads=4, vocab_size=1024),
        parallel={"pp": 4},
        train={"global_batch_size": 8, "micro_batch_size": 1},
        seq_length=256,
    )
    stage0 = estimate(cfg, "cpu")  # peak: stage 0 (four microbatches of two layers)
    per_layer = layer_activation_bytes(
        cfg.student,
        seq_length=256,
        micro_batch_size=1,
        tp=1,
        sequence_parallel=False,
        recompute="none",
        bytes_per_element=4,
    )
    assert stage0.stage == 0
    assert stage0.item("student activations").bytes == 4 * 2 * per_layer


# ---------------------------------------------------------------------------------------------
# The whole estimate
# ---------------------------------------------------------------------------------------------


def test_cpu_is_fp32_without_gpu_overhead():
    cfg = config(
        dict(num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=4096),
        dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=4096),
        seq_length=128,
    )
    cpu, gpu = estimate(cfg, "cpu"), estimate(cfg, "gpu")
    assert cpu.dtype == "fp32" and gpu.dtype == "bf16"
    names = [i.name for i in cpu.items]
    assert "runtime overhead" not in names and "runtime overhead" in [i.name for i in gpu.items]
    params = cfg.teacher.num_parameters(1)
    assert cpu.item("teacher weights").bytes == 4 * params
    assert gpu.item("teacher weights").bytes == 2 * params
    s_params = cfg.student.num_parameters(1)
    assert cpu.item("optimizer states").bytes == 8 * s_params  # two fp32 moments
    assert gpu.item("optimizer states").bytes == 12 * s_params  # + fp32 master
    assert cpu.total_bytes == sum(i.bytes for i in cpu.items)


def test_optimizer_sharded_over_dp():
    kw = dict(train={"global_batch_size": 8})
    t = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512)
    one = estimate(config(t, t, parallel={"dp": 1}, **kw), "gpu")
    four = estimate(config(t, t, parallel={"dp": 4}, **kw), "gpu")
    assert four.item("optimizer states").bytes == one.item("optimizer states").bytes // 4
    assert four.item("student weights").bytes == one.item("student weights").bytes


def test_device_must_be_cpu_or_gpu():
    t = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512)
    with pytest.raises(ConfigError):
        estimate(config(t, t), "tpu")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("40GiB", 40 * GiB),
        ("40G", 40 * GiB),
        ("40GB", 40 * 10**9),
        ("81920MiB", 80 * GiB),
        ("1.5 TiB", int(1.5 * 1024**4)),
        ("1024", 1024),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["forty", "40XB", ""])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="gpu-mem"):
        parse_size(text)


# ---------------------------------------------------------------------------------------------
# GKD's headline: 100B teacher -> few-billion student on 8 x A100-40GB
# ---------------------------------------------------------------------------------------------


def headline_config(tp: int, pp: int, dp: int):
    return config(
        TEACHER_100B,
        STUDENT_3B,
        parallel={"tp": tp, "pp": pp, "dp": dp, "sequence_parallel": tp > 1},
        train={"global_batch_size": 64, "micro_batch_size": 1, "recompute": "selective"},
        seq_length=2048,
    )


def test_headline_models_have_the_right_sizes():
    cfg = headline_config(1, 1, 8)
    assert 95e9 < cfg.teacher.num_parameters() < 105e9
    assert 2e9 < cfg.student.num_parameters() < 4e9


def test_headline_does_not_fit_without_model_parallelism():
    plan = estimate(headline_config(1, 1, 8), "gpu")
    # the bf16 teacher alone is about 200 GB
    assert plan.item("teacher weights").bytes > 180 * GiB
    assert not plan.fits(40 * GiB)


def test_headline_fits_at_tp_x_pp_8():
    plan = estimate(headline_config(8, 1, 1), "gpu")
    assert plan.fits(40 * GiB)
    teacher = headline_config(8, 1, 1).teacher
    # the design's "25 GB per GPU at TP x PP = 8": bf16 weights / 8 (the replicated norms and
    # the vocabulary padding keep it within 1%)
    assert plan.item("teacher weights").bytes == pytest.approx(
        2 * teacher.num_parameters() / 8, rel=0.01
    )


def test_search_suggests_smallest_layout_that_fits():
    cfg = headline_config(1, 1, 8)
    best = suggest_layout(cfg, 40 * GiB, gpus=8)
    assert best is not None and best.tp * best.pp == 8 and best.dp == 1
    assert best.fits(40 * GiB)
    layouts = search_layouts(cfg, gpus=8)
    assert all(not p.fits(40 * GiB) for p in layouts if p.tp * p.pp < 8)
    assert {(p.tp, p.pp, p.dp) for p in layouts} >= {(1, 1, 8), (2, 2, 2), (8, 1, 1), (1, 8, 1)}
    # products never decrease along the list (smallest tp x pp first)
    products = [p.tp * p.pp for p in layouts]
    assert products == sorted(products)


def test_search_skips_invalid_layouts():
    cfg = headline_config(1, 1, 8)
    odd = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, num_layers=25))
    layouts = search_layouts(odd, gpus=8)
    assert all(p.pp == 1 for p in layouts)  # 25 layers split over no pp > 1
    assert all(p.tp <= 4 for p in search_layouts(cfg, gpus=8, gpus_per_node=4))


def test_teacher_memory_scales_with_model_parallel_size():
    # design target: teacher parameter memory per rank at TP x PP = 4 is 0.25x of TP x PP = 1
    one = estimate(headline_config(1, 1, 8), "gpu").item("teacher weights").bytes
    four = estimate(headline_config(4, 1, 2), "gpu").item("teacher weights").bytes
    assert four / one == pytest.approx(0.25, rel=0.05)
