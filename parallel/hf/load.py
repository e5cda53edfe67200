"""Load Hugging Face weights into this rank's megatron-core GPTModel shard, and write gkd
checkpoints from them (``gkd convert import-hf``).

Each rank reads only the slices it holds (``safetensors.safe_open(..., framework="pt")`` and
``get_slice``, memory-mapped), in blocks of at most :data:`READ_BLOCK_BYTES`, opening the file for
each block so that at most one block of mapped pages is resident. Peak memory per rank is its shard
plus a small constant; the model is built without random initialization (no full-size master
weights).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from parallel.config import ModelArch
from parallel.families import family_of
from parallel.hf.files import FLOAT_DTYPES, TOKENIZER_FILES, HFCheckpoint, inspect_hf_dir
from parallel.hf.layout import Piece, shard_plan
from parallel.hf.spec import HFConversionError, MlpActivation, check_layout
from parallel.model import gelu_tanh

log = logging.getLogger(__name__)

READ_BLOCK_BYTES = 16 * 1024 * 1024
"""Largest block read from a safetensors file at once (bounds the transient memory)."""

TOKENIZER_DIR = "tokenizer"
"""Sub-folder of an imported gkd checkpoint holding the source model's tokenizer files."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Transformer Engine's layer spec fuses the pre-attention and pre-MLP norms into the following
# linear; the local spec (CPU) keeps them as modules.
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


