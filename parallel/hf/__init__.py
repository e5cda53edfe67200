"""Hugging Face checkpoints in and out of gkd (``gkd convert``).

Light entry points (no torch, no megatron-core; safe on a login node):

* :func:`inspect_hf_dir` checks a model folder (architecture, shards, shapes, tokenizer) and
  returns an :class:`HFCheckpoint`; :func:`is_hf_dir`, :func:`arch_from_hf`, :func:`read_spec`.

Heavy ones (import torch and megatron-core when called):

* :func:`load_hf_weights` ``(model, hf_dir, arch)`` fills this rank's GPTModel shard from a
  Hugging Face folder under the current megatron parallel state (a Hugging Face folder as
  ``teacher.checkpoint``).
* :func:`import_hf` ``(hf_dir, out)`` (collective) writes a gkd weights-only checkpoint;
  ``python -m parallel.hf.worker`` runs it under torchrun.
* :func:`export_hf` ``(checkpoint, out_dir)`` writes ``config.json`` + ``model.safetensors``.

Supported: :data:`SUPPORTED_ARCHITECTURES`, one model family module each in :mod:`parallel.families`
(this package holds what every family shares).
"""

from __future__ import annotations

from typing import Any

from parallel.hf.files import HFCheckpoint, inspect_hf_dir
from parallel.hf.spec import (
    SUPPORTED_ARCHITECTURES,
    HFConversionError,
    HFModelSpec,
    arch_from_hf,
    hf_architecture_for,
    hf_config_for,
    is_hf_dir,
    read_spec,
)

_HEAVY = {
    "load_hf_weights": "parallel.hf.load",
    "import_hf": "parallel.hf.load",
    "build_from_hf": "parallel.hf.load",
    "apply_mlp_activation": "parallel.hf.load",
    "export_hf": "parallel.hf.export",
    "hf_tensors": "parallel.hf.export",
}

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFCheckpoint",
    "HFConversionError",
    "HFModelSpec",
    "apply_mlp_activation",
    "arch_from_hf",
    "build_from_hf",
    "export_hf",
    "hf_architecture_for",
    "hf_config_for",
    "hf_tensors",
    "import_hf",
    "inspect_hf_dir",
    "is_hf_dir",
    "load_hf_weights",
    "read_spec",
]


def __getattr__(name: str) -> Any:
    if name in _HEAVY:
        import importlib

        return getattr(importlib.import_module(_HEAVY[name]), name)
    raise AttributeError(f"module 'parallel.hf' has no attribute {name!r}")
