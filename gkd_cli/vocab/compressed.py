"""Using a compressed vocabulary after training: the mapping that travels with a checkpoint.

A student distilled with ``data.vocab_mapping`` has ``V'`` embedding rows; the worker copies the
mapping into every checkpoint as ``vocab_mapping.safetensors``. Evaluation and generation code
calls :meth:`CompressedVocab.from_checkpoint` and, when it returns an object (None: the model
uses the original vocabulary), maps the original tokenizer's ids to the student's with
:meth:`~CompressedVocab.to_student`, excludes the padding slots from the student's softmax
(:attr:`~CompressedVocab.padding_ids`, :meth:`~CompressedVocab.mask_padding`; training masks them
the same way) and maps predicted ids back with :meth:`~CompressedVocab.to_original`::

    vocab = CompressedVocab.from_checkpoint(checkpoint_folder)
    if vocab is not None:
        vocab.check_tokenizer(tokenizer)          # the original tokenizer the mapping was made for
        ids = vocab.to_student(tokenizer.encode(text))
        ...
        text = tokenizer.decode(vocab.to_original(predicted_ids))

:func:`check_run_compatibility` is what config validation uses for ``data.vocab_mapping``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gkd_cli.vocab.mapping import VocabMapping, read_mapping, remap_tokens, to_original

MAPPING_FILE = "vocab_mapping.safetensors"
VOCAB_PAD_MULTIPLE = 128
"""megatron-core pads a model's vocabulary to a multiple of this x tp (``parallel.config``)."""
MASKED_LOGIT = -1.0e4
"""The logit of padding slots in training (``parallel.runtime.MASKED_LOGIT``)."""


@dataclass(frozen=True, eq=False)
class CompressedVocab:
    """The compressed vocabulary of a student (GLMD, arXiv 2306.06625, Sec. 3.3)."""

    mapping: VocabMapping
    """The validated mapping."""
    path: Path
    """The mapping file it was read from."""

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, expected_tokenizer_hash: str | None = None
    ) -> CompressedVocab:
        """Read a mapping file (``ValueError`` naming it when missing, corrupt or inconsistent)."""
        path = Path(path)
        return cls(read_mapping(path, expected_tokenizer_hash=expected_tokenizer_hash), path)

    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike) -> CompressedVocab | None:
        """The mapping of the checkpoint at ``folder`` (a step folder, a ``checkpoints`` folder or
        a run directory; the newest complete checkpoint is taken for the latter two):
        ``vocab_mapping.safetensors`` in the step folder, else in its run directory; None when
        there is none (an uncompressed model).

        ``ValueError`` when the mapping is corrupt, or does not fit the checkpoint's model
        (``arch.vocab_size`` in ``meta.json`` differs from the compressed size).
        """
        folder = Path(folder)
        if not folder.exists():
            raise ValueError(f"checkpoint {folder} does not exist")
        checkpoint = _checkpoint_folder(folder)
        # The worker copies the mapping into every checkpoint; a run directory may hold one too.
        candidates = [checkpoint / MAPPING_FILE]
        if checkpoint.parent.name == "checkpoints":
            candidates.append(checkpoint.parent.parent / MAPPING_FILE)
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        vocab = cls.from_file(path)
        vocab_size = _model_vocab_size(checkpoint)
        if vocab_size is not None and vocab_size != vocab.student_vocab_size:
            raise ValueError(
                f"vocabulary mapping {path}: compressed size {vocab.student_vocab_size} but the "
                f"checkpoint's model has vocab_size={vocab_size} (meta.json); the file belongs "
                "to another run; copy the right vocab_mapping.safetensors into the checkpoint"
            )
        return vocab

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """``V``: ids of the original tokenizer."""
        return self.mapping.vocab_size

    @property
    def student_vocab_size(self) -> int:
        """``V'``: the student's vocabulary (its ``vocab_size``), padding slots included."""
        return self.mapping.compressed_vocab_size

    @property
    def tokenizer_hash(self) -> str:
        """SHA-256 of the original tokenizer the mapping was made for (``Tokenizer.hash``)."""
        return str(self.mapping.metadata.get("tokenizer_hash", ""))

    @property
    def padding_ids(self) -> np.ndarray:
        """Sorted student ids that hold no token (int64): never predict them."""
        return np.flatnonzero(self.mapping.comp_to_orig < 0)

    @property
    def valid_mask(self) -> np.ndarray:
        """``[V']`` bool: student ids that hold a token."""
        return self.mapping.comp_to_orig >= 0

    # -- ids -------------------------------------------------------------------------------------
    def to_student(self, ids: Any) -> Any:
        """Original token ids -> student ids (a dropped token becomes its replacement's slot).
        ``ids``: any shape; list, numpy array or torch tensor (type, dtype, device kept)."""
        return remap_tokens(ids, self.mapping.orig_to_comp)

    def to_original(self, ids: Any, *, padding_id: int | None = None) -> Any:
        """Student ids -> original token ids. A padding slot raises ``ValueError`` unless
        ``padding_id`` is given to stand for it. ``ids`` as in :meth:`to_student`."""
        return to_original(ids, self.mapping.comp_to_orig, padding_id=padding_id)

    def mask_padding(self, logits: Any, *, vocab_start: int = 0, value: float = MASKED_LOGIT):
        """``logits`` with the padding slots set to ``value`` (a new tensor).

        ``logits``: torch tensor ``[..., n]`` holding student ids ``[vocab_start, vocab_start +
        n)`` in its last dimension (the whole ``[..., V']``, or a tensor-parallel shard ``[...,
        V'/tp]`` with ``vocab_start = rank * V'/tp``). Training uses ``MASKED_LOGIT``; pass
        ``float("-inf")`` for probability exactly 0.
        """
        import torch

        width = logits.shape[-1]
        if vocab_start < 0 or vocab_start + width > self.student_vocab_size:
            raise ValueError(
                f"logit columns [{vocab_start}, {vocab_start + width}) are outside the compressed "
                f"vocabulary [0, {self.student_vocab_size})"
            )
        invalid = torch.from_numpy(~self.valid_mask[vocab_start : vocab_start + width])
        return logits.masked_fill(invalid.to(logits.device), value)

    # -- checks ----------------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer) -> None:
        """``ValueError`` unless ``tokenizer`` is the original tokenizer this mapping was made for
        (same vocabulary size and, when recorded, the same hash), or the compressed tokenizer
        exported with it (same ids as the student)."""
        if tokenizer.is_compressed:
            same_base = not self.tokenizer_hash or tokenizer.base_hash == self.tokenizer_hash
            if tokenizer.vocab_size != self.student_vocab_size or not same_base:
                raise ValueError(
                    f"tokenizer {tokenizer.source} is compressed to {tokenizer.vocab_size} ids, "
                    f"not by vocabulary mapping {self.path} ({self.student_vocab_size} ids); use "
                    "the tokenizer folder written with this mapping"
                )
            return
        if tokenizer.vocab_size != self.vocab_size or (
            self.tokenizer_hash and tokenizer.hash != self.tokenizer_hash
        ):
            raise ValueError(
                f"vocabulary mapping {self.path} was made for another tokenizer than "
                f"{tokenizer.source} ({self.vocab_size} ids, this one {tokenizer.vocab_size}); "
                "use the tokenizer the student was trained with"
            )

    def __repr__(self) -> str:
        return (
            f"CompressedVocab({self.vocab_size} -> {self.student_vocab_size} ids, "
            f"{len(self.padding_ids)} padding slots, {self.path})"
        )


