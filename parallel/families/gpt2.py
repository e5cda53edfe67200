"""The GPT-2 layout: ``GPT2LMHeadModel``.

LayerNorm, GeLU (exact or GPT-2's tanh approximation ``gelu_new``), learned positions, biases
everywhere, tied embeddings by default, one fused ``c_attn`` whose output columns are
``[q (all heads) | k | v]``, and ``Conv1D`` weights stored transposed (``[in, out]``). Files saved
from ``GPT2LMHeadModel`` name tensors ``transformer.*``; the original OpenAI checkpoints on the
Hub (saved from ``GPT2Model``) have no prefix.

Not supported (a clear error names them): attention scaled by the inverse layer index or not
scaled, cross-attention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from parallel.config import ModelArch
from parallel.families.base import (
    HFConversionError,
    HFModelSpec,
    MlpActivation,
    ModelFamily,
    Piece,
    config_dtype,
    require,
    split,
)

GELU_TANH = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}
"""Hugging Face names of the tanh approximation of GeLU (GPT-2's ``gelu_new``)."""


def _names(layer: int, prefix: str) -> dict[str, str]:
    p = f"{prefix}h.{layer}."
    return {
        "ln1": p + "ln_1.",
        "qkv": p + "attn.c_attn.",
        "proj": p + "attn.c_proj.",
        "ln2": p + "ln_2.",
        "fc": p + "mlp.c_fc.",
        "fc_proj": p + "mlp.c_proj.",
    }


class GPT2Family(ModelFamily):
    name = "gpt2"
    architectures = {"GPT2LMHeadModel": "gpt2"}
    position_embedding = "learned"
    hf_keys = {
        "num_layers": "n_layer",
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_query_groups": "n_head",
        "ffn_hidden_size": "n_inner (default 4 x n_embd)",
        "kv_channels": "n_embd / n_head",
        "vocab_size": "vocab_size",
        "max_seq_len": "n_positions",
        "norm_epsilon": "layer_norm_epsilon",
        "tie_embeddings": "tie_word_embeddings",
        "activation": "activation_function",
    }
    export_prefix = "transformer."

    # --- config.json <-> ModelArch --------------------------------------------------------------

    def spec_from_config(
        self, config: dict[str, Any], architecture: str, where: str
    ) -> HFModelSpec:
        act = config.get("activation_function", "gelu_new")
        activation: Literal["gelu", "gelu_tanh"]
        if act in GELU_TANH:
            activation = "gelu_tanh"
        elif act == "gelu":
            activation = "gelu"
        else:
            raise HFConversionError(
                f"{where}: activation_function={act!r} is not supported (gelu, gelu_new, "
                "gelu_pytorch_tanh)"
            )
        if not config.get("scale_attn_weights", True) or config.get(
            "scale_attn_by_inverse_layer_idx"
        ):
            raise HFConversionError(
                f"{where}: only 1/sqrt(head_dim) attention scaling is supported "
                "(scale_attn_weights true, scale_attn_by_inverse_layer_idx false)"
            )
        if config.get("add_cross_attention"):
            raise HFConversionError(f"{where}: add_cross_attention is not supported")
        arch = ModelArch.gpt2(
            num_layers=int(require(config, "n_layer", where)),
            hidden_size=int(require(config, "n_embd", where)),
            num_attention_heads=int(require(config, "n_head", where)),
            vocab_size=int(require(config, "vocab_size", where)),
            max_seq_len=int(config.get("n_positions") or 1024),
            norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(config.get("tie_word_embeddings", True)),
            activation=activation,
        )
        if config.get("n_inner") and int(config["n_inner"]) != arch.ffn_size:
            arch.ffn_hidden_size = int(config["n_inner"])
        return HFModelSpec(
            architecture=architecture,
            model_type=config.get("model_type") or "gpt2",
            family=self,
            arch=arch,
            mlp_activation=activation,
            dtype=config_dtype(config),
            config=config,
        )

    def export_problems(self, arch: ModelArch) -> list[str]:
        problems = []
        if arch.normalization != "LayerNorm":
            problems.append(f"GPT-2 needs LayerNorm, not {arch.normalization}")
        if arch.activation == "swiglu":
            problems.append("GPT-2 needs GeLU, not SwiGLU")
        if not arch.add_bias_linear:
            problems.append("GPT-2 needs biases on all linears (add_bias_linear)")
        if arch.qk_layernorm:
            problems.append("GPT-2 has no qk_layernorm")
        if arch.query_groups != arch.num_attention_heads:
            problems.append("GPT-2 has no grouped-query attention")
        if arch.head_dim * arch.num_attention_heads != arch.hidden_size:
            problems.append("GPT-2 needs kv_channels = hidden_size / num_attention_heads")
        if arch.sliding_window is not None:
            problems.append("GPT-2 has no sliding-window attention")
        return problems

    def export_architecture(self, arch: ModelArch) -> str:
        return "GPT2LMHeadModel"

    def export_config(
        self,
        arch: ModelArch,
        config: dict[str, Any],
        *,
        architecture: str,
        mlp_activation: MlpActivation | None,
        from_source: bool,
    ) -> None:
        act = mlp_activation or ("gelu_tanh" if arch.activation == "gelu_tanh" else "gelu")
        config.update(
            n_embd=arch.hidden_size,
            n_layer=arch.num_layers,
            n_head=arch.num_attention_heads,
            n_positions=arch.max_seq_len,
            n_inner=arch.ffn_size,
            layer_norm_epsilon=arch.norm_epsilon,
            activation_function="gelu_new" if act == "gelu_tanh" else "gelu",
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
        )

    # --- tensor map ------------------------------------------------------------------------------

    def tensor_prefix(self, tensor_names: Mapping[str, object] | Sequence[str]) -> str:
        """``transformer.`` for files saved from ``GPT2LMHeadModel``, empty for ``GPT2Model``
        files (the original OpenAI checkpoints on the Hub)."""
        return "" if "wte.weight" in tensor_names else "transformer."

    def embedding_name(self, prefix: str = "") -> str:
        return f"{prefix}wte.weight"

    def expected_shapes(self, arch: ModelArch, prefix: str = "") -> dict[str, tuple[int, ...]]:
        a = arch
        h, f = a.hidden_size, a.ffn_size
        shapes: dict[str, tuple[int, ...]] = {
            self.embedding_name(prefix): (a.vocab_size, h),
            f"{prefix}wpe.weight": (a.max_seq_len, h),
            f"{prefix}ln_f.weight": (h,),
            f"{prefix}ln_f.bias": (h,),
        }
        for layer in range(a.num_layers):
            n = _names(layer, prefix)
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
        return shapes

    def layer_plan(
        self, arch: ModelArch, layer: int, tp_rank: int, tp_size: int, prefix: str
    ) -> dict[str, list[Piece]]:
        n = _names(layer, prefix)
        h, d = arch.hidden_size, arch.head_dim
        heads = split(arch.num_attention_heads, tp_rank, tp_size)
        cols = (heads[0] * d, heads[1] * d)
        ffn = split(arch.ffn_size, tp_rank, tp_size)
        qkv_w, qkv_b = [], []
        # c_attn's output columns are [q (all heads) | k | v]; megatron wants [q_i, k_i, v_i] per
        # head.
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
            qkv_b.append(
                Piece(n["qkv"] + "bias", rows=span, offset=part * d, chunk=d, stride=3 * d)
            )
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

    def first_stage_tensors(self, prefix: str = "") -> dict[str, str]:
        return {"embedding.position_embeddings.weight": f"{prefix}wpe.weight"}

    def last_stage_tensors(self, prefix: str = "") -> dict[str, str]:
        return {
            "decoder.final_layernorm.weight": f"{prefix}ln_f.weight",
            "decoder.final_layernorm.bias": f"{prefix}ln_f.bias",
        }

    def export_layer(self, sd: Mapping[str, Any], arch: ModelArch, layer: int) -> dict[str, Any]:
        m, p = f"decoder.layers.{layer}.", f"{self.export_prefix}h.{layer}."
        heads, d = arch.num_attention_heads, arch.head_dim
        # Per-head [q_i, k_i, v_i] rows -> [q | k | v] (GPT-2's c_attn output order), then the
        # Conv1D [in, out] storage.
        qkv_w = sd[m + "self_attention.linear_qkv.weight"].reshape(heads, 3, d, -1)
        qkv_b = sd[m + "self_attention.linear_qkv.bias"].reshape(heads, 3, d)
        return {
            p + "ln_1.weight": sd[m + "input_layernorm.weight"],
            p + "ln_1.bias": sd[m + "input_layernorm.bias"],
            p + "attn.c_attn.weight": qkv_w.transpose(0, 1).reshape(3 * heads * d, -1).t(),
            p + "attn.c_attn.bias": qkv_b.transpose(0, 1).reshape(-1),
            p + "attn.c_proj.weight": sd[m + "self_attention.linear_proj.weight"].t(),
            p + "attn.c_proj.bias": sd[m + "self_attention.linear_proj.bias"],
            p + "ln_2.weight": sd[m + "pre_mlp_layernorm.weight"],
            p + "ln_2.bias": sd[m + "pre_mlp_layernorm.bias"],
            p + "mlp.c_fc.weight": sd[m + "mlp.linear_fc1.weight"].t(),
            p + "mlp.c_fc.bias": sd[m + "mlp.linear_fc1.bias"],
            p + "mlp.c_proj.weight": sd[m + "mlp.linear_fc2.weight"].t(),
            p + "mlp.c_proj.bias": sd[m + "mlp.linear_fc2.bias"],
        }


GPT2 = GPT2Family()
