"""Inspect a Hugging Face model folder before any heavy work: config, safetensors headers, shapes,
tokenizer size.

Only the JSON headers of the safetensors files are read here (8-byte length + JSON, the format's
definition), so a 100B checkpoint is checked in milliseconds and without torch. Every problem is an
:class:`~parallel.hf.spec.HFConversionError` naming the file, the tensor and the fix.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parallel.hf.layout import expected_shapes
from parallel.hf.spec import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    HFConversionError,
    HFModelSpec,
    read_spec,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
"""Files copied along with the weights (those that exist)."""

FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies."""

    file: str
    """safetensors file name, relative to the model folder."""
    shape: tuple[int, ...]
    """Full shape."""
    dtype: str
    """safetensors dtype name (``F32``, ``BF16``, ...)."""


@dataclass(frozen=True, kw_only=True)
class HFCheckpoint:
    """A checked Hugging Face model folder."""

    path: Path
    """The folder."""
    spec: HFModelSpec
    """What its config.json describes."""
    tensors: dict[str, TensorInfo]
    """Every tensor of every safetensors file, by name."""
    prefix: str
    """Prefix of the tensor names (``ModelFamily.tensor_prefix``: ``transformer.`` or empty for
    GPT-2, empty for Llama)."""
    tokenizer_vocab_size: int | None
    """Ids of ``tokenizer.json`` (max id + 1), when the folder has one."""

    def file_of(self, name: str) -> Path:
        return self.path / self.tensors[name].file

    @property
    def weight_dtype(self) -> str:
        """Dtype of the stored weights (of the token embedding), as a torch name."""
        embedding = self.tensors.get(self.spec.family.embedding_name(self.prefix))
        stored = embedding.dtype if embedding else "F32"
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}[stored]


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a header")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as err:
        raise HFConversionError(
            f"{path} is not a readable safetensors file ({err}); re-download or re-save it"
        ) from None
    if not isinstance(header, dict):
        raise HFConversionError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, entry in header.items():
        try:
            end = int(entry["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError):
            raise HFConversionError(f"{path}: header entry {name} is malformed") from None
        if end > data_bytes:
            raise HFConversionError(
                f"{path} is truncated: tensor {name} ends at byte {end} of a {data_bytes}-byte "
                "data section; re-download or re-save it"
            )
    return header


def weight_files(hf_dir: Path) -> list[str]:
    """The safetensors files of a folder: from ``model.safetensors.index.json`` or the single
    ``model.safetensors``. Missing shards are an error naming them."""
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise HFConversionError(f"{index} is damaged ({err!r}); re-download it") from None
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise HFConversionError(
                f"{index} names {len(missing)} shard(s) missing from {hf_dir}: "
                f"{', '.join(missing[:5])}; download all shards"
            )
        return files
    if (hf_dir / SAFETENSORS_FILE).is_file():
        return [SAFETENSORS_FILE]
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise HFConversionError(
            f"{hf_dir} holds PyTorch pickle weights only; gkd reads safetensors: re-save the model "
            "with transformers' save_pretrained(..., safe_serialization=True)"
        )
    raise HFConversionError(f"{hf_dir} has no weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX})")


def tokenizer_vocab_size(path: Path) -> int | None:
    """Number of ids of a ``tokenizer.json`` (largest id + 1, added tokens included)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [int(t["id"]) for t in data.get("added_tokens") or []]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise HFConversionError(f"{path} is not a readable tokenizer.json ({err!r})") from None
    return max(ids) + 1 if ids else None


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def inspect_hf_dir(hf_dir: str | Path) -> HFCheckpoint:
    """Check a Hugging Face model folder: supported architecture, all shards present, every tensor
    the conversion needs present with the shape config.json implies, float dtypes, and a tokenizer
    that fits the vocabulary."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFConversionError(f"{hf_dir} is not a folder")
    spec = read_spec(hf_dir)
    tensors: dict[str, TensorInfo] = {}
    for file in weight_files(hf_dir):
        for name, entry in read_header(hf_dir / file).items():
            tensors[name] = TensorInfo(file, tuple(int(s) for s in entry["shape"]), entry["dtype"])
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        for name, file in json.loads(index.read_text())["weight_map"].items():
            if name not in tensors or tensors[name].file != file:
                raise HFConversionError(f"{index} places tensor {name} in {file}, which lacks it")
    prefix = spec.family.tensor_prefix(tensors)
    expected = expected_shapes(spec, prefix)
    missing = [n for n in expected if n not in tensors]
    if missing:
        listed = ", ".join(f"{n} {_shape_text(expected[n])}" for n in missing[:5])
        raise HFConversionError(
            f"{hf_dir} lacks {len(missing)} tensor(s) that config.json implies: {listed}"
        )
    for name, shape in expected.items():
        info = tensors[name]
        if info.shape != shape:
            raise HFConversionError(
                f"tensor {name} in {hf_dir / info.file} has shape {_shape_text(info.shape)}, "
                f"expected {_shape_text(shape)} from config.json; the weights do not match the config"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise HFConversionError(
                f"tensor {name} in {hf_dir / info.file} has dtype {info.dtype}; only float "
                "weights (F32, F16, BF16) are supported (quantized checkpoints are not)"
            )
    tok_size = tokenizer_vocab_size(hf_dir / "tokenizer.json")
    if tok_size is not None and tok_size > spec.arch.vocab_size:
        raise HFConversionError(
            f"{hf_dir / 'tokenizer.json'} has {tok_size} ids but config.json vocab_size="
            f"{spec.arch.vocab_size}: ids >= {spec.arch.vocab_size} cannot be embedded; is this "
            "the model's tokenizer?"
        )
    return HFCheckpoint(
        path=hf_dir, spec=spec, tensors=tensors, prefix=prefix, tokenizer_vocab_size=tok_size
    )
