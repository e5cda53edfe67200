"""Model families: one module per Hugging Face tensor layout, and their registry.

Each family module (:mod:`parallel.families.llama`, :mod:`parallel.families.gpt2`) holds
everything gkd knows about its layout: the ``config.json`` ``architectures`` names, the
``config.json`` <-> :class:`~parallel.config.ModelArch` mapping (with the ``config.json`` keys
errors name), the tensor map in both directions (import: which Hugging Face slices make each
megatron-core parameter of one rank, fused q/k/v and gate/up included; export: the inverse
full-tensor reshapes) and the megatron-core layer spec. The interface is
:class:`~parallel.families.base.ModelFamily`.

Adding a family: a module with a :class:`ModelFamily` subclass and its instance, one entry in
:data:`FAMILIES`, and tests (``tests/unit/test_convert_layout.py`` and
``tests/unit/test_convert_inputs.py`` check a family against transformers).

No torch or megatron-core import here (the CLI validates with it before launching workers).
"""

from __future__ import annotations

from parallel.config import ModelArch
from parallel.families.base import HFConversionError, HFModelSpec, ModelFamily, Piece
from parallel.families.gpt2 import GPT2
from parallel.families.llama import LLAMA

FAMILIES: tuple[ModelFamily, ...] = (LLAMA, GPT2)
"""Every supported family, in the order errors list their architectures."""

BY_ARCHITECTURE: dict[str, ModelFamily] = {
    name: family for family in FAMILIES for name in family.architectures
}
"""``config.json`` ``architectures`` name -> its family."""

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(BY_ARCHITECTURE)
"""``architectures`` values of ``config.json`` that ``gkd convert`` reads and writes."""


def family_of(arch: ModelArch) -> ModelFamily:
    """The family whose models have ``arch``'s kind of position embedding (``rope``: Llama,
    ``learned``: GPT-2); whether it can represent ``arch`` exactly is
    :meth:`ModelFamily.export_problems`."""
    for family in FAMILIES:
        if family.position_embedding == arch.position_embedding:
            return family
    raise HFConversionError(
        f"no model family has position_embedding={arch.position_embedding!r}; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


__all__ = [
    "BY_ARCHITECTURE",
    "FAMILIES",
    "SUPPORTED_ARCHITECTURES",
    "HFConversionError",
    "HFModelSpec",
    "ModelFamily",
    "Piece",
    "family_of",
]
