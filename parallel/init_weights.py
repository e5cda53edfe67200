"""Layout-independent random initialization.

megatron-core initializes each rank's shard from the rank's own RNG stream, so the same seed gives
different weights at TP1PP1 and TP2PP2. gkd initializes from the model's *sharded state dict*
instead: every tensor is identified by its global checkpoint key (and, for layer-stacked keys, its
global layer index), drawn in full from a generator seeded by ``(seed, key, layer)``, and this rank
copies in only its slice (``global_offset`` / ``local_shape``). The same seed therefore gives
bit-identical weights at every TP/PP layout, which is what the layout-equivalence guarantees rest
on.

Values follow megatron's defaults: normal(0, std) for weights, std / sqrt(2 L) for the output
projections of attention and MLP (``linear_proj``, ``linear_fc2``), ones for norm weights, zeros for
biases. Each key's kind is declared in a table (:func:`value_kind`); a key megatron-core produces
that the table does not know raises instead of falling back to a guess.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron.core.transformer.module import MegatronModule


def _leaves(sharded_state_dict):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    stack = [sharded_state_dict]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif isinstance(node, ShardedTensorFactory):
            stack.append(node.build())
        elif isinstance(node, ShardedTensor):
            yield node


ZEROS, ONES, NORMAL, SCALED = "zeros", "ones", "normal", "scaled"

# Every tensor key megatron-core's GPTModel puts in its sharded state dict, with its value kind.
# Layer keys are stacked (``decoder.layers.<name>``, the layer index in the prepended axis).
# megatron's local layer spec maps its separate norms onto Transformer Engine's fused names
# (``input_layernorm.*`` -> ``self_attention.linear_qkv.layer_norm_*``, ``pre_mlp_layernorm.*``
# -> ``mlp.linear_fc1.layer_norm_*``), so both specs produce the fused names; the unfused ones are
# listed too for specs that keep them. A key not listed here raises: guessing a kind from a name
# is how norm gains once got N(0, 0.02).
_MODEL_KEYS = {
    "embedding.word_embeddings.weight": NORMAL,
    "embedding.position_embeddings.weight": NORMAL,  # learned absolute positions (GPT-2)
    "output_layer.weight": NORMAL,  # untied output head
    "decoder.final_layernorm.weight": ONES,
    "decoder.final_layernorm.bias": ZEROS,  # LayerNorm only
}
_LAYER_KEYS = {
    "self_attention.linear_qkv.layer_norm_weight": ONES,
    "self_attention.linear_qkv.layer_norm_bias": ZEROS,
    "input_layernorm.weight": ONES,
    "input_layernorm.bias": ZEROS,
    "self_attention.linear_qkv.weight": NORMAL,
    "self_attention.linear_qkv.bias": ZEROS,  # add_bias_linear or add_qkv_bias (Qwen2)
    "self_attention.q_layernorm.weight": ONES,  # qk_layernorm (Qwen3)
    "self_attention.q_layernorm.bias": ZEROS,
    "self_attention.k_layernorm.weight": ONES,
    "self_attention.k_layernorm.bias": ZEROS,
    "self_attention.linear_proj.weight": SCALED,
    "self_attention.linear_proj.bias": ZEROS,
    "mlp.linear_fc1.layer_norm_weight": ONES,
    "mlp.linear_fc1.layer_norm_bias": ZEROS,
    "pre_mlp_layernorm.weight": ONES,
    "pre_mlp_layernorm.bias": ZEROS,
    "mlp.linear_fc1.weight": NORMAL,  # SwiGLU: [gate; up], each half its own sharded tensor
    "mlp.linear_fc1.bias": ZEROS,
    "mlp.linear_fc2.weight": SCALED,
    "mlp.linear_fc2.bias": ZEROS,
}
_LAYER_PREFIX = re.compile(r"^decoder\.layers\.(?:\d+\.)?")


def value_kind(key: str) -> str:
    """How the tensor ``key`` of a GPTModel's sharded state dict starts: ``zeros`` (biases),
    ``ones`` (norm gains), ``normal`` (N(0, std)) or ``scaled`` (N(0, std / sqrt(2 L)), the
    residual output projections). Raises ``KeyError`` for a key it does not know."""
    if key in _MODEL_KEYS:
        return _MODEL_KEYS[key]
    match = _LAYER_PREFIX.match(key)
    if match and key[match.end() :] in _LAYER_KEYS:
        return _LAYER_KEYS[key[match.end() :]]
    raise KeyError(
        f"layout-independent init: no value kind for megatron-core key {key!r}; add it to "
        "parallel/init_weights.py (_MODEL_KEYS or _LAYER_KEYS)"
    )


@torch.no_grad()
def init_layout_independent(
    model: MegatronModule, *, seed: int, num_layers: int, std: float = 0.02
) -> None:
    """Overwrite ``model``'s parameters with values that depend only on ``seed`` and each tensor's
    global identity, not on the parallel layout."""
    for sharded in _leaves(model.sharded_state_dict()):
        if sharded.flattened_range is not None:  # only optimizer state is flattened
            continue
        prepend = sharded.prepend_axis_num
        prefix_offsets = tuple(sharded.global_offset[:prepend])
        kind = value_kind(sharded.key)
        full_shape = tuple(sharded.global_shape[prepend:])
        if kind == ZEROS:
            sharded.data.zero_()
        elif kind == ONES:
            sharded.data.fill_(1.0)
        else:
            scale = std / math.sqrt(2.0 * num_layers) if kind == SCALED else std
            tag = f"{sharded.key}|{prefix_offsets}".encode()
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(tag)) % (2**63))
            full = torch.randn(full_shape, generator=gen, dtype=torch.float32) * scale
            index = tuple(
                slice(off, off + size)
                for off, size in zip(
                    sharded.global_offset[prepend:], sharded.local_shape, strict=True
                )
            )
            local = full[index].reshape(sharded.data.shape)
            sharded.data.copy_(local.to(sharded.data.dtype))
