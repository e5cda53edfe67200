"""Hugging Face ``config.json`` <-> :class:`~parallel.config.ModelArch`.

Two tensor-layout families cover the supported architectures:

* ``llama``: ``LlamaForCausalLM`` (Llama 2 and 3), ``MistralForCausalLM``, ``Qwen2ForCausalLM``
  (biases on q/k/v only) and ``Qwen3ForCausalLM`` (RMSNorm on queries and keys per head, explicit
  ``head_dim``): RMSNorm, SwiGLU, rotary embeddings (non-interleaved ``rotate_half``, as megatron's
  default), grouped-query attention.
* ``gpt2``: ``GPT2LMHeadModel``: LayerNorm, GeLU, learned positions, biases everywhere, tied
  embeddings, ``Conv1D`` weights stored transposed (``[in, out]``).

Importing this module imports neither torch nor megatron-core (the CLI validates with it before
launching workers).

Not supported (a clear error names them): RoPE scaling (``rope_type`` other than ``default``,
e.g. Llama 3.1's ``llama3``), partial rotary embeddings, GPT-2's attention scaled by the inverse
layer index, biases on a subset of linears other than "q/k/v only" or "all". Sliding-window
attention (Mistral v0.1, Qwen with ``use_sliding_window``) is not implemented; such a model is
imported with ``max_seq_len`` capped at the window, where full causal attention is exactly the
sliding-window attention (``gkd`` rejects longer ``data.seq_length``).
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from parallel.config import ModelArch

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

LLAMA_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
GPT2_FAMILY = {"GPT2LMHeadModel": "gpt2"}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (*LLAMA_FAMILY, *GPT2_FAMILY)
"""``architectures`` values of ``config.json`` that ``gkd convert`` reads and writes."""

GELU_TANH = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}
"""Hugging Face names of the tanh approximation of GeLU (GPT-2's ``gelu_new``)."""

MlpActivation = Literal["silu", "gelu", "gelu_tanh"]


class HFConversionError(ValueError):
    """A Hugging Face checkpoint cannot be converted; the message names the file, the field and
    what to do."""


@dataclass(frozen=True, kw_only=True)
class HFModelSpec:
    """What ``config.json`` says about a model, in gkd's terms."""

    architecture: str
    """``config.json`` ``architectures[0]``, e.g. ``LlamaForCausalLM``."""
    model_type: str
    """``config.json`` ``model_type`` (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gpt2``)."""
    family: Literal["llama", "gpt2"]
    """Tensor naming and layout family."""
    arch: ModelArch
    """The megatron-core architecture gkd builds for it."""
    mlp_activation: MlpActivation
    """The exact MLP activation (``gelu_tanh`` for GPT-2's ``gelu_new``; see
    :func:`parallel.hf.load.apply_mlp_activation`)."""
    dtype: str | None
    """``config.json`` ``dtype``/``torch_dtype`` (e.g. ``bfloat16``), if given."""
    config: dict[str, Any] = field(repr=False)
    """The raw ``config.json``."""
    notes: tuple[str, ...] = ()
    """Facts a user should see (e.g. ``max_seq_len capped at the sliding window``)."""


def read_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise HFConversionError(
            f"{hf_dir} is not a Hugging Face model folder: {CONFIG_FILE} is missing"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HFConversionError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise HFConversionError(f"{path} does not hold a JSON object")
    return config


def is_hf_dir(path: str | Path) -> bool:
    """True for a folder holding a Hugging Face ``config.json`` (and no gkd ``meta.json``).

    Whether its weights are usable is checked by :func:`parallel.hf.files.inspect_hf_dir`, which
    names what is wrong."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / "meta.json").exists()


def architecture_of(config: dict[str, Any], where: str) -> str:
    names = config.get("architectures") or []
    if not isinstance(names, list) or not names:
        raise HFConversionError(
            f"{where}: 'architectures' is missing; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    name = names[0]
    if name not in SUPPORTED_ARCHITECTURES:
        raise HFConversionError(
            f"{where}: architecture {name} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return name


def _require(config: dict[str, Any], key: str, where: str) -> Any:
    if config.get(key) is None:
        raise HFConversionError(f"{where}: field '{key}' is missing")
    return config[key]


def _rope_theta(config: dict[str, Any], where: str) -> int | float:
    """RoPE base, from ``rope_parameters`` (transformers >= 5) or ``rope_theta``/``rope_scaling``
    (older files). Only unscaled RoPE is supported."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for source, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(block, dict):
            continue
        kind = block.get("rope_type", block.get("type"))
        if kind not in (None, "default"):
            raise HFConversionError(
                f"{where}: {source}.rope_type={kind!r} (RoPE scaling) is not supported; only "
                "unscaled rotary embeddings ('default') are"
            )
        if block.get("partial_rotary_factor", 1.0) != 1.0:
            raise HFConversionError(f"{where}: partial rotary embeddings are not supported")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFConversionError(f"{where}: partial_rotary_factor != 1 is not supported")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    theta = float(theta)
    return int(theta) if theta.is_integer() else theta


def _sliding_window(config: dict[str, Any], model_type: str) -> int | None:
    """The attention window when sliding-window attention is in effect, else ``None``."""
    window = config.get("sliding_window")
    if not window:
        return None
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        return int(window) if "sliding_attention" in layer_types else None
    if model_type in ("qwen2", "qwen3"):
        return int(window) if config.get("use_sliding_window") else None
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


def _omit_default(value: int, default: int) -> int | None:
    return None if value == default else value


def _llama_spec(config: dict[str, Any], name: str, where: str) -> HFModelSpec:
    model_type = config.get("model_type") or LLAMA_FAMILY[name]
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFConversionError(f"{where}: hidden_act={act!r} is not supported (SwiGLU needs silu)")
    hidden = int(_require(config, "hidden_size", where))
    heads = int(_require(config, "num_attention_heads", where))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    max_pos = int(config.get("max_position_embeddings") or 2048)
    notes = []
    window = _sliding_window(config, model_type)
    if window is not None and window < max_pos:
        notes.append(
            f"sliding-window attention (window {window}) is not implemented: max_seq_len is "
            f"capped at {window}, where full causal attention is identical"
        )
        max_pos = window
    arch = ModelArch.llama(
        num_layers=int(_require(config, "num_hidden_layers", where)),
        hidden_size=hidden,
        num_attention_heads=heads,
        vocab_size=int(_require(config, "vocab_size", where)),
        max_seq_len=max_pos,
        num_query_groups=_omit_default(kv_heads, heads),
        kv_channels=head_dim if hidden % heads or head_dim != hidden // heads else None,
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        rotary_base=_rope_theta(config, where),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qk_layernorm=model_type == "qwen3",
        **_bias_flags(config, model_type, where),
    )
    ffn = int(_require(config, "intermediate_size", where))
    if ffn != arch.ffn_size:
        arch.ffn_hidden_size = ffn
    return HFModelSpec(
        architecture=name,
        model_type=model_type,
        family="llama",
        arch=arch,
        mlp_activation="silu",
        dtype=config.get("dtype") or config.get("torch_dtype"),
        config=config,
        notes=tuple(notes),
    )


def _gpt2_spec(config: dict[str, Any], name: str, where: str) -> HFModelSpec:
    act = config.get("activation_function", "gelu_new")
    if act in GELU_TANH:
        activation: MlpActivation = "gelu_tanh"
    elif act == "gelu":
        activation = "gelu"
    else:
        raise HFConversionError(
            f"{where}: activation_function={act!r} is not supported (gelu, gelu_new, "
            "gelu_pytorch_tanh)"
        )
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx"):
        raise HFConversionError(
            f"{where}: only 1/sqrt(head_dim) attention scaling is supported (scale_attn_weights "
            "true, scale_attn_by_inverse_layer_idx false)"
        )
    if config.get("add_cross_attention"):
        raise HFConversionError(f"{where}: add_cross_attention is not supported")
    hidden = int(_require(config, "n_embd", where))
    arch = ModelArch.gpt2(
        num_layers=int(_require(config, "n_layer", where)),
        hidden_size=hidden,
        num_attention_heads=int(_require(config, "n_head", where)),
        vocab_size=int(_require(config, "vocab_size", where)),
        max_seq_len=int(config.get("n_positions") or 1024),
        norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        activation=arch_activation(activation),
    )
    if config.get("n_inner") and int(config["n_inner"]) != arch.ffn_size:
        arch.ffn_hidden_size = int(config["n_inner"])
    notes = []
    if activation == "gelu_tanh" and arch.activation != "gelu_tanh":
        notes.append(
            "GPT-2's tanh-approximated GeLU is not a ModelArch activation yet: models loaded "
            "through parallel.hf get it patched in; a gkd checkpoint used elsewhere runs exact GeLU"
        )
    return HFModelSpec(
        architecture=name,
        model_type=config.get("model_type") or "gpt2",
        family="gpt2",
        arch=arch,
        mlp_activation=activation,
        dtype=config.get("dtype") or config.get("torch_dtype"),
        config=config,
        notes=tuple(notes),
    )


def arch_activation(activation: MlpActivation) -> str:
    """The ModelArch ``activation`` value for an exact MLP activation: ``gelu_tanh`` once
    ModelArch offers it, else ``gelu`` (and the caller patches the built model)."""
    if activation == "silu":
        return "swiglu"
    if activation == "gelu_tanh":
        allowed = typing.get_args(typing.get_type_hints(ModelArch)["activation"])
        return "gelu_tanh" if "gelu_tanh" in allowed else "gelu"
    return "gelu"


def spec_from_config(config: dict[str, Any], *, where: str = CONFIG_FILE) -> HFModelSpec:
    """The model described by a parsed ``config.json`` (``where`` names it in errors)."""
    name = architecture_of(config, where)
    spec = (
        _llama_spec(config, name, where)
        if name in LLAMA_FAMILY
        else _gpt2_spec(config, name, where)
    )
    if spec.arch.hidden_size % spec.arch.num_attention_heads and spec.arch.kv_channels is None:
        raise HFConversionError(f"{where}: hidden size is not divisible by the head count")
    if spec.arch.num_attention_heads % spec.arch.query_groups:
        raise HFConversionError(
            f"{where}: num_attention_heads={spec.arch.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={spec.arch.query_groups}"
        )
    return spec


def read_spec(hf_dir: str | Path) -> HFModelSpec:
    """The model in ``hf_dir`` (``config.json`` only; :func:`parallel.hf.files.inspect_hf_dir`
    also checks the weights)."""
    return spec_from_config(read_config(hf_dir), where=str(Path(hf_dir) / CONFIG_FILE))


def arch_from_hf(hf_dir: str | Path) -> ModelArch:
    """The :class:`ModelArch` of a Hugging Face model folder (for ``teacher.checkpoint``)."""
    return read_spec(hf_dir).arch


HF_KEYS: dict[str, dict[str, str]] = {
    "llama": {
        "num_layers": "num_hidden_layers",
        "hidden_size": "hidden_size",
        "num_attention_heads": "num_attention_heads",
        "num_query_groups": "num_key_value_heads",
        "ffn_hidden_size": "intermediate_size",
        "kv_channels": "head_dim",
    },
    "gpt2": {
        "num_layers": "n_layer",
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_query_groups": "n_head",
        "ffn_hidden_size": "n_inner (default 4 x n_embd)",
        "kv_channels": "n_embd / n_head",
    },
}
"""``config.json`` keys of gkd's architecture fields, per family (errors name what users see)."""


def valid_tp_sizes(arch: ModelArch) -> list[int]:
    """Tensor-parallel sizes ``arch`` can be sharded at: divisors of the head count that also
    divide the key/value heads and the MLP width."""
    return [
        tp
        for tp in range(1, arch.num_attention_heads + 1)
        if not arch.num_attention_heads % tp
        and not arch.query_groups % tp
        and not arch.ffn_size % tp
    ]


def valid_pp_sizes(arch: ModelArch) -> list[int]:
    """Pipeline-parallel sizes ``arch`` can be sharded at: divisors of the layer count."""
    return [pp for pp in range(1, arch.num_layers + 1) if not arch.num_layers % pp]


def check_layout(
    arch: ModelArch, tp: int, pp: int, *, where: str, family: str | None = None
) -> None:
    """``HFConversionError`` when ``arch`` cannot be sharded at ``tp`` x ``pp``; the message names
    the ``config.json`` keys of ``family`` (``llama`` or ``gpt2``) and lists the valid sizes."""
    family = family or ("gpt2" if arch.position_embedding != "rope" else "llama")
    keys = HF_KEYS.get(family, HF_KEYS["llama"])
    tps, pps = valid_tp_sizes(arch), valid_pp_sizes(arch)
    sizes = (
        f"valid --tp values for this model: {', '.join(map(str, tps))}; "
        f"valid --pp values: {', '.join(map(str, pps))}"
    )
    if tp < 1 or pp < 1:
        raise HFConversionError(f"--tp and --pp must be >= 1 (got tp={tp}, pp={pp}); {sizes}")
    values = {
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.query_groups,
        "ffn_hidden_size": arch.ffn_size,
    }
    for name, value in values.items():
        if value % tp:
            raise HFConversionError(
                f"{where}: {keys[name]}={value} is not divisible by --tp={tp}; {sizes}"
            )
    if arch.num_layers % pp:
        raise HFConversionError(
            f"{where}: {keys['num_layers']}={arch.num_layers} is not divisible by --pp={pp}; "
            f"{sizes}"
        )
    try:  # anything else ModelArch refuses, in its own words
        arch.check_parallel(tp, pp, where=where)
    except ValueError as err:
        message = str(err).replace("parallel.tp", "--tp").replace("parallel.pp", "--pp")
        for ours, theirs in keys.items():
            message = message.replace(f"{where}.{ours}", theirs)
        raise HFConversionError(f"{where}: {message}; {sizes}") from None


# ---------------------------------------------------------------------------------------------
# export: ModelArch -> config.json
# ---------------------------------------------------------------------------------------------


def _export_mismatch(arch: ModelArch, problems: list[str]) -> HFConversionError:
    return HFConversionError(
        "no supported Hugging Face architecture matches this model ("
        + "; ".join(problems)
        + f"); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def hf_architecture_for(arch: ModelArch) -> str:
    """The Hugging Face architecture that represents ``arch`` exactly."""
    if arch.position_embedding == "learned":
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
        if problems:
            raise _export_mismatch(arch, problems)
        return "GPT2LMHeadModel"
    problems = []
    if arch.normalization != "RMSNorm":
        problems.append(f"rotary models need RMSNorm, not {arch.normalization}")
    if arch.activation != "swiglu":
        problems.append(f"rotary models need SwiGLU, not {arch.activation}")
    if arch.qk_layernorm and arch.add_qkv_bias and not arch.add_bias_linear:
        problems.append("qk_layernorm with q/k/v-only biases has no Hugging Face counterpart")
    if problems:
        raise _export_mismatch(arch, problems)
    if arch.qk_layernorm:
        return "Qwen3ForCausalLM"
    if arch.add_qkv_bias and not arch.add_bias_linear:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
}


def hf_config_for(
    arch: ModelArch,
    *,
    mlp_activation: MlpActivation | None = None,
    dtype: str = "float32",
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``config.json`` for ``arch``. ``base`` (the source model's config, for a model imported
    from Hugging Face) keeps its other fields (token ids, names) and its architecture when it
    still matches; structural fields always come from ``arch``."""
    name = hf_architecture_for(arch)
    if base and base.get("architectures"):
        original = base["architectures"][0]
        # Mistral and Llama share a layout: keep the source's name for an imported Mistral.
        if original == name or (original == "MistralForCausalLM" and name == "LlamaForCausalLM"):
            name = original
    config: dict[str, Any] = {
        k: v for k, v in (base or {}).items() if k not in ("transformers_version", "torch_dtype")
    }
    model_type = {"MistralForCausalLM": "mistral"}.get(name, _MODEL_TYPES.get(name))
    config.update(architectures=[name], model_type=model_type, vocab_size=arch.vocab_size)
    config["dtype"] = dtype
    config["tie_word_embeddings"] = arch.tie_embeddings
    if name == "GPT2LMHeadModel":
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
        return config
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
        if base
        else arch.max_seq_len,
        rms_norm_eps=arch.norm_epsilon,
        rope_theta=theta,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    config.pop("rope_scaling", None)
    if name in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        config["attention_bias"] = arch.add_bias_linear
    if name == "LlamaForCausalLM":
        config["mlp_bias"] = arch.add_bias_linear
    return config
