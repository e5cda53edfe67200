"""The Llama layout: ``LlamaForCausalLM`` (Llama 2 and 3), ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (biases on q/k/v only) and ``Qwen3ForCausalLM`` (RMSNorm on queries and keys
per head, explicit ``head_dim``).

RMSNorm, SwiGLU, rotary embeddings (non-interleaved ``rotate_half``, as megatron's default),
grouped-query attention, separate ``q_proj``/``k_proj``/``v_proj`` (fused into megatron's grouped
``linear_qkv``) and ``gate_proj``/``up_proj`` (fused into ``linear_fc1`` as ``[gate; up]`` per
tensor rank).

RoPE scaling (``rope_scaling`` / ``rope_parameters`` with ``rope_type`` ``linear``, ``llama3``
or ``yarn``; :mod:`parallel.rope`) and ``rope_theta`` are carried in
:class:`~parallel.config.ModelArch` and written back on export. Sliding-window attention (Mistral
v0.1, Qwen with ``use_sliding_window``) is built when it applies to every layer
(:attr:`ModelArch.sliding_window`; :func:`parallel.model.build_gpt`).

Not supported (a clear error names the ``config.json`` key and value): other RoPE types
(``dynamic``, ``longrope``, ...), partial rotary embeddings, per-layer RoPE blocks, a sliding
window in some layers only (Qwen's ``max_window_layers`` between 0 and the layer count), biases
on a subset of linears other than "q/k/v only" or "all".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parallel import rope
from parallel.config import ModelArch
from parallel.families.base import (
    HFConversionError,
    HFModelSpec,
    MlpActivation,
    ModelFamily,
    Piece,
    config_dtype,
    grouped_qkv,
    require,
    split,
    split_qkv,
)


def _rope(config: dict[str, Any], where: str) -> tuple[int | float, dict[str, Any] | None]:
    """RoPE base and scaling (:attr:`ModelArch.rope_scaling`), from ``rope_parameters``
    (transformers >= 5) or ``rope_theta``/``rope_scaling`` (older files)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for source, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(block, dict):
            raise HFConversionError(f"{where}: {source} must be a mapping, got {block!r}")
        if any(isinstance(v, dict) for v in block.values()):
            raise HFConversionError(
                f"{where}: {source} holds one block per layer type ({', '.join(block)}); "
                "per-layer RoPE is not supported"
            )
        partial = block.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise HFConversionError(
                f"{where}: {source}.partial_rotary_factor={partial} (partial rotary embeddings) "
                "is not supported; supported: 1.0"
            )
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFConversionError(
            f"{where}: partial_rotary_factor={config['partial_rotary_factor']} (partial rotary "
            "embeddings) is not supported; supported: 1.0"
        )
    # transformers >= 5 writes rope_parameters; a scaled rope_scaling beside a default
    # rope_parameters is an older file's (or a hand edit): the scaled block decides.
    source, block = ("rope_parameters", params)
    if rope.rope_type_of(params) == "default" and rope.rope_type_of(scaling) != "default":
        source, block = ("rope_scaling", scaling)
    elif (
        rope.rope_type_of(params) != "default"
        and rope.rope_type_of(scaling) != "default"
        and rope.rope_type_of(params) != rope.rope_type_of(scaling)
    ):
        raise HFConversionError(
            f"{where}: rope_parameters.rope_type={rope.rope_type_of(params)} and "
            f"rope_scaling.rope_type={rope.rope_type_of(scaling)} disagree; keep one"
        )
    max_pos = config.get("max_position_embeddings")
    try:
        scaled = rope.from_hf(
            block,
            max_position_embeddings=int(max_pos) if max_pos else None,
            original_max_position_embeddings=config.get("original_max_position_embeddings"),
            where=source,
        )
    except rope.RopeScalingError as err:
        raise HFConversionError(f"{where}: {err}") from None
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    return (int(theta) if theta.is_integer() else theta), scaled


