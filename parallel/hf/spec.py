"""Hugging Face ``config.json`` <-> :class:`~parallel.config.ModelArch`, for every family.

The families (:mod:`parallel.families`) hold what differs between layouts: ``llama``
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``) and
``gpt2`` (``GPT2LMHeadModel``). This module reads ``config.json``, finds the family by
architecture name, and runs the checks and the export steps every family shares.

Importing this module imports neither torch nor megatron-core (the CLI validates with it before
launching workers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parallel.config import ModelArch
from parallel.families import BY_ARCHITECTURE, SUPPORTED_ARCHITECTURES, family_of
from parallel.families.base import HFConversionError, HFModelSpec, MlpActivation, ModelFamily

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

__all__ = [
    "CONFIG_FILE",
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX",
    "SUPPORTED_ARCHITECTURES",
    "HFConversionError",
    "HFModelSpec",
    "MlpActivation",
    "arch_from_hf",
    "architecture_of",
    "check_layout",
    "hf_architecture_for",
    "hf_config_for",
    "is_hf_dir",
    "read_config",
    "read_spec",
    "spec_from_config",
    "valid_pp_sizes",
    "valid_tp_sizes",
]


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


def spec_from_config(config: dict[str, Any], *, where: str = CONFIG_FILE) -> HFModelSpec:
    """The model described by a parsed ``config.json`` (``where`` names it in errors)."""
    name = architecture_of(config, where)
    spec = BY_ARCHITECTURE[name].spec_from_config(config, name, where)
    keys, arch = spec.family.hf_keys, spec.arch
    if arch.hidden_size % arch.num_attention_heads and arch.kv_channels is None:
        raise HFConversionError(
            f"{where}: {keys['hidden_size']}={arch.hidden_size} is not divisible by "
            f"{keys['num_attention_heads']}={arch.num_attention_heads}"
        )
    if arch.num_attention_heads % arch.query_groups:
        raise HFConversionError(
            f"{where}: {keys['num_attention_heads']}={arch.num_attention_heads} is not a multiple "
            f"of {keys['num_query_groups']}={arch.query_groups}"
        )
    try:
        arch.check_attention(where="config")
    except ValueError as err:
        raise HFConversionError(f"{where}: {err}") from None
    return spec


def read_spec(hf_dir: str | Path) -> HFModelSpec:
    """The model in ``hf_dir`` (``config.json`` only; :func:`parallel.hf.files.inspect_hf_dir`
    also checks the weights)."""
    return spec_from_config(read_config(hf_dir), where=str(Path(hf_dir) / CONFIG_FILE))


def arch_from_hf(hf_dir: str | Path) -> ModelArch:
    """The :class:`ModelArch` of a Hugging Face model folder (for ``teacher.checkpoint``)."""
    return read_spec(hf_dir).arch


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
    arch: ModelArch, tp: int, pp: int, *, where: str, family: ModelFamily | None = None
) -> None:
    """``HFConversionError`` when ``arch`` cannot be sharded at ``tp`` x ``pp``; the message names
    the ``config.json`` keys of ``family`` (by default ``arch``'s) and lists the valid sizes."""
    keys = (family or family_of(arch)).hf_keys
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
    family = family_of(arch)
    problems = family.export_problems(arch)
    if problems:
        raise _export_mismatch(arch, problems)
    return family.export_architecture(arch)


def hf_config_for(
    arch: ModelArch,
    *,
    mlp_activation: MlpActivation | None = None,
    dtype: str = "float32",
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``config.json`` for ``arch``. ``base`` (the source model's config, for a model imported
    from Hugging Face) keeps its other fields (token ids, names) and its architecture when it
    still matches (or is an alias, e.g. an imported Mistral); structural fields always come from
    ``arch``."""
    name = hf_architecture_for(arch)
    family = family_of(arch)
    if base and base.get("architectures"):
        original = base["architectures"][0]
        if original == name or family.aliases.get(original) == name:
            name = original
    config: dict[str, Any] = {
        k: v for k, v in (base or {}).items() if k not in ("transformers_version", "torch_dtype")
    }
    config.update(
        architectures=[name], model_type=family.architectures[name], vocab_size=arch.vocab_size
    )
    config["dtype"] = dtype
    config["tie_word_embeddings"] = arch.tie_embeddings
    family.export_config(
        arch, config, architecture=name, mlp_activation=mlp_activation, from_source=bool(base)
    )
    return config
