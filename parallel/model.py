"""Build megatron-core GPT models from a plain :class:`~parallel.config.ModelArch`.

One builder for GPT-2-style (LayerNorm, GeLU, learned positions, tied embeddings, biases) and
Llama/Qwen-style (RMSNorm, SwiGLU, RoPE, untied, no biases, grouped-query attention) decoders.
Megatron's local layer spec is used on CPU and whenever an attention tap needs the unfused
softmax; Transformer Engine's spec is used on GPU when TE imports.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from methods.base import ModelInfo
from parallel import rope
from parallel.config import ModelArch
from parallel.families import family_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accelerators:
    """Which optional fused paths are importable and used."""

    transformer_engine: bool
    apex: bool

    def describe(self) -> str:
        used = [
            n
            for n, ok in (("Transformer Engine", self.transformer_engine), ("apex", self.apex))
            if ok
        ]
        return ", ".join(used) if used else "none (megatron-core's torch fallbacks)"


def detect_accelerators() -> Accelerators:
    """Transformer Engine and NVIDIA apex are optional; both only matter on GPU."""
    if not torch.cuda.is_available():
        return Accelerators(transformer_engine=False, apex=False)
    try:
        import transformer_engine  # noqa: F401

        te = True
    except Exception:
        te = False
    try:
        import apex  # noqa: F401
        from apex.normalization import FusedLayerNorm  # noqa: F401  (the PyPI 'apex' is unrelated)

        ap = True
    except Exception:
        ap = False
    return Accelerators(transformer_engine=te, apex=ap)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GeLU's tanh approximation (GPT-2's ``gelu_new``); differs from exact GeLU by up to 5e-4."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "swiglu": F.silu}


def model_info(arch: ModelArch, tp_size: int) -> ModelInfo:
    return ModelInfo(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.query_groups,
        ffn_hidden_size=arch.ffn_size,
        vocab_size=arch.vocab_size,
        padded_vocab_size=arch.padded_vocab(tp_size),
        num_parameters=arch.num_parameters(tp_size),
    )


def transformer_config(
    arch: ModelArch,
    *,
    params_dtype: torch.dtype,
    recompute: str = "none",
    sequence_parallel: bool = False,
    init_std: float = 0.02,
    perform_initialization: bool = True,
):
    """megatron-core TransformerConfig for ``arch``. Parallel sizes come from parallel_state."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = params_dtype == torch.bfloat16
    swiglu = arch.activation == "swiglu"
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.query_groups,
        kv_channels=arch.head_dim,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=ACTIVATIONS[arch.activation],
        add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_std,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=perform_initialization,
        # Fusions need apex/TE kernels; megatron falls back to torch when they are absent, but
        # asks for them explicitly, so enable them only where they exist.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        attention_softmax_in_fp32=True,
    )
    factor = rope.attention_factor(arch.rope_scaling)
    if factor != 1.0:
        # YaRN multiplies cos and sin by the attention factor: rotated queries and keys both
        # scaled, so the attention logits by its square.
        kwargs["softmax_scale"] = factor**2 / math.sqrt(arch.head_dim)
    if recompute == "full":
        kwargs.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    return TransformerConfig(**kwargs)


def layer_spec(arch: ModelArch, *, use_te: bool):
    """The megatron-core layer spec of ``arch``: its model family's choice
    (:meth:`parallel.families.base.ModelFamily.layer_spec`)."""
    return family_of(arch).layer_spec(arch, use_te=use_te)


