"""RoPE scaling and sliding-window attention as Hugging Face configs state them.

:attr:`~parallel.config.ModelArch.rope_scaling` holds a model's RoPE scaling in Hugging Face's own
terms (the ``rope_scaling`` / ``rope_parameters`` block of ``config.json`` without ``rope_theta``,
which is :attr:`~parallel.config.ModelArch.rotary_base`), so a gkd checkpoint records it and an
export writes it back unchanged. Supported ``rope_type`` s, with the inverse frequencies computed
here from the config's own values (megatron-core's ``RotaryEmbedding(rope_scaling=True)`` fixes
Llama 3.1's ``low_freq_factor=1``, ``high_freq_factor=4`` and ``original_max_position_embeddings
=8192``, so gkd does not use it):

* ``linear`` (position interpolation, Chen et al. 2023): every inverse frequency divided by
  ``factor``.
* ``llama3`` (Llama 3.1+): wavelengths longer than ``original_max_position_embeddings /
  low_freq_factor`` divided by ``factor``, shorter than ``original_max_position_embeddings /
  high_freq_factor`` kept, a linear blend in between.
* ``yarn`` (Peng et al. 2023, YaRN): interpolation and extrapolation blended per dimension by a
  linear ramp between the correction dimensions of ``beta_fast`` and ``beta_slow`` rotations, and
  cos/sin multiplied by ``attention_factor`` (gkd: attention logits multiplied by its square, the
  same product of rotated queries and keys).

``dynamic`` (NTK scaling recomputed from each sequence's length), ``longrope`` and the others
transformers knows are refused at import by name.

Importing this module imports neither torch nor megatron-core (the CLI validates with it before
launching workers); :func:`inv_freq` imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SUPPORTED_ROPE_TYPES = ("linear", "llama3", "yarn")
"""``rope_type`` values gkd imports, builds and exports (besides ``default``: unscaled)."""

_KEYS: dict[str, dict[str, bool]] = {
    # rope_type -> {parameter: required}
    "linear": {"factor": True},
    "llama3": {
        "factor": True,
        "low_freq_factor": True,
        "high_freq_factor": True,
        "original_max_position_embeddings": True,
    },
    "yarn": {
        "factor": True,
        "original_max_position_embeddings": True,
        "attention_factor": True,
        "beta_fast": True,
        "beta_slow": True,
        "truncate": True,
    },
}
_IGNORED = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
"""Keys of a Hugging Face RoPE block that are not scaling parameters (``rope_theta`` is
``rotary_base``; a partial rotary factor other than 1 is refused by the family)."""


class RopeScalingError(ValueError):
    """A RoPE scaling block gkd cannot represent exactly; the message names the key and value."""


def _number(
    block: Mapping[str, Any], key: str, where: str, *, kind: str = "", positive: bool = True
) -> float:
    value = block.get(key)
    if value is None and kind:
        raise RopeScalingError(
            f"{where}.{key} is missing (rope_type={kind} needs {', '.join(_KEYS[kind])})"
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RopeScalingError(f"{where}.{key}={value!r} must be a number")
    if positive and not value > 0:
        raise RopeScalingError(f"{where}.{key}={value!r} must be > 0")
    return float(value)


def rope_type_of(block: Mapping[str, Any] | None) -> str:
    """``rope_type`` (or the legacy ``type``) of a Hugging Face RoPE block; ``default`` when
    absent."""
    if not block:
        return "default"
    kind = block.get("rope_type", block.get("type"))
    return "default" if kind is None else str(kind)


def from_hf(
    block: Mapping[str, Any] | None,
    *,
    max_position_embeddings: int | None,
    original_max_position_embeddings: int | None = None,
    where: str = "rope_scaling",
) -> dict[str, Any] | None:
    """The :attr:`ModelArch.rope_scaling` of a Hugging Face RoPE block (``rope_scaling`` or
    ``rope_parameters``; ``None`` for unscaled RoPE), with every parameter explicit (YaRN's
    defaults resolved as transformers resolves them). :class:`RopeScalingError` names
    ``where.<key>`` for what is unsupported.

    ``original_max_position_embeddings``: the top-level ``config.json`` key of that name, which
    transformers prefers to the block's for ``llama3`` and ``yarn``."""
    kind = rope_type_of(block)
    if kind == "default":
        return None
    assert block is not None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise RopeScalingError(
            f"{where}.rope_type={kind} is not supported; supported: default (unscaled), "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    unknown = sorted(set(block) - set(_KEYS[kind]) - _IGNORED)
    # mscale / mscale_all_dim only derive YaRN's attention_factor (resolved below)
    if kind == "yarn":
        unknown = [k for k in unknown if k not in ("mscale", "mscale_all_dim")]
    if unknown:
        raise RopeScalingError(
            f"{where}.{unknown[0]}={block[unknown[0]]!r} is not a parameter of "
            f"rope_type={kind} that gkd reads (it reads: {', '.join(_KEYS[kind])})"
        )
    params: dict[str, Any] = {"rope_type": kind}
    block = dict(block)
    if kind in ("llama3", "yarn"):
        original = original_max_position_embeddings or block.get(
            "original_max_position_embeddings", max_position_embeddings if kind == "yarn" else None
        )
        if original is None:
            raise RopeScalingError(
                f"{where}.original_max_position_embeddings is missing (rope_type={kind} needs "
                f"{', '.join(_KEYS[kind])})"
            )
        block["original_max_position_embeddings"] = original
    if kind == "yarn" and block.get("factor") is None:
        if not max_position_embeddings:
            raise RopeScalingError(f"{where}.factor is missing (rope_type=yarn needs it)")
        block["factor"] = max_position_embeddings / block["original_max_position_embeddings"]
    factor = _number(block, "factor", where, kind=kind)
    params["factor"] = factor
    if kind == "llama3":
        low = _number(block, "low_freq_factor", where, kind=kind)
        high = _number(block, "high_freq_factor", where, kind=kind)
        if not high > low:
            raise RopeScalingError(
                f"{where}.high_freq_factor={high} must be greater than low_freq_factor={low}"
            )
        params.update(low_freq_factor=low, high_freq_factor=high)
    if kind in ("llama3", "yarn"):
        original = block["original_max_position_embeddings"]
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise RopeScalingError(
                f"{where}.original_max_position_embeddings={original!r} must be a positive integer"
            )
        params["original_max_position_embeddings"] = original
    if kind == "yarn":
        attention = block.get("attention_factor")
        if attention is None:
            mscale, mscale_all = block.get("mscale"), block.get("mscale_all_dim")
            if mscale and mscale_all:
                attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            else:
                attention = _yarn_mscale(factor)
        params["attention_factor"] = _number(
            {"attention_factor": attention}, "attention_factor", where
        )
        params["beta_fast"] = _number(
            {"beta_fast": block.get("beta_fast") or 32}, "beta_fast", where
        )
        params["beta_slow"] = _number(
            {"beta_slow": block.get("beta_slow") or 1}, "beta_slow", where
        )
        truncate = block.get("truncate", True)
        if not isinstance(truncate, bool):
            raise RopeScalingError(f"{where}.truncate={truncate!r} must be true or false")
        params["truncate"] = truncate
    return params


def check(scaling: Mapping[str, Any] | None, where: str = "rope_scaling") -> None:
    """:class:`RopeScalingError` unless ``scaling`` is a complete :attr:`ModelArch.rope_scaling`
    (what :func:`from_hf` returns, or ``None``)."""
    if scaling is None:
        return
    if not isinstance(scaling, Mapping):
        raise RopeScalingError(f"{where} must be a mapping with rope_type, got {scaling!r}")
    kind = rope_type_of(scaling)
    if kind == "default":
        raise RopeScalingError(
            f"{where}.rope_type is missing (or default: write rope_scaling: null)"
        )
    resolved = from_hf(scaling, max_position_embeddings=None, where=where)
    assert resolved is not None
    missing = [k for k in _KEYS[kind] if k not in scaling]
    if missing:
        raise RopeScalingError(
            f"{where}.{missing[0]} is missing (rope_type={kind} needs {', '.join(_KEYS[kind])})"
        )


def to_hf(scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The Hugging Face RoPE scaling block of :attr:`ModelArch.rope_scaling` (without
    ``rope_theta``)."""
    return None if scaling is None else dict(scaling)


def attention_factor(scaling: Mapping[str, Any] | None) -> float:
    """The factor YaRN multiplies cos and sin by (1 for every other type)."""
    if scaling is None or rope_type_of(scaling) != "yarn":
        return 1.0
    return float(scaling["attention_factor"])


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 mscale ln(s) + 1`` (1 for ``s <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(head_dim: int, base: float, scaling: Mapping[str, Any] | None):
    """The ``[head_dim / 2]`` float32 inverse frequencies of RoPE with base ``base`` under
    ``scaling`` (computed in float32, in the order of operations transformers uses, so the
    angles agree to the last bits)."""
    import torch

    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    powers = base**exponents
    plain = 1.0 / powers
    kind = rope_type_of(scaling)
    if kind == "default":
        return plain
    assert scaling is not None
    factor = float(scaling["factor"])
    if kind == "linear":
        return plain / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / plain
        scaled = torch.where(wavelen > low_wavelen, plain / factor, plain)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        old = scaling["original_max_position_embeddings"]

        def correction_dim(rotations: float) -> float:
            return (head_dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low = correction_dim(float(scaling["beta_fast"]))
        high = correction_dim(float(scaling["beta_slow"]))
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # as YaRN's reference code: no zero-width ramp
        ramp = torch.clamp(
            (torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1
        )
        extrapolation = 1 - ramp
        interpolated = 1.0 / (factor * powers)
        return interpolated * (1 - extrapolation) + plain * extrapolation
    raise RopeScalingError(f"rope_type={kind} is not supported")