class SafetensorsReader:
    """Reads row/column slices of the tensors of a checked Hugging Face folder."""

    def __init__(self, checkpoint: HFCheckpoint, *, block_bytes: int = READ_BLOCK_BYTES) -> None:
        self.checkpoint = checkpoint
        self.block_bytes = block_bytes

    def read(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None) -> torch.Tensor:
        """``name[rows[0]:rows[1], cols[0]:cols[1]]`` (or a 1-D row range) as a new tensor."""
        from safetensors import safe_open

        with safe_open(str(self.checkpoint.file_of(name)), framework="pt") as handle:
            view = handle.get_slice(name)
            if cols is None:
                return view[rows[0] : rows[1]]
            return view[rows[0] : rows[1], cols[0] : cols[1]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.tensors[name].shape

    def copy_piece(self, dest: torch.Tensor, piece: Piece) -> None:
        """Copy ``piece`` into ``dest``, reading the source in blocks of at most ``block_bytes``.

        ``dest``: one local parameter of this rank, ``[local rows]`` or ``[local rows, columns]``
        (already sharded over TP: e.g. ``linear_qkv.weight`` is ``[(h/g + 2) d g/tp, hidden]``)."""
        shape = self.shape(piece.source)
        rows = piece.rows or (0, shape[0])
        cols = piece.cols or ((0, shape[1]) if len(shape) == 2 else None)
        src_rows = rows[1] - rows[0]
        width = (cols[1] - cols[0]) if cols else 1
        itemsize = FLOAT_DTYPES[self.checkpoint.tensors[piece.source].dtype]
        per_block = max(1, self.block_bytes // (width * itemsize))
        if not piece.transpose and piece.chunk:
            per_block = max(piece.chunk, per_block // piece.chunk * piece.chunk)
        for start in range(0, src_rows, per_block):
            stop = min(src_rows, start + per_block)
            block = self.read(piece.source, (rows[0] + start, rows[0] + stop), cols)
            if piece.transpose:
                # Source rows are destination columns; the block spans all destination rows.
                _place(dest, block.t(), piece, first_row=0, columns=slice(start, stop))
            else:
                _place(dest, block, piece, first_row=start, columns=None)


def _place(
    dest: torch.Tensor, block: torch.Tensor, piece: Piece, *, first_row: int, columns
) -> None:
    """Write ``block``, rows ``first_row ..`` of the piece's block, to their destination rows
    (``first_row`` is a multiple of ``piece.chunk``)."""
    chunk = piece.chunk or block.shape[0]
    for local in range(0, block.shape[0], chunk):
        row = first_row + local
        start = piece.offset + (row // chunk) * piece.stride if piece.chunk else piece.offset + row
        target = dest[start : start + chunk]
        if columns is not None:
            target = target[:, columns]
        target.copy_(block[local : local + chunk])


def _layers_of(model) -> list[tuple[int, int]]:
    """``(local index, global 0-based layer index)`` of the decoder layers of this stage."""
    return [(i, layer.layer_number - 1) for i, layer in enumerate(model.decoder.layers)]


def _parameter(params: dict[str, torch.nn.Parameter], name: str) -> torch.nn.Parameter | None:
    if name in params:
        return params[name]
    for local, fused in _TE_NAMES.items():
        if name.endswith(local):
            alias = name[: -len(local)] + fused
            if alias in params:
                return params[alias]
    return None


def load_into(model, checkpoint: HFCheckpoint, *, tp_rank: int, tp_size: int) -> None:
    """Fill this rank's GPTModel shard ``model`` from ``checkpoint`` (already checked)."""
    spec = checkpoint.spec
    plan = shard_plan(
        spec,
        tp_rank=tp_rank,
        tp_size=tp_size,
        layers=_layers_of(model),
        pre_process=model.pre_process,
        post_process=model.post_process,
        prefix=checkpoint.prefix,
    )
    params = dict(model.named_parameters())
    targets = {}
    for name in plan:
        param = _parameter(params, name)
        if param is None:
            raise HFConversionError(
                f"the megatron model has no parameter {name}: its architecture does not match "
                f"{checkpoint.path} (model built for another config?)"
            )
        targets[name] = param
    covered = {id(p) for p in targets.values()}
    uncovered = [n for n, p in params.items() if id(p) not in covered]
    if uncovered:
        raise HFConversionError(
            f"no Hugging Face tensor maps to the model's parameters {uncovered[:5]}: the model "
            f"was built for another architecture than {checkpoint.path}"
        )
    reader = SafetensorsReader(checkpoint)
    with torch.no_grad():
        for name, pieces in plan.items():
            fill_parameter(targets[name].data, pieces, reader)


def fill_parameter(dest: torch.Tensor, pieces: list[Piece], reader: SafetensorsReader) -> None:
    """Write ``pieces`` into ``dest``, one local parameter of this rank (``[local rows, ...]``,
    sharded over TP as megatron-core shards it); rows no piece covers (vocabulary padding) become
    zeros."""
    if sum(_piece_rows(reader, p) for p in pieces) < dest.shape[0]:
        dest.zero_()
    for piece in pieces:
        reader.copy_piece(dest, piece)


def _piece_rows(reader: SafetensorsReader, piece: Piece) -> int:
    shape = reader.shape(piece.source)
    if piece.transpose:
        cols = piece.cols or (0, shape[1])
        return cols[1] - cols[0]
    rows = piece.rows or (0, shape[0])
    return rows[1] - rows[0]


# ---------------------------------------------------------------------------------------------
# activation
# ---------------------------------------------------------------------------------------------


def apply_mlp_activation(model, activation: MlpActivation) -> int:
    """Give the MLPs of ``model`` the exact activation of the source model; returns how many MLPs
    were changed. ``ModelArch`` now states GPT-2's tanh-approximated GeLU itself
    (``activation="gelu_tanh"``), so this only changes a model built for an older checkpoint's
    ``arch`` (exact GeLU) whose source was GPT-2: megatron's non-gated MLP calls
    ``self.activation_func``."""
    if activation != "gelu_tanh":
        return 0
    changed = 0
    for layer in model.decoder.layers:
        mlp = layer.mlp
        if getattr(mlp, "activation_func", None) is F.gelu:
            mlp.activation_func = gelu_tanh
            changed += 1
    return changed


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def _effective(arch: ModelArch) -> dict:
    """``arch``'s fields with the defaulted ones resolved (``None`` query groups = heads, ...)."""
    values = dict(vars(arch))
    values.update(
        num_query_groups=arch.query_groups, kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_size
    )
    return values


def check_arch(arch: ModelArch, expected: ModelArch, hf_dir: Path) -> None:
    """``HFConversionError`` unless a model built for ``arch`` is the model in ``hf_dir``
    (``max_seq_len`` may differ for rotary models: it only bounds the sequence length)."""
    mine, theirs = _effective(arch), _effective(expected)
    ignored = {"max_seq_len"} if expected.position_embedding == "rope" else set()
    different = {
        k: (mine.get(k), v) for k, v in theirs.items() if k not in ignored and mine.get(k) != v
    }
    if different:
        details = ", ".join(
            f"{k}: {a!r} here vs {b!r} in {hf_dir}" for k, (a, b) in different.items()
        )
        keys = family_of(expected).hf_keys
        named = [f"{k} is {keys[k]}" for k in different if k in keys]
        hint = f" (in config.json: {', '.join(named)})" if named else ""
        raise HFConversionError(
            f"the model architecture differs from the Hugging Face model ({details}); use the "
            f"model's values{hint} (parallel.hf.arch_from_hf reads them from config.json)"
        )


def load_hf_weights(model, hf_dir: str | Path, arch: ModelArch) -> HFCheckpoint:
    """Load a Hugging Face folder into ``model``, this rank's GPTModel shard built for ``arch``
    under the current megatron parallel state (any TP/PP; local or Transformer Engine layer spec).

    Raises :class:`HFConversionError` (before reading any weight) when the folder is unsupported,
    damaged, or holds another architecture than ``arch``. Also sets the exact MLP activation
    (:func:`apply_mlp_activation`)."""
    from megatron.core import parallel_state as ps

    checkpoint = inspect_hf_dir(hf_dir)
    check_arch(arch, checkpoint.spec.arch, Path(hf_dir))
    load_into(
        model,
        checkpoint,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
    )
    apply_mlp_activation(model, checkpoint.spec.mlp_activation)
    return checkpoint


def build_empty_gpt(arch: ModelArch, *, params_dtype: torch.dtype):
    """This rank's GPTModel shard with uninitialized weights (to be loaded)."""
    from parallel.model import build_gpt

    return build_gpt(arch, params_dtype=params_dtype, perform_initialization=False)


def resolve_dtype(dtype: str, checkpoint: HFCheckpoint) -> torch.dtype:
    """``auto``: the dtype the weights are stored in."""
    name = checkpoint.weight_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise HFConversionError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def build_from_hf(
    hf_dir: str | Path, *, dtype: str = "auto"
) -> tuple[torch.nn.Module, HFCheckpoint]:
    """Collective-free: check ``hf_dir`` and build this rank's shard from it (current megatron
    parallel state). The MLP activation is set exactly (see :func:`apply_mlp_activation`)."""
    from megatron.core import parallel_state as ps

    checkpoint = inspect_hf_dir(hf_dir)
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    check_layout(
        checkpoint.spec.arch,
        tp,
        pp,
        where=str(Path(hf_dir) / "config.json"),
        family=checkpoint.spec.family,
    )
    model = build_empty_gpt(checkpoint.spec.arch, params_dtype=resolve_dtype(dtype, checkpoint))
    load_into(model, checkpoint, tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp)
    apply_mlp_activation(model, checkpoint.spec.mlp_activation)
    return model, checkpoint


def import_meta(checkpoint: HFCheckpoint, dtype: torch.dtype) -> dict:
    """``meta.json`` of an imported checkpoint."""
    spec = checkpoint.spec
    return {
        "arch": vars(spec.arch),
        "source": "hf",
        "hf": {
            "path": str(checkpoint.path.resolve()),
            "architecture": spec.architecture,
            "model_type": spec.model_type,
            "mlp_activation": spec.mlp_activation,
            "config": spec.config,
            "notes": list(spec.notes),
        },
        "precision": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
    }


def copy_tokenizer_files(
    source: Path, target: Path, names: Iterable[str] = TOKENIZER_FILES
) -> list[str]:
    """Copy the tokenizer files of ``source`` that exist into ``target``; returns their names."""
    copied = []
    for name in names:
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def save_imported(model, checkpoint: HFCheckpoint, out: str | Path) -> Path:
    """Collective: write ``model`` (every rank's shard) as a weights-only gkd checkpoint at
    ``out``, with the source's tokenizer files in ``out/tokenizer``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.checkpoint import save_model_weights, write_manifest

    dtype = next(model.parameters()).dtype
    meta = import_meta(checkpoint, dtype)
    meta["layout"] = {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": 1,
    }
    folder = save_model_weights(Path(out), model=model, meta=meta)
    if dist.get_rank() == 0:
        if copy_tokenizer_files(checkpoint.path, folder / TOKENIZER_DIR):
            write_manifest(folder)
    dist.barrier()
    return folder


def import_hf(hf_dir: str | Path, out: str | Path, *, dtype: str = "auto") -> Path:
    """Collective (every rank of the current megatron parallel state): convert a Hugging Face
    folder into a gkd weights-only checkpoint at ``out`` (``meta.json`` has ``"source": "hf"``)."""
    model, checkpoint = build_from_hf(hf_dir, dtype=dtype)
    return save_imported(model, checkpoint, out)
