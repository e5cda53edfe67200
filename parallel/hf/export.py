"""Write a gkd checkpoint as a Hugging Face model folder (``gkd convert export-hf``).

The checkpoint is loaded in one process at TP1 x PP1 (megatron's dist checkpoints reshard from any
layout), converted to Hugging Face tensors with full-tensor reshapes (the inverse of the import
plan, written independently: each family's ``export_layer``), the vocabulary padding is stripped,
and ``config.json`` + ``model.safetensors`` are written so that
``transformers.AutoModelForCausalLM.from_pretrained`` loads them. Checkpoint entries that do not
belong to the GPT model (auxiliary method modules, optimizer state) are not read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from parallel.config import ModelArch
from parallel.families import family_of
from parallel.hf.spec import HFConversionError, hf_architecture_for, hf_config_for

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_tensors(state_dict: dict[str, Any], arch: ModelArch) -> dict[str, torch.Tensor]:
    """Hugging Face tensors of a full (TP1 x PP1) GPTModel state dict (local layer-spec names);
    vocabulary padding stripped. The family of ``arch`` names and reshapes the tensors."""
    sd = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    hf_architecture_for(arch)  # a model no family represents exactly fails here
    family = family_of(arch)
    prefix = family.export_prefix
    out = {family.embedding_name(prefix): sd["embedding.word_embeddings.weight"][: arch.vocab_size]}
    out.update({theirs: sd[ours] for ours, theirs in family.first_stage_tensors(prefix).items()})
    for layer in range(arch.num_layers):
        out.update(family.export_layer(sd, arch, layer))
    out.update({theirs: sd[ours] for ours, theirs in family.last_stage_tensors(prefix).items()})
    if not arch.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"][: arch.vocab_size]
    return out


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (``[gate; up]`` halves of one fc1 weight,
    views of a padded embedding): copy those, and only those."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        if (
            pointer in seen
            or tensor.numel() != tensor.untyped_storage().nbytes() // tensor.element_size()
        ):
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        result[name] = tensor
    return result


def _export_dtype(dtype: str, meta: dict) -> torch.dtype:
    """``auto``: the precision the checkpoint was written in (an imported model: its import
    dtype), else the source config's dtype, else float32."""
    if dtype == "auto":
        hf_dtype = ((meta.get("hf") or {}).get("config") or {}).get("dtype")
        name = _PRECISION_DTYPE.get(meta.get("precision", ""), hf_dtype)
        return EXPORT_DTYPES.get(str(name), torch.float32)
    if dtype not in EXPORT_DTYPES:
        raise HFConversionError(f"--dtype {dtype!r} is not one of auto, {', '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[dtype]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_for_export(folder: Path, arch: ModelArch):
    """A TP1 x PP1 fp32 GPTModel holding the checkpoint's weights. Creates a one-rank gloo group
    and megatron's parallel state when none exists; in an existing group (every rank a TP1 x PP1
    replica) every rank loads."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.checkpoint import load_model_weights
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize
    from parallel.hf.load import build_empty_gpt

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    if not ps.model_parallel_is_initialized():
        initialize(ParallelConfig(dp=dist.get_world_size()), seed=0)
    if (
        ps.get_tensor_model_parallel_world_size() != 1
        or ps.get_pipeline_model_parallel_world_size() != 1
    ):
        raise HFConversionError("export loads the whole model on each rank: run it at TP1 x PP1")
    model = build_empty_gpt(arch, params_dtype=torch.float32)
    load_model_weights(folder, model)
    return model


def _write_folder(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer: Path | None,
    extra_files: Mapping[str, str | os.PathLike],
) -> None:
    """Write the export into ``<out_dir>.tmp`` and rename it into place."""
    from safetensors.torch import save_file

    from parallel.hf.load import copy_tokenizer_files

    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None and tokenizer.is_dir():
        copy_tokenizer_files(tokenizer, staging)
    elif tokenizer is not None and tokenizer.is_file():
        shutil.copy2(tokenizer, staging / tokenizer.name)
    for name, extra in extra_files.items():
        if Path(extra).is_dir():
            shutil.copytree(extra, staging / name)
        else:
            shutil.copy2(extra, staging / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)


def read_arch(folder: Path) -> tuple[ModelArch, dict]:
    """The student architecture and meta of a gkd checkpoint folder."""
    from parallel.checkpoint import read_meta

    meta = read_meta(folder)
    if "arch" not in meta:
        raise HFConversionError(f"{folder}/meta.json has no 'arch'; it was not written by gkd")
    try:
        return ModelArch(**meta["arch"]), meta
    except TypeError as err:
        raise HFConversionError(
            f"{folder}/meta.json 'arch' is not readable by this gkd ({err})"
        ) from None


def export_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "auto",
    tokenizer: str | os.PathLike | None = None,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
    extra_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the gkd checkpoint ``checkpoint`` (a step folder, ``checkpoints`` root or run dir) as
    a Hugging Face folder ``out_dir``: ``config.json``, ``model.safetensors`` and tokenizer files
    (from ``tokenizer``, a folder or a file; by default the checkpoint's own ``tokenizer/`` of an
    imported model; ``tokenizer=""`` copies none).

    ``dtype``: ``auto`` (the checkpoint's precision, or the source model's dtype for an imported
    one), ``float32``, ``bfloat16`` or ``float16``. ``extra_files`` maps names in ``out_dir`` to
    files or folders copied there; ``extra_config`` entries are added to ``config.json``.

    Runs in this process: creates (and destroys) a one-rank gloo group if none exists. Inside an
    existing TP1 x PP1 group it is collective (every rank loads) and rank 0 writes."""
    import torch.distributed as dist

    from parallel.checkpoint import resolve, verify_manifest
    from parallel.distributed import shutdown
    from parallel.hf.load import TOKENIZER_DIR

    folder = resolve(checkpoint)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise HFConversionError(
            f"{out_dir} exists and is not empty; pass --overwrite or another --out"
        )
    verify_manifest(folder, checksums=False)
    arch, meta = read_arch(folder)
    hf_meta = meta.get("hf") or {}
    hf_architecture_for(arch)  # unsupported combinations fail before any heavy work
    torch_dtype = _export_dtype(dtype, meta)
    dtype_name = next(k for k, v in EXPORT_DTYPES.items() if v == torch_dtype)
    config = hf_config_for(
        arch,
        mlp_activation=hf_meta.get("mlp_activation"),
        dtype=dtype_name,
        base=hf_meta.get("config"),
    )
    config.update(extra_config or {})

    owned = not dist.is_initialized()
    try:
        model = load_for_export(folder, arch)
        tensors = hf_tensors(model.state_dict(), arch)
    finally:
        if owned:
            shutdown()
    if owned or dist.get_rank() == 0:
        tensors = _own_storage(
            {k: v.detach().to(torch_dtype).contiguous() for k, v in tensors.items()}
        )
        source = (
            folder / TOKENIZER_DIR if tokenizer is None else Path(tokenizer) if tokenizer else None
        )
        _write_folder(out_dir, tensors, config, source, extra_files or {})
        log.info("exported %s (%s) to %s", folder, config["architectures"][0], out_dir)
    if not owned:
        dist.barrier()
    return out_dir
