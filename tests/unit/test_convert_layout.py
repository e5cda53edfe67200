"""The per-rank shard plan (parallel.hf.layout) and the block reader against an independent
reference: full megatron-layout tensors built directly from the Hugging Face tensors with
reshapes and concatenations, padded, then split the way megatron-core splits column-parallel
(rows), row-parallel (columns) and vocab-parallel (rows) weights."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")


def _save(model, folder):
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_layout")
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    t = transformers
    _save(
        t.LlamaForCausalLM(t.LlamaConfig(vocab_size=200, num_key_value_heads=2, **common)),
        root / "llama",
    )
    _save(
        t.Qwen2ForCausalLM(t.Qwen2Config(vocab_size=200, num_key_value_heads=2, **common)),
        root / "qwen2",
    )
    _save(
        t.Qwen3ForCausalLM(
            t.Qwen3Config(vocab_size=100, num_key_value_heads=4, head_dim=16, **common)
        ),
        root / "qwen3",
    )
    _save(
        t.LlamaForCausalLM(
            t.LlamaConfig(vocab_size=200, attention_bias=True, mlp_bias=True, **common)
        ),
        root / "llama_bias",
    )
    _save(
        t.GPT2LMHeadModel(
            t.GPT2Config(
                vocab_size=200,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=16,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        root / "gpt2",
    )
    return root


def _pad_rows(x, rows):
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def reference_full(hf: dict[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
    """Full (unsharded) megatron tensors, layer-spec names, from the Hugging Face tensors."""
    a = spec.arch
    d, g, heads = a.head_dim, a.query_groups, a.num_attention_heads
    per = heads // g
    out = {}
    if spec.family.name == "gpt2":
        out["embedding.word_embeddings.weight"] = hf["transformer.wte.weight"]
        out["embedding.position_embeddings.weight"] = hf["transformer.wpe.weight"]
        out["decoder.final_layernorm.weight"] = hf["transformer.ln_f.weight"]
        out["decoder.final_layernorm.bias"] = hf["transformer.ln_f.bias"]
        for i in range(a.num_layers):
            p, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
            w = hf[p + "attn.c_attn.weight"].t()  # [3h, h]: q rows, k rows, v rows
            b = hf[p + "attn.c_attn.bias"]
            q, k, v = w.split(a.hidden_size)
            qb, kb, vb = b.split(a.hidden_size)
            out[m + "self_attention.linear_qkv.weight"] = torch.cat(
                [
                    torch.cat(
                        [q[j * d : (j + 1) * d], k[j * d : (j + 1) * d], v[j * d : (j + 1) * d]]
                    )
                    for j in range(heads)
                ]
            )
            out[m + "self_attention.linear_qkv.bias"] = torch.cat(
                [
                    torch.cat(
                        [qb[j * d : (j + 1) * d], kb[j * d : (j + 1) * d], vb[j * d : (j + 1) * d]]
                    )
                    for j in range(heads)
                ]
            )
            out[m + "self_attention.linear_proj.weight"] = hf[p + "attn.c_proj.weight"].t()
            out[m + "self_attention.linear_proj.bias"] = hf[p + "attn.c_proj.bias"]
            out[m + "mlp.linear_fc1.weight"] = hf[p + "mlp.c_fc.weight"].t()
            out[m + "mlp.linear_fc1.bias"] = hf[p + "mlp.c_fc.bias"]
            out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.c_proj.weight"].t()
            out[m + "mlp.linear_fc2.bias"] = hf[p + "mlp.c_proj.bias"]
            for ln, name in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                out[m + name + ".weight"] = hf[p + ln + ".weight"]
                out[m + name + ".bias"] = hf[p + ln + ".bias"]
        return out
    out["embedding.word_embeddings.weight"] = hf["model.embed_tokens.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not a.tie_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(a.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            if p + "self_attn.q_proj." + kind not in hf:
                continue
            q, k, v = (hf[p + f"self_attn.{x}_proj." + kind] for x in "qkv")
            out[m + "self_attention.linear_qkv." + kind] = torch.cat(
                [
                    torch.cat(
                        [
                            q[j * per * d : (j + 1) * per * d],
                            k[j * d : (j + 1) * d],
                            v[j * d : (j + 1) * d],
                        ]
                    )
                    for j in range(g)
                ]
            )
        out[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
        out[m + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        if a.add_bias_linear:
            out[m + "self_attention.linear_proj.bias"] = hf[p + "self_attn.o_proj.bias"]
            out[m + "mlp.linear_fc2.bias"] = hf[p + "mlp.down_proj.bias"]
        if a.qk_layernorm:
            out[m + "self_attention.q_layernorm.weight"] = hf[p + "self_attn.q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = hf[p + "self_attn.k_norm.weight"]
    return out


COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
ROW = ("linear_proj.weight", "linear_fc2.weight")


def reference_local(full, hf, spec, tp_rank, tp):
    """megatron's split of the full tensors for one tensor-parallel rank."""
    a = spec.arch
    local = {}
    for name, tensor in full.items():
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            tensor = _pad_rows(tensor, a.padded_vocab(tp))
        if name.endswith(COLUMN) or (
            spec.family.name == "gpt2" and name.endswith(("linear_fc1.weight", "linear_fc1.bias"))
        ):
            local[name] = tensor.chunk(tp, dim=0)[tp_rank]
        elif name.endswith(ROW):
            local[name] = tensor.chunk(tp, dim=1)[tp_rank]
        else:
            local[name] = tensor
    if spec.family.name == "llama":  # SwiGLU: [gate shard; up shard] per rank
        for i in range(a.num_layers):
            p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            for kind in ("weight", "bias"):
                if p + "mlp.gate_proj." + kind in hf:
                    gate = hf[p + "mlp.gate_proj." + kind].chunk(tp, dim=0)[tp_rank]
                    up = hf[p + "mlp.up_proj." + kind].chunk(tp, dim=0)[tp_rank]
                    local[m + "mlp.linear_fc1." + kind] = torch.cat([gate, up])
    return local


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "llama_bias", "gpt2"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("block_bytes", [1 << 24, 200])
def test_shard_plan_matches_megatron_split(folders, name, tp, block_bytes):
    from safetensors.torch import load_file

    from parallel.hf.files import inspect_hf_dir
    from parallel.hf.layout import shard_plan
    from parallel.hf.load import SafetensorsReader, fill_parameter

    checkpoint = inspect_hf_dir(folders / name)
    spec = checkpoint.spec
    if spec.arch.query_groups % tp:
        pytest.skip("layout not shardable")
    hf = load_file(str(folders / name / "model.safetensors"))
    full = reference_full(hf, spec)
    reader = SafetensorsReader(checkpoint, block_bytes=block_bytes)
    layers = [(i, i) for i in range(spec.arch.num_layers)]
    for rank in range(tp):
        expected = reference_local(full, hf, spec, rank, tp)
        plan = shard_plan(
            spec,
            tp_rank=rank,
            tp_size=tp,
            layers=layers,
            pre_process=True,
            post_process=True,
            prefix=checkpoint.prefix,
        )
        assert set(plan) == set(expected)
        for param, pieces in plan.items():
            dest = torch.full_like(expected[param], float("nan"))
            fill_parameter(dest, pieces, reader)
            assert torch.equal(dest, expected[param]), (name, tp, rank, param)