def _checkpoint_folder(folder: Path) -> Path:
    """The step folder for a step folder, a ``checkpoints`` folder or a run directory; a folder
    that is none of them is returned as is (a folder holding just the mapping)."""
    if (folder / "meta.json").is_file() or (folder / MAPPING_FILE).is_file():
        return folder
    from parallel import checkpoint as ckpt

    try:
        return ckpt.resolve(folder)
    except ckpt.CheckpointError:
        return folder


def _model_vocab_size(checkpoint: Path) -> int | None:
    try:
        meta = json.loads((checkpoint / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    arch = meta.get("arch") if isinstance(meta, dict) else None
    vocab = arch.get("vocab_size") if isinstance(arch, dict) else None
    return vocab if isinstance(vocab, int) else None


def check_run_compatibility(path: str | os.PathLike, *, tp: int, teacher_vocab_size: int) -> None:
    """``ValueError`` unless the mapping at ``path`` can train a student at tensor-parallel size
    ``tp`` against a teacher of ``teacher_vocab_size`` real ids.

    - the file must be a valid mapping (corrupt, truncated or inconsistent files fail here, with
      the file named, before any process is launched). A readable safetensors file that does not
      declare the gkd mapping format is left to the reader of the run (nothing checked here);
    - its original vocabulary must fit in the teacher's;
    - ``V'`` must be a multiple of ``128 x tp`` (megatron pads the student's vocabulary to that;
      otherwise the student's tp shards would not line up with the mapping's);
    - at ``tp > 1`` the kept ids are grouped per teacher tp shard: the mapping must be made for
      this ``tp`` and for the teacher's padded vocabulary at this ``tp`` (``tp = 1`` works with a
      mapping made for any tp: the teacher's logits are then one shard indexed by original ids).
    """
    if _declared_format(path) == "other":
        return
    mapping = read_mapping(path)
    if mapping.vocab_size > teacher_vocab_size:
        raise ValueError(
            f"vocabulary mapping {path} covers {mapping.vocab_size} token ids but the teacher has "
            f"vocab_size={teacher_vocab_size}; compress the teacher's own tokenizer"
        )
    compressed = mapping.compressed_vocab_size
    if compressed % (VOCAB_PAD_MULTIPLE * tp):
        raise ValueError(
            f"vocabulary mapping {path}: the compressed size {compressed} is not a multiple of "
            f"{VOCAB_PAD_MULTIPLE} x tp={tp}, so the student's tensor-parallel shards would not "
            f"line up with the mapping; recompute it with gkd compress-vocab --tp {tp} and a "
            f"--multiple that is a multiple of {VOCAB_PAD_MULTIPLE}"
        )
    if tp == 1:
        return
    if mapping.tp != tp:
        raise ValueError(
            f"vocabulary mapping {path} groups the kept tokens for tp={mapping.tp}, but the run "
            f"uses tp={tp}; recompute it with gkd compress-vocab --tp {tp}"
        )
    step = VOCAB_PAD_MULTIPLE * tp
    teacher_padded = -(-teacher_vocab_size // step) * step
    if mapping.teacher_vocab_padded != teacher_padded:
        raise ValueError(
            f"vocabulary mapping {path} was laid out for a teacher vocabulary padded to "
            f"{mapping.teacher_vocab_padded}, but teacher.vocab_size={teacher_vocab_size} pads to "
            f"{teacher_padded} at tp={tp}; recompute it with gkd compress-vocab --teacher <this "
            "teacher>"
        )


def _header_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The safetensors header metadata of ``path`` with the JSON object under ``gkd_vocab``
    parsed (``None``: not a readable safetensors file; ``gkd_vocab`` that is not JSON: absent)."""
    from safetensors import safe_open

    from gkd_cli.vocab.mapping import METADATA_KEY

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata: dict[str, Any] = dict(handle.metadata() or {})
    except Exception:  # safetensors raises its own error types on damaged files
        return None
    try:
        metadata[METADATA_KEY] = json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        metadata[METADATA_KEY] = None
    return metadata


def _declared_format(path: str | os.PathLike) -> str:
    """``gkd`` (the header declares a gkd vocabulary mapping), ``other`` (a readable safetensors
    header without that declaration) or ``unreadable``."""
    from gkd_cli.vocab.mapping import FORMAT, METADATA_KEY

    metadata = _header_metadata(path)
    if metadata is None or metadata[METADATA_KEY] is None:
        return "unreadable"
    declared = metadata[METADATA_KEY]
    return "gkd" if isinstance(declared, dict) and declared.get("format") == FORMAT else "other"


def declared_sizes(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """(compressed size, original size) a mapping's header records (flat keys, or the object under
    ``gkd_vocab`` that ``gkd compress-vocab`` writes); either is ``None`` when the file does not
    record it or is not safetensors."""
    from gkd_cli.vocab.mapping import METADATA_KEY

    metadata = _header_metadata(path) or {}
    nested = metadata.pop(METADATA_KEY, None)
    if isinstance(nested, dict):
        metadata.update(nested)

    def first_int(keys: tuple[str, ...]) -> int | None:
        for key in keys:
            value = metadata.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and value.isdigit():
                return int(value)
        return None

    return (
        first_int(("compressed_vocab_size", "compressed_size")),
        first_int(("original_vocab_size", "vocab_size")),
    )


def check_mapping_for_run(
    path: str, *, student_vocab_size: int, teacher_vocab_size: int, tp: int, check_paths: bool
) -> None:
    """``ConfigError`` (naming ``data.vocab_mapping`` or ``student.vocab_size``) unless the
    mapping at ``path`` fits the run: the sizes its header records match the student's and the
    teacher's vocabularies, and :func:`check_run_compatibility` passes. A missing file is refused
    only with ``check_paths``."""
    from gkd_cli.errors import ConfigError

    sv, tv = student_vocab_size, teacher_vocab_size
    if not os.path.isfile(path):
        if check_paths:
            raise ConfigError(
                f"data.vocab_mapping: file {path} does not exist; run gkd compress-vocab or "
                "fix the path",
                field="data.vocab_mapping",
            )
        return
    compressed, original = declared_sizes(path)
    if compressed is not None and compressed != sv:
        raise ConfigError(
            f"student.vocab_size={sv} differs from the compressed size {compressed} recorded in "
            f"data.vocab_mapping ({path}); set student.vocab_size={compressed}",
            field="student.vocab_size",
        )
    if original is not None and original > tv:
        raise ConfigError(
            f"data.vocab_mapping ({path}) was made for a vocabulary of {original} tokens, but "
            f"teacher.vocab_size={tv}; compress the teacher's vocabulary again",
            field="data.vocab_mapping",
        )
    try:  # a corrupt file, or a layout for another tp or teacher, fails here rather than in a rank
        check_run_compatibility(path, tp=tp, teacher_vocab_size=tv)
    except ValueError as error:
        raise ConfigError(f"data.vocab_mapping: {error}", field="data.vocab_mapping") from None
