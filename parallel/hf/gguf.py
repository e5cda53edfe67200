"""GGUF files (llama.cpp's format) as Hugging Face model folders, for ``gkd convert import-gguf``.

A GGUF file holds the weights (float or block-quantized), the model's hyper-parameters and its
tokenizer as metadata under llama.cpp's key names. :func:`inspect_gguf` reads and checks all of it
without dequantizing anything (architecture, tensor names, quantization types, shapes against the
metadata, the file's length, the tokenizer); :func:`write_hf_folder` then writes the Hugging Face
folder that ``gkd convert import-hf`` takes (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``), so the per-rank slicing is import-hf's own.

* Weights are dequantized with the ``gguf`` package (``gguf.quants.dequantize``) in blocks of rows
  and streamed into a float32 (or float16) safetensors file written by hand (8-byte header length,
  JSON header, raw little-endian data: the format's definition), so at most one block of
  dequantized rows is in memory at a time.
* llama.cpp permutes the rows of Llama's query and key projections so that rotary pairs are
  adjacent (``convert_hf_to_gguf.py``, ``LlamaModel.permute``: per head,
  ``reshape(2, head_dim/2, ...).swapaxes``); :func:`unpermute_rows` undoes it per head. Qwen2 and
  Qwen3 files are stored unpermuted.
* The tokenizer: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE: tokens, merges, token types,
  the pre-tokenizer named by ``tokenizer.ggml.pre``) becomes a ``tokenizers`` ``tokenizer.json``;
  the chat template and the BOS/EOS/UNK/PAD tokens go to ``tokenizer_config.json``. SentencePiece
  vocabularies (``"llama"``) and others are refused by name.

Only numpy and ``gguf`` are imported (no torch): the CLI checks a file before launching workers.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parallel.hf.spec import HFConversionError, HFModelSpec, spec_from_config

GGUF_EXTRA = "pip install 'gkd[gguf]'"

READ_BLOCK_BYTES = 16 * 1024 * 1024
"""Largest block of dequantized rows held in memory at once."""

# llama.cpp architecture -> (Hugging Face architecture, model_type, Q/K rows permuted).
ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}
"""GGUF ``general.architecture`` values gkd imports."""

TOKENIZER_MODELS = ("gpt2",)
"""``tokenizer.ggml.model`` values gkd turns into a ``tokenizer.json`` (byte-level BPE)."""

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# tokenizer.ggml.pre -> how text is split before byte-level BPE: None is GPT-2's own split
# (ByteLevel with its regex), a string a regex split in front of it (published tokenizers' rules).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "gpt-2": None,
    "smollm": "digits",  # SmolLM's tokenizer.json: each digit alone, then GPT-2's split
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _gguf():
    try:
        import gguf
    except ImportError:
        raise HFConversionError(
            f"reading GGUF files needs the 'gguf' package: {GGUF_EXTRA}"
        ) from None
    return gguf


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file, under its Hugging Face name."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    """Hugging Face (row-major) shape: GGUF's ``ne`` reversed."""
    qtype: str
    """``GGMLQuantizationType`` name (``F32``, ``Q4_1``, ...)."""
    permute_heads: int = 0
    """Heads whose rows llama.cpp permuted (0: not permuted)."""


