"""One tokenizer interface over Hugging Face ``tokenizers`` files and SentencePiece models.

- :func:`load_tokenizer` reads a ``tokenizer.json`` (Hugging Face ``tokenizers``), a SentencePiece
  ``.model`` file, or a directory holding one of them (a directory written by
  :meth:`Tokenizer.save` also carries ``gkd_tokenizer.json``, naming the special tokens and, for a
  compressed vocabulary, the id mapping).
- :func:`train_bpe` trains the byte-level BPE that the demo and tests use, on shipped text, with
  special tokens ``<|endoftext|>`` (end of document), ``<pad>`` and ``<unk>`` at ids 0, 1, 2.

A tokenizer produced by vocabulary compression (``gkd_cli.vocab.compress_tokenizer``) keeps the
original model and applies the id mapping after encoding (``orig_to_comp``) and before decoding
(``comp_to_orig``): its ids, ``vocab_size`` and ``token_to_id`` are those of the compressed
vocabulary.

SentencePiece is optional: it is imported only when a ``.model`` file is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gkd_cli.data.documents import check_corpus_files, iter_documents
from gkd_cli.data.files import atomic_write

HF_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
SIDECAR_FILE = "gkd_tokenizer.json"
MAPPING_FILE = "vocab_mapping.safetensors"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

# Names recognised, in order, when a tokenizer file does not say which token plays which role.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_PAD_CANDIDATES = (PAD_TOKEN, "[PAD]", "<|pad|>", "<|padding|>")
_UNK_CANDIDATES = (UNK_TOKEN, "[UNK]", "<|unk|>")


class _HuggingFaceBackend:
    kind = "huggingface"
    file_name = HF_FILE

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets (about 2.5x faster); older versions lack it.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_batch_framed(self, texts: Sequence[str]) -> list[list[int]]:
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=True)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def declared_special_ids(self) -> set[int]:
        return {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def serialized(self) -> bytes:
        return self.tokenizer.to_str().encode("utf-8")

    def write(self, path: Path) -> None:
        self.tokenizer.save(str(path))


class _SentencePieceBackend:
    kind = "sentencepiece"
    file_name = SENTENCEPIECE_FILE

    def __init__(self, processor: Any, model_bytes: bytes) -> None:
        self.processor = processor
        self.model_bytes = model_bytes

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text, out_type=int))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.processor.encode(list(texts), out_type=int)]

    def encode_batch_framed(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encode_batch(texts)  # SentencePiece models add nothing by themselves

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise ValueError(
            "chat data needs a Hugging Face tokenizer.json (character offsets map the chat "
            "template's assistant turns to tokens); this tokenizer is a SentencePiece model"
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:
            # SentencePiece drops control pieces when decoding; splice their text back in.
            pieces: list[str] = []
            run: list[int] = []
            for i in ids:
                if self.processor.is_control(i):
                    if run:
                        pieces.append(self.processor.decode(run))
                        run = []
                    pieces.append(self.processor.id_to_piece(i))
                else:
                    run.append(i)
            if run:
                pieces.append(self.processor.decode(run))
            return "".join(pieces)
        return self.processor.decode(ids)

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        return self.processor.id_to_piece(token_id)

    def token_to_id(self, token: str) -> int | None:
        token_id = int(self.processor.piece_to_id(token))
        # piece_to_id answers the unk id for unknown pieces: tell those apart from the unk piece.
        if self.processor.id_to_piece(token_id) != token:
            return None
        return token_id

    def declared_special_ids(self) -> set[int]:
        return {
            i
            for i in range(self.vocab_size)
            if self.processor.is_control(i) or self.processor.is_unknown(i)
        }

    def role_id(self, role: str) -> int | None:
        token_id = int(getattr(self.processor, f"{role}_id")())
        return token_id if token_id >= 0 else None

    def serialized(self) -> bytes:
        return self.model_bytes

    def write(self, path: Path) -> None:
        path.write_bytes(self.model_bytes)


class Tokenizer:
    """A loaded tokenizer: text to token ids and back, with the ids of its special tokens.

    Build one with :func:`load_tokenizer`, :func:`train_bpe` or :meth:`from_hf`.
    """

    def __init__(
        self,
        backend: _HuggingFaceBackend | _SentencePieceBackend,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        orig_to_comp: np.ndarray | None = None,
        comp_to_orig: np.ndarray | None = None,
        source: str = "<memory>",
        template_config: dict[str, Any] | None = None,
    ) -> None:
        self._backend = backend
        self.source = source
        """Where the tokenizer was read from (for messages)."""
        self.template_config: dict[str, Any] = dict(template_config or {})
        """What chat rendering needs from the tokenizer's Hugging Face files: ``chat_template``
        (a string, or a list of ``{"name", "template"}``), ``bos_token``, ``eos_token`` (strings)
        and ``origin`` (the file they came from); empty when there were none."""
        self._eos_id = self._find_role(backend, "eos", eos_token, _EOS_CANDIDATES)
        if self._eos_id is None:
            raise ValueError(
                f"tokenizer {source}: no end-of-document token found (looked for "
                f"{', '.join(_EOS_CANDIDATES)}); name it with eos_token=..."
            )
        self._pad_id = self._find_role(backend, "pad", pad_token, _PAD_CANDIDATES)
        self._unk_id = self._find_role(backend, "unk", unk_token, _UNK_CANDIDATES)
        if (orig_to_comp is None) != (comp_to_orig is None):
            raise ValueError("pass both orig_to_comp and comp_to_orig, or neither")
        if orig_to_comp is not None and len(orig_to_comp) != backend.vocab_size:
            raise ValueError(
                f"tokenizer {source}: the vocabulary mapping covers {len(orig_to_comp)} ids but the "
                f"tokenizer has {backend.vocab_size}; the mapping was made for another tokenizer"
            )
        self._orig_to_comp = orig_to_comp
        self._comp_to_orig = comp_to_orig

    @staticmethod
    def _find_role(backend, role: str, name: str | None, candidates: Sequence[str]) -> int | None:
        if name is not None:
            token_id = backend.token_to_id(name)
            if token_id is None:
                raise ValueError(f"{role}_token {name!r} is not in the tokenizer's vocabulary")
            return token_id
        if isinstance(backend, _SentencePieceBackend):
            token_id = backend.role_id(role)
            if token_id is not None:
                return token_id
        for candidate in candidates:
            token_id = backend.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    @classmethod
    def from_hf(
        cls,
        tokenizer: Any,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
    ) -> Tokenizer:
        """Wrap an in-memory ``tokenizers.Tokenizer``."""
        return cls(
            _HuggingFaceBackend(tokenizer),
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
        )

    # -- identity --------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"huggingface"`` or ``"sentencepiece"``."""
        return self._backend.kind

    @property
    def is_compressed(self) -> bool:
        """True when ids are those of a compressed vocabulary (GLMD)."""
        return self._orig_to_comp is not None

    @property
    def hash(self) -> str:
        """SHA-256 of the serialized model (and of the id mapping, when compressed)."""
        digest = hashlib.sha256(self._backend.serialized())
        if self._orig_to_comp is not None:
            digest.update(np.ascontiguousarray(self._orig_to_comp, dtype=np.int64).tobytes())
            digest.update(np.ascontiguousarray(self._comp_to_orig, dtype=np.int64).tobytes())
        return digest.hexdigest()

    @property
    def base_hash(self) -> str:
        """SHA-256 of the serialized original model, ignoring any compression mapping."""
        return hashlib.sha256(self._backend.serialized()).hexdigest()

    # -- sizes and roles -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids (the compressed size, padding slots included, when compressed)."""
        if self._comp_to_orig is not None:
            return len(self._comp_to_orig)
        return self._backend.vocab_size

    @property
    def base_vocab_size(self) -> int:
        """Number of ids of the original (uncompressed) vocabulary."""
        return self._backend.vocab_size

    def _to_comp(self, token_id: int | None) -> int | None:
        if token_id is None or self._orig_to_comp is None:
            return token_id
        return int(self._orig_to_comp[token_id])

    @property
    def eos_id(self) -> int:
        """End-of-document token id (written between documents in token streams)."""
        return self._to_comp(self._eos_id)  # type: ignore[return-value]

    @property
    def pad_id(self) -> int:
        """Padding token id; the end-of-document id when the tokenizer has no pad token."""
        return self._to_comp(self._pad_id if self._pad_id is not None else self._eos_id)  # type: ignore[return-value]

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id, or None (byte-level BPE tokenizers never need one)."""
        return self._to_comp(self._unk_id)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Sorted ids of special tokens: declared special/control tokens plus eos, pad and unk."""
        ids = set(self._backend.declared_special_ids())
        ids |= {i for i in (self._eos_id, self._pad_id, self._unk_id) if i is not None}
        if self._orig_to_comp is not None:
            ids = {int(self._orig_to_comp[i]) for i in ids}
        return tuple(sorted(ids))

    @property
    def base_special_ids(self) -> tuple[int, ...]:
        """Special ids in the original vocabulary (what vocabulary compression must keep)."""
        ids = set(self._backend.declared_special_ids())
        ids |= {i for i in (self._eos_id, self._pad_id, self._unk_id) if i is not None}
        return tuple(sorted(ids))

    # -- tokens ----------------------------------------------------------------------------------
    def id_to_token(self, token_id: int) -> str | None:
        """The token string of ``token_id``; None for an unused padding slot of a compressed
        vocabulary. ``ValueError`` when the id is out of range."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        if self._comp_to_orig is not None:
            token_id = int(self._comp_to_orig[token_id])
            if token_id < 0:
                return None
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token``, or None if it is not in the vocabulary (for a compressed
        vocabulary: None also for tokens that compression dropped)."""
        token_id = self._backend.token_to_id(token)
        if token_id is None or self._orig_to_comp is None or self._comp_to_orig is None:
            return token_id
        comp = int(self._orig_to_comp[token_id])
        return comp if int(self._comp_to_orig[comp]) == token_id else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        ids = self._backend.encode(text)
        if self._orig_to_comp is not None:
            ids = self._orig_to_comp[np.asarray(ids, dtype=np.int64)].tolist()
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text (multi-threaded for Hugging Face tokenizers)."""
        return self._map_batch(self._backend.encode_batch(texts))

    def _map_batch(self, batches: list[list[int]]) -> list[list[int]]:
        if self._orig_to_comp is not None:
            table = self._orig_to_comp
            batches = [table[np.asarray(ids, dtype=np.int64)].tolist() for ids in batches]
        return batches

    def encode_batch_framed(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text as the tokenizer frames a single text (its post-processor's special tokens,
        e.g. Llama's beginning-of-text, as ``tokenizer(text)`` in transformers); SentencePiece
        models add nothing."""
        return self._map_batch(self._backend.encode_batch_framed(texts))

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode` plus each token's ``(start, end)`` character span in ``text``
        (Hugging Face tokenizers only)."""
        ids, offsets = self._backend.encode_offsets(text)
        return self._map_batch([list(ids)])[0], [tuple(o) for o in offsets]  # type: ignore[misc]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (compressed ids are mapped back to the original tokens first;
        padding slots are skipped)."""
        if self._comp_to_orig is not None:
            original = self._comp_to_orig[np.asarray(ids, dtype=np.int64)]
            ids = original[original >= 0].tolist()
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    # -- persistence -----------------------------------------------------------------------------
    def _role_names(self) -> dict[str, str | None]:
        def name(token_id: int | None) -> str | None:
            return None if token_id is None else self._backend.id_to_token(token_id)

        return {
            "eos_token": name(self._eos_id),
            "pad_token": name(self._pad_id),
            "unk_token": name(self._unk_id),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer into ``directory`` (created if needed): the model file
        (``tokenizer.json`` or ``tokenizer.model``), ``gkd_tokenizer.json`` naming the special
        tokens, and for a compressed tokenizer ``vocab_mapping.safetensors``. Each file is written
        to a temporary name first and renamed, so a failure leaves no partial file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sidecar: dict[str, Any] = {
            "format": "gkd-tokenizer",
            "version": 1,
            "backend": self.kind,
            "file": self._backend.file_name,
            **self._role_names(),
            "vocab_mapping": None,
            "template_config": self.template_config or None,
        }
        atomic_write(directory / self._backend.file_name, self._backend.write)
        orig_to_comp, comp_to_orig = self._orig_to_comp, self._comp_to_orig
        if orig_to_comp is not None and comp_to_orig is not None:
            from gkd_cli.vocab.mapping import write_mapping_arrays

            sidecar["vocab_mapping"] = MAPPING_FILE
            atomic_write(
                directory / MAPPING_FILE,
                lambda p: write_mapping_arrays(
                    p, orig_to_comp, comp_to_orig, {"tokenizer_hash": self.base_hash}
                ),
            )
        atomic_write(
            directory / SIDECAR_FILE,
            lambda p: p.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8"),
        )
        return directory

    def with_mapping(self, orig_to_comp: np.ndarray, comp_to_orig: np.ndarray) -> Tokenizer:
        """A copy of this (uncompressed) tokenizer whose ids go through a compression mapping."""
        if self.is_compressed:
            raise ValueError(f"tokenizer {self.source} is already compressed")
        return Tokenizer(
            self._backend,
            **self._role_names(),
            orig_to_comp=np.asarray(orig_to_comp, dtype=np.int64),
            comp_to_orig=np.asarray(comp_to_orig, dtype=np.int64),
            source=self.source,
            template_config=self.template_config,
        )

    def base(self) -> Tokenizer:
        """This tokenizer without any compression mapping (original ids)."""
        if not self.is_compressed:
            return self
        return Tokenizer(
            self._backend,
            **self._role_names(),
            orig_to_comp=None,
            comp_to_orig=None,
            source=self.source,
            template_config=self.template_config,
        )

    def __reduce__(self):
        # Picklable through the serialized model, so worker processes can rebuild it.
        return (
            _rebuild,
            (
                self.kind,
                self._backend.serialized(),
                self._role_names(),
                self._orig_to_comp,
                self._comp_to_orig,
                self.source,
                self.template_config,
            ),
        )

    def __repr__(self) -> str:
        compressed = f", compressed from {self.base_vocab_size}" if self.is_compressed else ""
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}{compressed}, {self.source})"


def _rebuild(
    kind: str,
    data: bytes,
    roles: dict,
    orig_to_comp: np.ndarray | None,
    comp_to_orig: np.ndarray | None,
    source: str,
    template_config: dict | None = None,
) -> Tokenizer:
    if kind == "huggingface":
        from tokenizers import Tokenizer as HFTokenizer

        backend: _HuggingFaceBackend | _SentencePieceBackend = _HuggingFaceBackend(
            HFTokenizer.from_str(data.decode("utf-8"))
        )
    else:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor()
        processor.LoadFromSerializedProto(data)
        backend = _SentencePieceBackend(processor, data)
    return Tokenizer(
        backend,
        **roles,
        orig_to_comp=orig_to_comp,
        comp_to_orig=comp_to_orig,
        source=source,
        template_config=template_config,
    )


def _load_hf(path: Path) -> _HuggingFaceBackend:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return _HuggingFaceBackend(HFTokenizer.from_file(str(path)))
    except Exception as error:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(
            f"tokenizer file {path} could not be read as a Hugging Face tokenizer.json: {error}"
        ) from None


def _load_sentencepiece(path: Path) -> _SentencePieceBackend:
    try:
        import sentencepiece
    except ImportError:
        raise ValueError(
            f"tokenizer {path} is a SentencePiece model but the sentencepiece package is not "
            "installed: pip install sentencepiece"
        ) from None
    model_bytes = path.read_bytes()
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except Exception as error:  # sentencepiece raises RuntimeError/OSError variants
        raise ValueError(
            f"tokenizer file {path} is not a valid SentencePiece model: {error}"
        ) from None
    return _SentencePieceBackend(processor, model_bytes)


def _load_file(path: Path):
    if path.suffix == ".model":
        return _load_sentencepiece(path)
    if path.suffix == ".json":
        return _load_hf(path)
    raise ValueError(
        f"tokenizer file {path}: expected a Hugging Face tokenizer.json (.json) or a SentencePiece "
        "model (.model)"
    )


def _roles_from_hf_config(directory: Path) -> dict[str, str | None]:
    """eos/pad/unk names from a Hugging Face ``tokenizer_config.json`` next to the file."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    roles: dict[str, str | None] = {}
    for role in ("eos_token", "pad_token", "unk_token"):
        value = config.get(role)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            roles[role] = value
    return roles


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _template_config_from_hf(directory: Path) -> dict[str, Any]:
    """The chat template and the bos/eos strings from a Hugging Face tokenizer folder:
    ``chat_template.jinja`` (newer transformers) or ``tokenizer_config.json``'s
    ``chat_template``."""
    found: dict[str, Any] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = {}
        if isinstance(config, dict):
            for role in ("bos_token", "eos_token"):
                value = config.get(role)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    found[role] = value
            if config.get("chat_template") is not None:
                found["chat_template"] = config["chat_template"]
                found["origin"] = str(config_path)
    jinja_path = directory / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        found["chat_template"] = jinja_path.read_text(encoding="utf-8")
        found["origin"] = str(jinja_path)
    if found and "origin" not in found:
        found["origin"] = str(config_path)
    return found


def load_tokenizer(
    path: str | os.PathLike,
    *,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
) -> Tokenizer:
    """Load a tokenizer from a file (``tokenizer.json``, ``*.model``) or a directory.

    In a directory, ``gkd_tokenizer.json`` (written by :meth:`Tokenizer.save`) is followed when
    present; otherwise ``tokenizer.json`` then ``tokenizer.model`` is loaded. Special-token roles
    come from the explicit arguments, then ``gkd_tokenizer.json`` or a Hugging Face
    ``tokenizer_config.json``, then the SentencePiece model, then well-known names.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"tokenizer path {path} does not exist")
    explicit = {"eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
    mapping = None
    if path.is_dir():
        sidecar_path = path / SIDECAR_FILE
        if sidecar_path.is_file():
            try:
                sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
                file = path / sidecar["file"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"tokenizer metadata {sidecar_path} is malformed: {error!r}"
                ) from None
            roles = {k: sidecar.get(k) for k in explicit}
            template_config = sidecar.get("template_config") or _template_config_from_hf(path)
            if sidecar.get("vocab_mapping"):
                from gkd_cli.vocab.mapping import read_mapping_arrays

                mapping = read_mapping_arrays(path / sidecar["vocab_mapping"])
        elif (path / HF_FILE).is_file():
            file, roles = path / HF_FILE, _roles_from_hf_config(path)
            template_config = _template_config_from_hf(path)
        elif (path / SENTENCEPIECE_FILE).is_file():
            file, roles = path / SENTENCEPIECE_FILE, _roles_from_hf_config(path)
            template_config = _template_config_from_hf(path)
        else:
            raise ValueError(
                f"tokenizer folder {path} holds none of {SIDECAR_FILE}, {HF_FILE}, "
                f"{SENTENCEPIECE_FILE}"
            )
    else:
        file, roles = path, _roles_from_hf_config(path.parent)
        template_config = _template_config_from_hf(path.parent)
    if not file.is_file():
        raise ValueError(f"tokenizer file {file} does not exist")
    backend = _load_file(file)
    roles.update({k: v for k, v in explicit.items() if v is not None})
    orig_to_comp, comp_to_orig = mapping if mapping is not None else (None, None)
    return Tokenizer(
        backend,
        **roles,
        orig_to_comp=orig_to_comp,
        comp_to_orig=comp_to_orig,
        source=str(path),
        template_config=template_config,
    )


def train_bpe(
    text_files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_path: str | os.PathLike | None = None,
    *,
    min_frequency: int = 2,
    doc_split: str = "paragraph",
    text_field: str = "text",
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on text files (gkd's own demo/test tokenizer).

    Special tokens: ``<|endoftext|>`` (id 0, end of document), ``<pad>`` (1), ``<unk>`` (2); then
    the 256 byte symbols, then merges. Every string is encodable (byte-level), so ``<unk>`` is
    never produced by encoding. Training is deterministic for the same files and settings (the
    documents are fed in file order; the trainer breaks count ties by pair order).

    ``out_path``: a directory (written with :meth:`Tokenizer.save`) or a ``.json`` file path
    (the bare ``tokenizer.json``); None writes nothing.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = [EOS_TOKEN, PAD_TOKEN, UNK_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(specials) + len(alphabet)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{minimum} (3 special tokens + 256 byte symbols)"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    files = check_corpus_files(text_files)

    def documents():
        for file in files:
            yield from iter_documents(file, text_field=text_field, doc_split=doc_split)  # type: ignore[arg-type]

    first = next(iter(documents()), None)
    if first is None:
        raise ValueError(f"the tokenizer training files hold no text: {', '.join(map(str, files))}")

    hf = HFTokenizer(models.BPE(unk_token=UNK_TOKEN))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    hf.train_from_iterator(documents(), trainer=trainer)
    tokenizer = Tokenizer(
        _HuggingFaceBackend(hf),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        source="train_bpe",
    )
    if out_path is not None:
        out_path = Path(out_path)
        if out_path.suffix == ".json":
            out_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out_path, tokenizer._backend.write)
        else:
            tokenizer.save(out_path)
        tokenizer.source = str(out_path)
    return tokenizer


def check_tokenizer_fits(path: str, vocab_size: int, role: str) -> None:
    """``ConfigError`` (``data.tokenizer``) when the Hugging Face tokenizer at ``path`` (a
    ``tokenizer.json`` or a folder holding one) emits ids beyond ``vocab_size``, the vocabulary of
    model ``role`` (``teacher``, ``student``): they would index out of range. A tokenizer that
    cannot be read here is left to the data loader, which reports it with its own message."""
    from gkd_cli.errors import ConfigError

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not path.endswith(".json") or not os.path.isfile(path):
        return
    try:
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    except Exception:  # unreadable here: the data loader reports it with its own message
        return
    if size > vocab_size:
        raise ConfigError(
            f"data.tokenizer has {size} tokens but {role}.vocab_size={vocab_size}; "
            f"use the {role}'s tokenizer or fix {role}.vocab_size",
            field="data.tokenizer",
        )
