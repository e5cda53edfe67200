"""Which slices of which Hugging Face tensors make each megatron-core parameter of one rank.

Pure bookkeeping (no torch): :func:`shard_plan` returns, for every parameter of a rank's GPTModel
shard (local layer-spec names), the list of :class:`Piece` s to copy into it. The conventions of
megatron-core 0.16 (``megatron/core/transformer/attention.py`` ``get_query_key_value_tensors``,
``transformer/mlp.py`` and ``tensor_parallel/layers.py``):

* ``linear_qkv`` (column parallel) holds, per query group, the group's query heads, then its key
  head, then its value head: rows ``[q_1 .. q_{h/g}, k, v]`` for each of the ``g`` groups, each head
  ``head_dim`` rows. Tensor parallelism splits the rows, so rank ``r`` holds groups
  ``[r g/tp, (r+1) g/tp)``. GPT-2 (plain multi-head attention) is the case ``g = h``.
* ``linear_fc1`` with SwiGLU holds ``[gate; up]`` per rank: rank ``r``'s rows are its slice of
  ``gate_proj`` followed by its slice of ``up_proj`` (``silu(first half) * second half``).
* ``linear_proj`` and ``linear_fc2`` (row parallel) split their input columns; their biases are
  replicated. Norms and position embeddings are replicated.
* The vocabulary (embedding rows, output-layer rows) is padded to a multiple of 128 x tp and split
  in equal row blocks; padded rows hold zeros.
* GPT-2's ``Conv1D`` stores ``[in, out]``: its blocks are transposed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from parallel.config import ModelArch
from parallel.hf.spec import HFModelSpec

Range = tuple[int, int]


@dataclass(frozen=True)
class Piece:
    """Copy ``source[rows, cols]`` (transposed when ``transpose``) into the destination.

    The block (after the optional transpose) has ``n`` rows; they are written in chunks of
    ``chunk`` rows, chunk ``c`` at destination rows ``[offset + c stride, offset + c stride +
    chunk)``, all destination columns. ``chunk=None`` writes the block contiguously at ``offset``.
    """

    source: str
    """Hugging Face tensor name."""
    rows: Range | None = None
    """Source dim-0 range (``None``: all)."""
    cols: Range | None = None
    """Source dim-1 range of a 2-D source (``None``: all)."""
    transpose: bool = False
    """Transpose the 2-D block before placing it (GPT-2 ``Conv1D``)."""
    offset: int = 0
    """First destination row."""
    chunk: int | None = None
    """Rows per destination chunk (``None``: one contiguous block)."""
    stride: int = 0
    """Destination rows between the starts of consecutive chunks."""


# ---------------------------------------------------------------------------------------------
# Hugging Face names and shapes
# ---------------------------------------------------------------------------------------------


def gpt2_prefix(tensor_names: Mapping[str, object] | Sequence[str]) -> str:
    """``transformer.`` for files saved from ``GPT2LMHeadModel``, empty for ``GPT2Model`` files
    (the original OpenAI checkpoints on the Hub)."""
    return "" if "wte.weight" in tensor_names else "transformer."


def _llama_names(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    return {
        "ln1": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.",
        "k": p + "self_attn.k_proj.",
        "v": p + "self_attn.v_proj.",
        "o": p + "self_attn.o_proj.",
        "q_norm": p + "self_attn.q_norm.weight",
        "k_norm": p + "self_attn.k_norm.weight",
        "ln2": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.",
        "up": p + "mlp.up_proj.",
        "down": p + "mlp.down_proj.",
    }


def _gpt2_names(layer: int, prefix: str) -> dict[str, str]:
    p = f"{prefix}h.{layer}."
    return {
        "ln1": p + "ln_1.",
        "qkv": p + "attn.c_attn.",
        "proj": p + "attn.c_proj.",
        "ln2": p + "ln_2.",
        "fc": p + "mlp.c_fc.",
        "fc_proj": p + "mlp.c_proj.",
    }


def embedding_name(spec: HFModelSpec, prefix: str = "") -> str:
    return "model.embed_tokens.weight" if spec.family == "llama" else f"{prefix}wte.weight"


def expected_shapes(spec: HFModelSpec, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the conversion reads, with the full shape ``config.json``
    implies."""
    a = spec.arch
    h, f, d, v = a.hidden_size, a.ffn_size, a.head_dim, a.vocab_size
    q_rows, kv_rows = a.num_attention_heads * d, a.query_groups * d
    shapes: dict[str, tuple[int, ...]] = {embedding_name(spec, prefix): (v, h)}
    if spec.family == "gpt2":
        shapes[f"{prefix}wpe.weight"] = (a.max_seq_len, h)
        shapes[f"{prefix}ln_f.weight"] = (h,)
        shapes[f"{prefix}ln_f.bias"] = (h,)
        for layer in range(a.num_layers):
            n = _gpt2_names(layer, prefix)
            for key, w_shape, b_shape in (
                ("ln1", (h,), (h,)),
                ("qkv", (h, 3 * h), (3 * h,)),
                ("proj", (h, h), (h,)),
                ("ln2", (h,), (h,)),
                ("fc", (h, f), (f,)),
                ("fc_proj", (f, h), (h,)),
            ):
                shapes[n[key] + "weight"] = w_shape
                shapes[n[key] + "bias"] = b_shape
    else:
        shapes["model.norm.weight"] = (h,)
        all_bias = a.add_bias_linear
        qkv_bias = all_bias or a.add_qkv_bias
        for layer in range(a.num_layers):
            n = _llama_names(layer)
            shapes[n["ln1"]] = (h,)
            shapes[n["ln2"]] = (h,)
            for key, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                shapes[n[key] + "weight"] = (rows, h)
                if qkv_bias:
                    shapes[n[key] + "bias"] = (rows,)
            shapes[n["o"] + "weight"] = (h, q_rows)
            if a.qk_layernorm:
                shapes[n["q_norm"]] = (d,)
                shapes[n["k_norm"]] = (d,)
            for key in ("gate", "up"):
                shapes[n[key] + "weight"] = (f, h)
            shapes[n["down"] + "weight"] = (h, f)
            if all_bias:
                shapes[n["o"] + "bias"] = (h,)
                for key in ("gate", "up"):
                    shapes[n[key] + "bias"] = (f,)
                shapes[n["down"] + "bias"] = (h,)
    if not a.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


