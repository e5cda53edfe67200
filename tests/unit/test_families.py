"""Every registered model family (:mod:`parallel.families`) against itself and the registry: the
checks a new family passes without writing them again.

* the registry: each ``architectures`` name belongs to one family, ``config.json`` of an exported
  model reads back into the same family and architecture;
* the import plan reads exactly the tensors ``expected_shapes`` lists, each with the shape the
  plan needs;
* import then export is the identity: random Hugging Face tensors placed into megatron's full
  TP1 tensors by the import plan (the block reader, in memory) and written back by the family's
  ``export_layer`` are the same tensors, bit for bit. (Each direction is checked against
  transformers and an independent megatron-layout reference in ``test_convert_layout.py``,
  ``test_convert_inputs.py`` and ``tests/dist/test_convert_hf.py``.)
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from parallel.config import ModelArch
from parallel.families import BY_ARCHITECTURE, FAMILIES, SUPPORTED_ARCHITECTURES, family_of
from parallel.hf.load import check_arch
from parallel.hf.spec import hf_architecture_for, hf_config_for, spec_from_config

pytestmark = pytest.mark.unit

COMMON = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=200)
ARCHS = {
    "gpt2": ModelArch.gpt2(**COMMON, max_seq_len=16),
    "gpt2_untied": ModelArch.gpt2(**COMMON, max_seq_len=16, tie_embeddings=False),
    "llama_gqa": ModelArch.llama(**COMMON, num_query_groups=2),
    "llama_bias": ModelArch.llama(**COMMON, add_bias_linear=True, tie_embeddings=True),
    "qwen2": ModelArch.llama(**COMMON, num_query_groups=2, add_qkv_bias=True),
    "qwen3": ModelArch.llama(**COMMON, num_query_groups=2, qk_layernorm=True, kv_channels=16),
}


def test_registry_names_each_architecture_once():
    names = [name for family in FAMILIES for name in family.architectures]
    assert len(names) == len(set(names)) == len(SUPPORTED_ARCHITECTURES)
    for name in names:
        assert name in BY_ARCHITECTURE[name].architectures
    for family in FAMILIES:
        for alias, target in family.aliases.items():
            assert alias in family.architectures and target in family.architectures


@pytest.mark.parametrize("name", list(ARCHS))
def test_exported_config_reads_back_into_the_same_family(name):
    arch = ARCHS[name]
    config = hf_config_for(arch)
    spec = spec_from_config(config)
    assert spec.family is family_of(arch)
    assert spec.architecture == hf_architecture_for(arch) == config["architectures"][0]
    check_arch(spec.arch, arch, Path("config.json"))  # equal, defaulted fields resolved


def _memory_reader(tensors: dict[str, torch.Tensor]):
    """The block reader (``SafetensorsReader.copy_piece``, blocks of 64 bytes) over in-memory
    tensors instead of files."""
    from parallel.hf.files import TensorInfo
    from parallel.hf.load import SafetensorsReader

    class MemoryReader(SafetensorsReader):
        def read(self, name, rows, cols):
            t = tensors[name][rows[0] : rows[1]]
            return t if cols is None else t[:, cols[0] : cols[1]]

    infos = {n: TensorInfo("memory", tuple(t.shape), "F32") for n, t in tensors.items()}
    checkpoint = SimpleNamespace(tensors=infos)
    return MemoryReader(checkpoint, block_bytes=64)  # type: ignore[arg-type]


def _dest_shape(pieces, reader, arch: ModelArch, name: str) -> tuple[int, ...]:
    first = reader.shape(pieces[0].source)
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return (arch.padded_vocab(1), first[1])
    rows = 0
    for p in pieces:
        shape = reader.shape(p.source)
        if p.transpose:
            rows += (p.cols or (0, shape[1]))[1] - (p.cols or (0, shape[1]))[0]
        else:
            rows += (p.rows or (0, shape[0]))[1] - (p.rows or (0, shape[0]))[0]
    if len(first) == 1:
        return (rows,)
    p = pieces[0]
    if p.transpose:
        return (rows, (p.rows or (0, first[0]))[1] - (p.rows or (0, first[0]))[0])
    return (rows, (p.cols or (0, first[1]))[1] - (p.cols or (0, first[1]))[0])


@pytest.mark.parametrize("name", list(ARCHS))
def test_import_plan_then_export_is_the_identity(name):
    from parallel.hf.export import hf_tensors
    from parallel.hf.layout import expected_shapes, shard_plan
    from parallel.hf.load import fill_parameter

    arch = ARCHS[name]
    spec = spec_from_config(hf_config_for(arch))
    prefix = spec.family.export_prefix
    shapes = expected_shapes(spec, prefix)
    gen = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    reader = _memory_reader(hf)
    plan = shard_plan(
        spec,
        tp_rank=0,
        tp_size=1,
        layers=[(i, i) for i in range(arch.num_layers)],
        pre_process=True,
        post_process=True,
        prefix=prefix,
    )
    assert {p.source for pieces in plan.values() for p in pieces} == set(shapes)
    state = {}
    for param, pieces in plan.items():
        dest = torch.full(_dest_shape(pieces, reader, arch, param), float("nan"))
        fill_parameter(dest, pieces, reader)
        assert not dest.isnan().any(), param
        state[param] = dest
    back = hf_tensors(state, arch)
    assert set(back) == set(hf)
    for n, tensor in hf.items():
        assert torch.equal(back[n], tensor), n