def _sliding_window(
    config: dict[str, Any], model_type: str, num_layers: int, where: str
) -> int | None:
    """The attention window when sliding-window attention is in effect (in every layer), else
    ``None``; a window in some layers only is refused."""
    window = config.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window"):
        return None  # transformers ignores sliding_window then
    if not window:
        return None
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        sliding = [t == "sliding_attention" for t in layer_types]
        which = "layer_types"
    elif model_type in ("qwen2", "qwen3"):
        # transformers' default (Qwen2Config, Qwen3Config) when the file does not say
        window_layers = config.get("max_window_layers")
        first = 28 if window_layers is None else int(window_layers)
        sliding = [i >= first for i in range(num_layers)]
        which = f"max_window_layers={first}"
    else:
        sliding = [True] * num_layers
        which = ""
    if not any(sliding):
        return None
    if not all(sliding):
        raise HFConversionError(
            f"{where}: sliding-window attention in {sum(sliding)} of {len(sliding)} layers only "
            f"({which}) is not supported; gkd applies sliding_window={window} to all layers or "
            "none (set use_sliding_window: false for full attention everywhere, which changes "
            "the model for sequences longer than the window)"
        )
    return int(window)


def _bias_flags(config: dict[str, Any], model_type: str, where: str) -> dict[str, bool]:
    """Which linears carry biases, as ModelArch flags. megatron-core's GPT has biases on all
    linears (``add_bias_linear``) or on the QKV projection only (``add_qkv_bias``)."""
    if model_type == "qwen2":
        qkv, out, mlp = True, False, False
    elif model_type == "qwen3":
        qkv = out = bool(config.get("attention_bias", False))
        mlp = False
    elif model_type == "mistral":
        qkv = out = mlp = False
    else:  # llama
        qkv = out = bool(config.get("attention_bias", False))
        mlp = bool(config.get("mlp_bias", False))
    if qkv and out and mlp:
        return {"add_bias_linear": True, "add_qkv_bias": False}
    if not (qkv or out or mlp):
        return {"add_bias_linear": False, "add_qkv_bias": False}
    if qkv and not (out or mlp):
        return {"add_bias_linear": False, "add_qkv_bias": True}
    present = [n for n, on in (("q/k/v", qkv), ("o_proj", out), ("mlp", mlp)) if on]
    raise HFConversionError(
        f"{where}: biases on {' and '.join(present)} only are not supported (megatron-core's GPT "
        "has biases on all linears or on q/k/v only)"
    )


def _names(layer: int) -> dict[str, str]:
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