# ---------------------------------------------------------------------------------------------
# the plan of one rank
# ---------------------------------------------------------------------------------------------


def _split(total: int, tp_rank: int, tp_size: int) -> Range:
    size = total // tp_size
    return tp_rank * size, (tp_rank + 1) * size


def _vocab_rows(arch: ModelArch, tp_rank: int, tp_size: int) -> Range | None:
    """The real (unpadded) vocabulary rows of rank ``tp_rank``'s padded shard, or ``None`` when
    the shard is all padding."""
    start, end = _split(arch.padded_vocab(tp_size), tp_rank, tp_size)
    end = min(end, arch.vocab_size)
    return (start, end) if start < end else None


def _vocab_pieces(source: str, arch: ModelArch, tp_rank: int, tp_size: int) -> list[Piece]:
    rows = _vocab_rows(arch, tp_rank, tp_size)
    return [Piece(source, rows=rows)] if rows else []


def _grouped_qkv(arch: ModelArch, tp_rank: int, tp_size: int, names: Sequence[str], suffix: str):
    """Pieces of a local ``linear_qkv`` weight or bias from separate q, k, v tensors."""
    d, groups = arch.head_dim, arch.query_groups
    per_group = arch.num_attention_heads // groups
    g0, g1 = _split(groups, tp_rank, tp_size)
    stride = (per_group + 2) * d
    q, k, v = (n + suffix for n in names)
    return [
        Piece(q, rows=(g0 * per_group * d, g1 * per_group * d), chunk=per_group * d, stride=stride),
        Piece(k, rows=(g0 * d, g1 * d), offset=per_group * d, chunk=d, stride=stride),
        Piece(v, rows=(g0 * d, g1 * d), offset=(per_group + 1) * d, chunk=d, stride=stride),
    ]


def _llama_layer(arch: ModelArch, layer: int, tp_rank: int, tp_size: int) -> dict[str, list[Piece]]:
    n = _llama_names(layer)
    ffn = _split(arch.ffn_size, tp_rank, tp_size)
    local_ffn = ffn[1] - ffn[0]
    attn_cols = _split(arch.num_attention_heads * arch.head_dim, tp_rank, tp_size)
    plan = {
        "input_layernorm.weight": [Piece(n["ln1"])],
        "self_attention.linear_qkv.weight": _grouped_qkv(
            arch, tp_rank, tp_size, (n["q"], n["k"], n["v"]), "weight"
        ),
        "self_attention.linear_proj.weight": [Piece(n["o"] + "weight", cols=attn_cols)],
        "pre_mlp_layernorm.weight": [Piece(n["ln2"])],
        "mlp.linear_fc1.weight": [
            Piece(n["gate"] + "weight", rows=ffn),
            Piece(n["up"] + "weight", rows=ffn, offset=local_ffn),
        ],
        "mlp.linear_fc2.weight": [Piece(n["down"] + "weight", cols=ffn)],
    }
    if arch.add_bias_linear or arch.add_qkv_bias:
        plan["self_attention.linear_qkv.bias"] = _grouped_qkv(
            arch, tp_rank, tp_size, (n["q"], n["k"], n["v"]), "bias"
        )
    if arch.add_bias_linear:
        plan["self_attention.linear_proj.bias"] = [Piece(n["o"] + "bias")]
        plan["mlp.linear_fc1.bias"] = [
            Piece(n["gate"] + "bias", rows=ffn),
            Piece(n["up"] + "bias", rows=ffn, offset=local_ffn),
        ]
        plan["mlp.linear_fc2.bias"] = [Piece(n["down"] + "bias")]
    if arch.qk_layernorm:
        plan["self_attention.q_layernorm.weight"] = [Piece(n["q_norm"])]
        plan["self_attention.k_layernorm.weight"] = [Piece(n["k_norm"])]
    return plan