def test_pipeline_stages_get_their_layers_and_tied_output(folders):
    from parallel.hf.files import inspect_hf_dir
    from parallel.hf.layout import shard_plan

    checkpoint = inspect_hf_dir(folders / "gpt2")  # tied embeddings
    last = shard_plan(
        checkpoint.spec,
        tp_rank=0,
        tp_size=1,
        layers=[(0, 1)],
        pre_process=False,
        post_process=True,
        prefix=checkpoint.prefix,
    )
    # The last stage's local layer 0 is global layer 1; its output layer is a copy of wte.
    assert (
        last["decoder.layers.0.input_layernorm.weight"][0].source == "transformer.h.1.ln_1.weight"
    )
    assert [p.source for p in last["output_layer.weight"]] == ["transformer.wte.weight"]
    assert "embedding.word_embeddings.weight" not in last
    first = shard_plan(
        checkpoint.spec,
        tp_rank=0,
        tp_size=1,
        layers=[(0, 0)],
        pre_process=True,
        post_process=False,
        prefix=checkpoint.prefix,
    )
    assert "output_layer.weight" not in first and "decoder.final_layernorm.weight" not in first


def test_vocab_shard_of_only_padding_is_zero(folders):
    from parallel.hf.files import inspect_hf_dir
    from parallel.hf.layout import shard_plan
    from parallel.hf.load import SafetensorsReader, fill_parameter

    checkpoint = inspect_hf_dir(folders / "qwen3")  # vocab 100: padded to 256 at tp=2
    plan = shard_plan(
        checkpoint.spec,
        tp_rank=1,
        tp_size=2,
        layers=[],
        pre_process=True,
        post_process=True,
    )
    assert plan["embedding.word_embeddings.weight"] == []
    dest = torch.full((128, 32), float("nan"))
    fill_parameter(dest, plan["embedding.word_embeddings.weight"], SafetensorsReader(checkpoint))
    assert torch.equal(dest, torch.zeros_like(dest))