class LlamaFamily(ModelFamily):
    name = "llama"
    architectures = {
        "LlamaForCausalLM": "llama",
        "MistralForCausalLM": "mistral",
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3",
    }
    aliases = {"MistralForCausalLM": "LlamaForCausalLM"}
    position_embedding = "rope"
    hf_keys = {
        "num_layers": "num_hidden_layers",
        "hidden_size": "hidden_size",
        "num_attention_heads": "num_attention_heads",
        "num_query_groups": "num_key_value_heads",
        "ffn_hidden_size": "intermediate_size",
        "kv_channels": "head_dim",
        "vocab_size": "vocab_size",
        "max_seq_len": "max_position_embeddings",
        "norm_epsilon": "rms_norm_eps",
        "rotary_base": "rope_theta",
        "rope_scaling": "rope_scaling",
        "sliding_window": "sliding_window",
        "tie_embeddings": "tie_word_embeddings",
        "add_qkv_bias": "attention_bias (Qwen2: always)",
        "add_bias_linear": "attention_bias and mlp_bias",
        "qk_layernorm": "architectures (Qwen3ForCausalLM)",
    }

    # --- config.json <-> ModelArch --------------------------------------------------------------

    def spec_from_config(
        self, config: dict[str, Any], architecture: str, where: str
    ) -> HFModelSpec:
        model_type = config.get("model_type") or self.architectures[architecture]
        act = config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise HFConversionError(
                f"{where}: hidden_act={act!r} is not supported (SwiGLU needs silu)"
            )
        hidden = int(require(config, "hidden_size", where))
        heads = int(require(config, "num_attention_heads", where))
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        max_pos = int(config.get("max_position_embeddings") or 2048)
        num_layers = int(require(config, "num_hidden_layers", where))
        notes: list[str] = []
        window = _sliding_window(config, model_type, num_layers, where)
        rotary_base, rope_scaling = _rope(config, where)
        arch = ModelArch.llama(
            num_layers=num_layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            vocab_size=int(require(config, "vocab_size", where)),
            max_seq_len=max_pos,
            num_query_groups=None if kv_heads == heads else kv_heads,
            kv_channels=head_dim if hidden % heads or head_dim != hidden // heads else None,
            norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
            rotary_base=rotary_base,
            rope_scaling=rope_scaling,
            sliding_window=window,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_layernorm=model_type == "qwen3",
            **_bias_flags(config, model_type, where),
        )
        ffn = int(require(config, "intermediate_size", where))
        if ffn != arch.ffn_size:
            arch.ffn_hidden_size = ffn
        return HFModelSpec(
            architecture=architecture,
            model_type=model_type,
            family=self,
            arch=arch,
            mlp_activation="silu",
            dtype=config_dtype(config),
            config=config,
            notes=tuple(notes),
        )

    def export_problems(self, arch: ModelArch) -> list[str]:
        problems = []
        if arch.normalization != "RMSNorm":
            problems.append(f"rotary models need RMSNorm, not {arch.normalization}")
        if arch.activation != "swiglu":
            problems.append(f"rotary models need SwiGLU, not {arch.activation}")
        if arch.qk_layernorm and arch.add_qkv_bias and not arch.add_bias_linear:
            problems.append("qk_layernorm with q/k/v-only biases has no Hugging Face counterpart")
        if arch.sliding_window is not None and arch.add_bias_linear and not arch.qk_layernorm:
            problems.append(
                "sliding_window with biases on all linears has no Hugging Face counterpart "
                "(MistralForCausalLM has no biases, LlamaForCausalLM no sliding window)"
            )
        try:
            rope.check(arch.rope_scaling)
        except rope.RopeScalingError as err:
            problems.append(str(err))
        return problems

    def export_architecture(self, arch: ModelArch) -> str:
        if arch.qk_layernorm:
            return "Qwen3ForCausalLM"
        if arch.add_qkv_bias and not arch.add_bias_linear:
            return "Qwen2ForCausalLM"
        if arch.sliding_window is not None:
            return "MistralForCausalLM"
        return "LlamaForCausalLM"

    def export_config(
        self,
        arch: ModelArch,
        config: dict[str, Any],
        *,
        architecture: str,
        mlp_activation: MlpActivation | None,
        from_source: bool,
    ) -> None:
        theta = float(arch.rotary_base)
        config.update(
            hidden_size=arch.hidden_size,
            intermediate_size=arch.ffn_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_attention_heads,
            num_key_value_heads=arch.query_groups,
            head_dim=arch.head_dim,
            hidden_act="silu",
            max_position_embeddings=config.get("max_position_embeddings", arch.max_seq_len)
            if from_source
            else arch.max_seq_len,
            rms_norm_eps=arch.norm_epsilon,
            rope_theta=theta,
            # transformers >= 5 reads rope_parameters, older versions rope_theta + rope_scaling
            rope_parameters={
                **(rope.to_hf(arch.rope_scaling) or {"rope_type": "default"}),
                "rope_theta": theta,
            },
            rope_scaling=rope.to_hf(arch.rope_scaling),
        )
        config.pop("original_max_position_embeddings", None)  # in rope_scaling when used
        window = arch.sliding_window
        if architecture == "MistralForCausalLM":
            config["sliding_window"] = window
        elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            config["use_sliding_window"] = window is not None
            config["sliding_window"] = window
            config["max_window_layers"] = 0 if window is not None else arch.num_layers
            kind = "full_attention" if window is None else "sliding_attention"
            config["layer_types"] = [kind] * arch.num_layers
        else:
            for key in ("sliding_window", "use_sliding_window", "max_window_layers"):
                config.pop(key, None)
            if "layer_types" in config:
                config["layer_types"] = ["full_attention"] * arch.num_layers
        if architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
            config["attention_bias"] = arch.add_bias_linear
        if architecture == "LlamaForCausalLM":
            config["mlp_bias"] = arch.add_bias_linear

    # --- tensor map ------------------------------------------------------------------------------

    def embedding_name(self, prefix: str = "") -> str:
        return "model.embed_tokens.weight"

    def expected_shapes(self, arch: ModelArch, prefix: str = "") -> dict[str, tuple[int, ...]]:
        a = arch
        h, f, d = a.hidden_size, a.ffn_size, a.head_dim
        q_rows, kv_rows = a.num_attention_heads * d, a.query_groups * d
        shapes: dict[str, tuple[int, ...]] = {
            self.embedding_name(): (a.vocab_size, h),
            "model.norm.weight": (h,),
        }
        all_bias = a.add_bias_linear
        qkv_bias = all_bias or a.add_qkv_bias
        for layer in range(a.num_layers):
            n = _names(layer)
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
        return shapes

    def layer_plan(
        self, arch: ModelArch, layer: int, tp_rank: int, tp_size: int, prefix: str
    ) -> dict[str, list[Piece]]:
        n = _names(layer)
        ffn = split(arch.ffn_size, tp_rank, tp_size)
        local_ffn = ffn[1] - ffn[0]
        attn_cols = split(arch.num_attention_heads * arch.head_dim, tp_rank, tp_size)
        qkv = (n["q"], n["k"], n["v"])
        plan = {
            "input_layernorm.weight": [Piece(n["ln1"])],
            "self_attention.linear_qkv.weight": grouped_qkv(arch, tp_rank, tp_size, qkv, "weight"),
            "self_attention.linear_proj.weight": [Piece(n["o"] + "weight", cols=attn_cols)],
            "pre_mlp_layernorm.weight": [Piece(n["ln2"])],
            "mlp.linear_fc1.weight": [
                Piece(n["gate"] + "weight", rows=ffn),
                Piece(n["up"] + "weight", rows=ffn, offset=local_ffn),
            ],
            "mlp.linear_fc2.weight": [Piece(n["down"] + "weight", cols=ffn)],
        }
        if arch.add_bias_linear or arch.add_qkv_bias:
            plan["self_attention.linear_qkv.bias"] = grouped_qkv(
                arch, tp_rank, tp_size, qkv, "bias"
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

    def first_stage_tensors(self, prefix: str = "") -> dict[str, str]:
        return {}

    def last_stage_tensors(self, prefix: str = "") -> dict[str, str]:
        return {"decoder.final_layernorm.weight": "model.norm.weight"}

    def export_layer(self, sd: Mapping[str, Any], arch: ModelArch, layer: int) -> dict[str, Any]:
        m, p = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        q, k, v = split_qkv(sd[m + "self_attention.linear_qkv.weight"], arch)
        gate, up = sd[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out = {
            p + "input_layernorm.weight": sd[m + "input_layernorm.weight"],
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": sd[m + "self_attention.linear_proj.weight"],
            p + "post_attention_layernorm.weight": sd[m + "pre_mlp_layernorm.weight"],
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": sd[m + "mlp.linear_fc2.weight"],
        }
        if arch.add_bias_linear or arch.add_qkv_bias:
            qb, kb, vb = split_qkv(sd[m + "self_attention.linear_qkv.bias"], arch)
            out.update(
                {
                    p + "self_attn.q_proj.bias": qb,
                    p + "self_attn.k_proj.bias": kb,
                    p + "self_attn.v_proj.bias": vb,
                }
            )
        if arch.add_bias_linear:
            gate_b, up_b = sd[m + "mlp.linear_fc1.bias"].chunk(2, dim=0)
            out.update(
                {
                    p + "self_attn.o_proj.bias": sd[m + "self_attention.linear_proj.bias"],
                    p + "mlp.gate_proj.bias": gate_b,
                    p + "mlp.up_proj.bias": up_b,
                    p + "mlp.down_proj.bias": sd[m + "mlp.linear_fc2.bias"],
                }
            )
        if arch.qk_layernorm:
            out[p + "self_attn.q_norm.weight"] = sd[m + "self_attention.q_layernorm.weight"]
            out[p + "self_attn.k_norm.weight"] = sd[m + "self_attention.k_layernorm.weight"]
        return out


LLAMA = LlamaFamily()