def _gpt2_layer(
    arch: ModelArch, layer: int, tp_rank: int, tp_size: int, prefix: str
) -> dict[str, list[Piece]]:
    n = _gpt2_names(layer, prefix)
    h, d = arch.hidden_size, arch.head_dim
    heads = _split(arch.num_attention_heads, tp_rank, tp_size)
    cols = (heads[0] * d, heads[1] * d)
    ffn = _split(arch.ffn_size, tp_rank, tp_size)
    qkv_w, qkv_b = [], []
    # c_attn's output columns are [q (all heads) | k | v]; megatron wants [q_i, k_i, v_i] per head.
    for part in range(3):
        span = (part * h + cols[0], part * h + cols[1])
        qkv_w.append(
            Piece(
                n["qkv"] + "weight",
                cols=span,
                transpose=True,
                offset=part * d,
                chunk=d,
                stride=3 * d,
            )
        )
        qkv_b.append(Piece(n["qkv"] + "bias", rows=span, offset=part * d, chunk=d, stride=3 * d))
    return {
        "input_layernorm.weight": [Piece(n["ln1"] + "weight")],
        "input_layernorm.bias": [Piece(n["ln1"] + "bias")],
        "self_attention.linear_qkv.weight": qkv_w,
        "self_attention.linear_qkv.bias": qkv_b,
        "self_attention.linear_proj.weight": [
            Piece(n["proj"] + "weight", rows=cols, transpose=True)
        ],
        "self_attention.linear_proj.bias": [Piece(n["proj"] + "bias")],
        "pre_mlp_layernorm.weight": [Piece(n["ln2"] + "weight")],
        "pre_mlp_layernorm.bias": [Piece(n["ln2"] + "bias")],
        "mlp.linear_fc1.weight": [Piece(n["fc"] + "weight", cols=ffn, transpose=True)],
        "mlp.linear_fc1.bias": [Piece(n["fc"] + "bias", rows=ffn)],
        "mlp.linear_fc2.weight": [Piece(n["fc_proj"] + "weight", rows=ffn, transpose=True)],
        "mlp.linear_fc2.bias": [Piece(n["fc_proj"] + "bias")],
    }


def shard_plan(
    spec: HFModelSpec,
    *,
    tp_rank: int,
    tp_size: int,
    layers: Sequence[tuple[int, int]],
    pre_process: bool,
    post_process: bool,
    prefix: str = "",
) -> dict[str, list[Piece]]:
    """Pieces of every parameter of one rank's GPTModel (local layer-spec names).

    ``layers``: ``(local index, global layer index)`` of the decoder layers this pipeline stage
    holds. ``pre_process``/``post_process``: the stage holds the embedding / the final norm and
    output layer. A parameter with no piece for some rows (vocabulary padding) gets zeros there.
    """
    arch = spec.arch
    plan: dict[str, list[Piece]] = {}
    for local, global_index in layers:
        if spec.family == "llama":
            layer_plan = _llama_layer(arch, global_index, tp_rank, tp_size)
        else:
            layer_plan = _gpt2_layer(arch, global_index, tp_rank, tp_size, prefix)
        plan.update({f"decoder.layers.{local}.{k}": v for k, v in layer_plan.items()})
    embedding = embedding_name(spec, prefix)
    if pre_process:
        plan["embedding.word_embeddings.weight"] = _vocab_pieces(embedding, arch, tp_rank, tp_size)
        if spec.family == "gpt2":
            plan["embedding.position_embeddings.weight"] = [Piece(f"{prefix}wpe.weight")]
    if post_process:
        if spec.family == "gpt2":
            plan["decoder.final_layernorm.weight"] = [Piece(f"{prefix}ln_f.weight")]
            plan["decoder.final_layernorm.bias"] = [Piece(f"{prefix}ln_f.bias")]
        else:
            plan["decoder.final_layernorm.weight"] = [Piece("model.norm.weight")]
        if not arch.tie_embeddings:
            plan["output_layer.weight"] = _vocab_pieces("lm_head.weight", arch, tp_rank, tp_size)
        elif not pre_process:
            # Tied embeddings across pipeline stages: the last stage keeps its own copy of the
            # embedding as the output layer (megatron syncs the two copies' gradients).
            plan["output_layer.weight"] = _vocab_pieces(embedding, arch, tp_rank, tp_size)
    return plan