@dataclass(frozen=True, kw_only=True)
class GGUFModel:
    """A checked GGUF file: its Hugging Face config, tensors and tokenizer metadata."""

    path: Path
    architecture: str
    """``general.architecture`` (``llama``, ...)."""
    config: dict[str, Any]
    """The ``config.json`` it becomes."""
    spec: HFModelSpec
    tensors: list[GGUFTensor]
    tokenizer: dict[str, Any] = field(repr=False)
    """``tokenizer.*`` metadata, keys without the ``tokenizer.`` prefix."""
    notes: tuple[str, ...] = ()

    @property
    def quantization(self) -> dict[str, int]:
        """Tensors per quantization type."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        return counts


def _field_value(gguf, reader_field) -> Any:
    """A metadata value as Python (str, int, float, bool or a list of them)."""
    types = reader_field.types
    value_type = gguf.GGUFValueType

    def scalar(part, kind):
        if kind == value_type.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        item = part.tolist()
        item = item[0] if isinstance(item, list) else item
        return bool(item) if kind == value_type.BOOL else item

    if not types:
        return None
    if types[0] == value_type.ARRAY:
        kind = types[-1]
        return [scalar(reader_field.parts[i], kind) for i in reader_field.data]
    return scalar(reader_field.parts[reader_field.data[0]], types[0])


def _open(path: Path):
    gguf = _gguf()
    if not path.is_file():
        raise HFConversionError(f"{path} does not exist or is not a file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise HFConversionError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
        )
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as err:  # the reader raises ValueError, IndexError, ... on a short file
        raise HFConversionError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); it may be "
            "truncated: re-download it"
        ) from None
    return gguf, reader


def _metadata(gguf, reader, path: Path) -> dict[str, Any]:
    values = {}
    for name, reader_field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            values[name] = _field_value(gguf, reader_field)
        except Exception as err:
            raise HFConversionError(f"{path}: metadata key {name} is unreadable ({err})") from None
    return values


def _dequantizable(gguf, qtype) -> bool:
    """Whether ``gguf.quants.dequantize`` implements ``qtype`` (tried on one zero block)."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        out = gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except Exception:
        return False
    return out.size == block


