"""``student.init_layers``: a student initialized by truncating a deeper checkpoint, checked
against transformers.

A random 4-layer Llama (grouped-query attention, SwiGLU) is built with transformers and imported
into a gkd checkpoint at PP2 (the import path is checked against transformers elsewhere).
A 2-layer student is then built at PP2 and loads layers [1, 3] of it (``every:2``) and,
separately, layers [3, 0] (an explicit list, reordered). The reference is transformers' own model
with ``model.layers`` cut to those layers by hand: the student's logits must equal it. The PP2
layout matters: each stage's layer numbers are global in megatron-core's sharded keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist.test_convert_hf import _randomize, forward_logits
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.dist

MAPS = {"every2": [1, 3], "reordered": [3, 0]}
SEQ, BATCH = 9, 2


def _job(root: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.checkpoint import load_model_weights, read_meta
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize
    from parallel.hf.load import apply_mlp_activation, build_from_hf, save_imported
    from parallel.model import build_gpt

    initialize(ParallelConfig(tp=1, pp=2), seed=0)
    teacher, checkpoint = build_from_hf(Path(root) / "hf", dtype="float32")
    folder = save_imported(teacher, checkpoint, Path(root) / "teacher")
    refs = torch.load(Path(root) / "refs.pt")
    result = {}
    for name, layers in MAPS.items():
        arch = checkpoint.spec.arch
        student_arch = type(arch)(**{**vars(arch), "num_layers": len(layers)})
        student = build_gpt(student_arch, params_dtype=torch.float32)
        meta = load_model_weights(folder, student, layer_map=layers)
        apply_mlp_activation(student, meta["hf"]["mlp_activation"])
        logits = forward_logits(student, refs["tokens"], arch.hidden_size)
        if logits is not None:
            vocab = refs["vocab"]
            error = (logits[..., :vocab].double() - refs[name]).abs().max().item()
            result[name] = error
    result["saved_layers"] = read_meta(folder)["arch"]["num_layers"]
    dist.barrier()
    ps.destroy_model_parallel()
    return result


def test_truncated_student_equals_transformers_with_those_layers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    _randomize(model, seed=7)
    model.eval()
    model.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 300, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    refs = {"tokens": tokens, "vocab": 300}
    full = model.model.layers
    for name, layers in MAPS.items():
        model.model.layers = torch.nn.ModuleList([full[i] for i in layers])
        model.config.num_hidden_layers = len(layers)
        with torch.no_grad():
            refs[name] = model(tokens, use_cache=False).logits.double()
    model.model.layers = full
    with torch.no_grad():
        full_logits = model(tokens, use_cache=False).logits.double()
    # the truncations differ from the full model and from each other: the check can fail
    assert (refs["every2"] - full_logits).abs().max() > 1e-2
    assert (refs["every2"] - refs["reordered"]).abs().max() > 1e-2
    torch.save(refs, tmp_path / "refs.pt")
    results = run_on_ranks(_job, 2, str(tmp_path))
    last_stage = [r for r in results if "every2" in r]
    assert len(last_stage) == 1  # the last pipeline stage
    for result in last_stage:
        assert result["saved_layers"] == 4
        for name in MAPS:
            assert result[name] < 1e-4, json.dumps(result)