class SequenceParallelTorchNorm:
    """torch's LayerNorm / RMSNorm whose parameters carry megatron's ``sequence_parallel`` tag.

    megatron-core's torch fallback norm (``WrappedTorchNorm``, used without apex and Transformer
    Engine, so always on CPU) refuses ``sequence_parallel`` only because it does not tag its
    parameters: under sequence parallelism a norm sees only this rank's ``s/tp`` tokens, so its
    gradient is a partial sum, and ``finalize_model_grads`` all-reduces over tp exactly the
    parameters tagged ``sequence_parallel`` (what apex's and TE's norms declare). The forward is
    per token, the same module class as ``WrappedTorchNorm`` builds."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[
            config.normalization
        ]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def sequence_parallel_block_spec(spec, config):
    """The block spec of ``spec`` (a local layer spec) with every torch fallback norm replaced by
    :class:`SequenceParallelTorchNorm`, including the final norm (megatron's block builds it from
    its own default, which refuses sequence parallelism). Specs with apex or TE norms are
    returned unchanged."""
    import dataclasses

    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    def swap(module_spec):
        return SequenceParallelTorchNorm if module_spec is WrappedTorchNorm else module_spec

    layer = spec.submodules
    if (
        layer.input_layernorm is not WrappedTorchNorm
        and layer.pre_mlp_layernorm is not WrappedTorchNorm
    ):
        return spec
    attention = dataclasses.replace(
        layer.self_attention,
        submodules=dataclasses.replace(
            layer.self_attention.submodules,
            q_layernorm=swap(layer.self_attention.submodules.q_layernorm),
            k_layernorm=swap(layer.self_attention.submodules.k_layernorm),
        ),
    )
    layer = dataclasses.replace(
        layer,
        input_layernorm=swap(layer.input_layernorm),
        pre_mlp_layernorm=swap(layer.pre_mlp_layernorm),
        self_attention=attention,
    )
    layer_spec_ = dataclasses.replace(spec, submodules=layer)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec_] * get_num_layers_to_build(config),
        layer_norm=SequenceParallelTorchNorm,
    )


def build_gpt(
    arch: ModelArch,
    *,
    params_dtype: torch.dtype,
    recompute: str = "none",
    sequence_parallel: bool = False,
    use_te: bool = False,
    perform_initialization: bool = True,
):
    """A megatron-core GPTModel holding this rank's pipeline stage and tensor shard of ``arch``.

    ``perform_initialization=False`` leaves the weights uninitialized (to be loaded or overwritten):
    megatron's CPU initialization materializes every full, unsharded weight on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp_size = ps.get_tensor_model_parallel_world_size()
    config = transformer_config(
        arch,
        params_dtype=params_dtype,
        recompute=recompute,
        sequence_parallel=sequence_parallel,
        perform_initialization=perform_initialization,
    )
    arch.check_attention(where="model")
    if arch.sliding_window is not None and use_te:
        # Transformer Engine takes flash-attention's (left, right) window: left = W - 1 keys
        # before the query, which with the query itself makes Hugging Face's sliding_window W.
        config.window_size = (arch.sliding_window - 1, 0)
    spec = layer_spec(arch, use_te=use_te)
    if config.sequence_parallel and not use_te:
        spec = sequence_parallel_block_spec(spec, config)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=arch.padded_vocab(tp_size),
        max_sequence_length=arch.max_seq_len,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope" if arch.position_embedding == "rope" else "learned_absolute",
        rotary_base=arch.rotary_base,
    )
    if arch.rope_scaling is not None:
        set_rope_scaling(model, arch)
    if arch.sliding_window is not None and not use_te:
        add_sliding_window(model, arch.sliding_window)
    if not perform_initialization:
        mark_tensor_parallel_weights(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def set_rope_scaling(model: torch.nn.Module, arch: ModelArch) -> None:
    """Give the model's rotary embedding the inverse frequencies of ``arch.rope_scaling``
    (:func:`parallel.rope.inv_freq`, from the config's own values). megatron-core computes the
    angles as ``positions x inv_freq`` from this attribute; it is not in the checkpoint."""
    rotary: Any = model.rotary_pos_emb
    inv_freq = rope.inv_freq(arch.head_dim, arch.rotary_base, arch.rope_scaling)
    rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)


class SlidingWindowMask:
    """Sliding-window attention on megatron-core's local (torch) attention.

    megatron-core's ``DotProductAttention`` takes ``config.window_size`` but then replaces any
    attention mask it is given by the window mask, which would undo gkd's explicit masks (the
    scorer's packed options, :mod:`parallel.scoring`). Instead, a forward pre-hook on each
    layer's core attention adds the window to the mask it receives (causal when none): key ``j``
    is hidden from query ``i`` when ``pos_i - pos_j >= window``, with the position ids the model
    was called with (captured by a pre-hook on the model; row indices when none), so packed rows
    keep each option's true distances, as Hugging Face measures them."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.position_ids: torch.Tensor | None = None

    def capture(self, module, args, kwargs) -> None:
        positions = kwargs.get("position_ids")
        if positions is None and len(args) > 1:
            positions = args[1]
        self.position_ids = positions if isinstance(positions, torch.Tensor) else None

    def mask(self, module, args, kwargs):
        query, key = args[0], args[1]
        attention_mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
        sq, sk = query.shape[0], key.shape[0]
        device = query.device
        positions = self.position_ids
        if positions is not None and positions.shape[-1] == sk:
            key_pos = positions.to(device)[:, None, None, :]  # [b, 1, 1, sk]
            query_pos = positions.to(device)[:, None, sk - sq :, None]  # [b, 1, sq, 1]
        else:
            key_pos = torch.arange(sk, device=device)[None, None, None, :]
            query_pos = torch.arange(sk - sq, sk, device=device)[None, None, :, None]
        outside = (query_pos - key_pos) >= self.window
        if attention_mask is None:
            causal = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)
            combined = outside | causal
        else:
            combined = outside | attention_mask.bool()
        if len(args) > 3:
            return (*args[:3], combined, *args[4:]), kwargs
        return args, {**kwargs, "attention_mask": combined}


def add_sliding_window(model: torch.nn.Module, window: int) -> SlidingWindowMask:
    """Install :class:`SlidingWindowMask` on ``model`` (a GPTModel with the local layer spec)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    hooks = SlidingWindowMask(window)
    model.register_forward_pre_hook(hooks.capture, with_kwargs=True)
    found = 0
    for module in model.modules():
        if isinstance(module, DotProductAttention):
            module.register_forward_pre_hook(hooks.mask, with_kwargs=True)
            found += 1
    decoder: Any = model.decoder
    if not found and len(decoder.layers):
        raise RuntimeError("sliding_window: the model has no local DotProductAttention to mask")
    return hooks


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give sharded weights megatron's tensor-parallel attributes (``tensor_model_parallel``,
    ``partition_dim``). megatron sets them inside its weight initializer, so a model built with
    ``perform_initialization=False`` lacks them, and the optimizer would then count those weights'
    gradients on tp rank 0 only in the gradient norm (wrong clipping at tp > 1)."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or getattr(
            weight, "tensor_model_parallel", False
        ):
            continue
        if isinstance(module, ColumnParallelLinear | VocabParallelEmbedding):
            set_tensor_model_parallel_attributes(weight, True, 0, 1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """The teacher: no grads, eval mode. The caller runs it under ``torch.no_grad``."""
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model