def _short(value: float) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (``1e-05``, not
    ``9.999999747378752e-06``), as the source model's ``config.json`` wrote it."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def _hf_config(arch: str, meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict:
    """``config.json`` from the ``{arch}.*`` metadata (llama.cpp's key names)."""
    hf_arch, model_type, _ = ARCHITECTURES[arch]

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise HFConversionError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise HFConversionError(
                f"{path}: {arch}.attention.head_count_kv differs between layers ({kv_heads[:8]}...);"
                " per-layer key/value heads are not supported"
            )
        kv_heads = kv_heads[0]
    head_dim = int(get("attention.key_length", hidden // heads, required=False))
    rotary = get("rope.dimension_count", head_dim, required=False)
    if int(rotary) != head_dim:
        raise HFConversionError(
            f"{path}: {arch}.rope.dimension_count={rotary} is not the head dimension {head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    scaling = get("rope.scaling.type", None, required=False)
    if scaling not in (None, "none"):
        raise HFConversionError(
            f"{path}: {arch}.rope.scaling.type={scaling!r} (RoPE scaling) is not supported by the "
            "GGUF import; only unscaled rotary embeddings are"
        )
    if "rope_freqs.weight" in tensor_names:
        raise HFConversionError(
            f"{path} holds rope_freqs.weight (Llama 3.1-style RoPE frequency scaling), which the "
            "GGUF import does not support"
        )
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab = get("vocab_size", None, required=False) or len(tokens) or None
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length", 2048, required=False)),
        "rms_norm_eps": _short(get("attention.layer_norm_rms_epsilon", 1e-6, required=False)),
        "rope_theta": _short(get("rope.freq_base", 10000.0, required=False)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "vocab_size": vocab,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    if arch == "qwen3":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    for role in ("bos", "eos", "pad"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None:
            config[f"{role}_token_id"] = int(token_id)
    return config


def _check_tokenizer(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    tokenizer = {k[len("tokenizer.") :]: v for k, v in meta.items() if k.startswith("tokenizer.")}
    model = tokenizer.get("ggml.model")
    if model is None or not tokenizer.get("ggml.tokens"):
        raise HFConversionError(
            f"{path} has no tokenizer (metadata tokenizer.ggml.model / tokenizer.ggml.tokens is "
            "missing); gkd needs the model's tokenizer: use a GGUF that includes it"
        )
    if model not in TOKENIZER_MODELS:
        kind = " (SentencePiece)" if model == "llama" else ""
        raise HFConversionError(
            f"{path}: tokenizer.ggml.model={model!r}{kind} is not supported by the GGUF import; "
            f"supported: {', '.join(TOKENIZER_MODELS)} (byte-level BPE). Convert the original "
            "Hugging Face model with gkd convert import-hf instead"
        )
    if not tokenizer.get("ggml.merges"):
        raise HFConversionError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    return tokenizer


def _hf_tensor_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def inspect_gguf(path: str | Path) -> GGUFModel:
    """Read and check a GGUF file without dequantizing (cheap): supported architecture, every
    tensor known, of a type ``gguf`` dequantizes and of the shape the metadata implies, the file
    long enough for all tensors, and a tokenizer gkd can write."""
    from parallel.hf.layout import expected_shapes

    path = Path(path)
    gguf, reader = _open(path)
    meta = _metadata(gguf, reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise HFConversionError(
            f"{path}: general.architecture={arch!r} is not supported by the GGUF import; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    size = path.stat().st_size
    names = {t.name for t in reader.tensors}
    tokenizer = _check_tokenizer(meta, path)
    config = _hf_config(arch, meta, names, path)
    where = f"{path} (metadata as config.json)"
    spec = spec_from_config(config, where=where)
    permuted = ARCHITECTURES[arch][2]
    tensors, unsupported = [], {}
    for t in reader.tensors:
        hf_name = _hf_tensor_name(t.name)
        if hf_name is None:
            raise HFConversionError(
                f"{path}: tensor {t.name} has no Hugging Face counterpart gkd knows ({arch}); "
                "the file holds a model variant the GGUF import does not support"
            )
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise HFConversionError(
                f"{path} is truncated: tensor {t.name} ends at byte {end} of {size}; re-download it"
            )
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        if qtype.name not in unsupported and not _dequantizable(gguf, qtype):
            unsupported[qtype.name] = t.name
        heads = 0
        if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            heads = config["num_attention_heads"]
        elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            heads = config["num_key_value_heads"]
        shape = tuple(int(n) for n in reversed(list(t.shape)))
        tensors.append(GGUFTensor(t.name, hf_name, shape, qtype.name, heads))
    if unsupported:
        listed = ", ".join(f"{q} (e.g. {n})" for q, n in unsupported.items())
        raise HFConversionError(
            f"{path}: quantization type(s) {listed} cannot be dequantized by the installed gguf "
            "package; upgrade it (pip install -U gguf) or use a file quantized otherwise"
        )
    expected = expected_shapes(spec)
    found = {t.hf_name: t for t in tensors}
    missing = [n for n in expected if n not in found]
    if missing:
        raise HFConversionError(
            f"{path} lacks {len(missing)} tensor(s) its metadata implies, e.g. "
            + ", ".join(missing[:3])
        )
    for name, shape in expected.items():
        if found[name].shape != shape:
            raise HFConversionError(
                f"{path}: tensor {found[name].gguf_name} has shape {list(found[name].shape)}, "
                f"expected {list(shape)} from the metadata"
            )
    notes = []
    pre = tokenizer.get("ggml.pre")
    if pre is not None and pre not in PRE_TOKENIZERS:
        notes.append(
            f"tokenizer.ggml.pre={pre!r} is not known to gkd: text is split with GPT-2's rule; "
            "check tokenization against the original model"
        )
    return GGUFModel(
        path=path,
        architecture=arch,
        config=config,
        spec=spec,
        tensors=tensors,
        tokenizer=tokenizer,
        notes=tuple(notes) + spec.notes,
    )


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's query/key row permutation on ``rows`` (whole heads, ``[heads * d, ...]``):
    within each head, GGUF row ``2 i + j`` is Hugging Face row ``j d/2 + i``."""
    head_dim = rows.shape[0] // heads
    shaped = rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:])
    return shaped.swapaxes(1, 2).reshape(rows.shape)


def _row_blocks(reader_tensor, info: GGUFTensor, block_bytes: int) -> Iterator[np.ndarray]:
    """The tensor dequantized to float32 in blocks of whole rows (whole heads when permuted)."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType(int(reader_tensor.tensor_type))
    data = reader_tensor.data
    if len(info.shape) == 1:
        values = gguf.quants.dequantize(data, qtype).reshape(info.shape).astype(np.float32)
        yield unpermute_rows(values, info.permute_heads) if info.permute_heads else values
        return
    rows, cols = info.shape
    data = data.reshape(rows, -1)
    unit = rows // info.permute_heads if info.permute_heads else 1
    step = max(unit, block_bytes // (4 * cols) // unit * unit)
    for start in range(0, rows, step):
        block = gguf.quants.dequantize(data[start : start + step], qtype)
        block = np.ascontiguousarray(block.reshape(-1, cols), dtype=np.float32)
        if info.permute_heads:
            block = unpermute_rows(block, block.shape[0] // unit)
        yield block


def write_safetensors(
    path: Path,
    tensors: Sequence[tuple[str, tuple[int, ...], Callable[[], Iterator[np.ndarray]]]],
    *,
    dtype: str = "F32",
) -> None:
    """Write a safetensors file whose tensors arrive as blocks of rows (``(name, shape,
    blocks)``, ``blocks()`` yielding the rows in order); ``dtype`` ``F32`` or ``F16``."""
    np_dtype = {"F32": np.float32, "F16": np.float16}[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        nbytes = int(np.prod(shape)) * itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, shape, blocks in tensors:
            written = 0
            for block in blocks():
                data = np.ascontiguousarray(block, dtype=np_dtype).astype(
                    "<" + np.dtype(np_dtype).str[1:], copy=False
                )
                handle.write(data.tobytes())
                written += data.nbytes
            if written != int(np.prod(shape)) * itemsize:
                raise HFConversionError(f"tensor {name}: wrote {written} bytes, expected more")


def write_weights(
    model: GGUFModel, out: Path, *, dtype: str = "F32", block_bytes: int = READ_BLOCK_BYTES
) -> Path:
    """Dequantize every tensor of ``model`` into ``out/model.safetensors`` (Hugging Face names,
    query/key rows unpermuted), one block of rows at a time."""
    _, reader = _open(model.path)
    by_name = {t.name: t for t in reader.tensors}
    entries = [
        (
            info.hf_name,
            info.shape,
            functools.partial(_row_blocks, by_name[info.gguf_name], info, block_bytes),
        )
        for info in sorted(model.tensors, key=lambda t: t.hf_name)
    ]
    path = out / "model.safetensors"
    write_safetensors(path, entries, dtype=dtype)
    return path


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def build_tokenizer(tokenizer: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` metadata of a byte-level BPE."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    tokens: list[str] = tokenizer["ggml.tokens"]
    types: list[int] = tokenizer.get("ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merges = [tuple(m.split(" ", 1)) for m in tokenizer["ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = PRE_TOKENIZERS.get(tokenizer.get("ggml.pre") or "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if split is None:
        backend.pre_tokenizer = byte_level
    elif split == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
    backend.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _CONTROL and vocab.get(t) is not None
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _USER_DEFINED and vocab.get(t) is not None
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
    bos_id = tokenizer.get("ggml.bos_token_id")
    eos_id = tokenizer.get("ggml.eos_token_id")
    pieces = []
    if tokenizer.get("ggml.add_bos_token") and bos_id is not None:
        pieces.append((tokens[bos_id], int(bos_id)))
    if tokenizer.get("ggml.add_eos_token") and eos_id is not None:
        pieces.append((tokens[eos_id], int(eos_id)))
    if pieces:
        bos = [p[0] for p in pieces if tokenizer.get("ggml.add_bos_token") and p[1] == bos_id]
        eos = [p[0] for p in pieces if tokenizer.get("ggml.add_eos_token") and p[1] == eos_id]
        single = " ".join([*bos, "$A", *eos])
        pair = " ".join([*bos, "$A", *eos, *bos, "$B", *eos])
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=sorted(set(pieces), key=lambda p: p[1])
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def tokenizer_config(model: GGUFModel) -> dict[str, Any]:
    """``tokenizer_config.json``: the special tokens, whether BOS/EOS are added, the chat
    template."""
    meta = model.tokenizer
    tokens = meta["ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model.config["max_position_embeddings"],
        "add_bos_token": bool(meta.get("ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[f"{role}_token"] = tokens[int(token_id)]
    if meta.get("chat_template"):
        config["chat_template"] = meta["chat_template"]
    return config


def write_tokenizer(model: GGUFModel, out: Path) -> list[str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` of the model in ``out``."""
    backend = build_tokenizer(model.tokenizer)
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(model), indent=2, ensure_ascii=False) + "\n"
    )
    return ["tokenizer.json", "tokenizer_config.json"]


def write_hf_folder(
    model: GGUFModel, out: str | Path, *, dtype: str = "F32", block_bytes: int = READ_BLOCK_BYTES
) -> Path:
    """Write ``model`` as a Hugging Face folder at ``out`` (created): ``config.json``,
    ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``,
    ``generation_config.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(model.config, torch_dtype={"F32": "float32", "F16": "float16"}[dtype])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        k: v for k, v in config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(model, out)
    write_weights(model, out, dtype=dtype, block_bytes=block_bytes)
    return out
