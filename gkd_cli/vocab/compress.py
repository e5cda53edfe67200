"""GLMD vocabulary compression end to end (Tan et al. 2023, arXiv 2306.06625, Sec. 3.3).

:func:`compress_vocab` counts token frequencies over a corpus, keeps the special, verbalizer and
``force_keep`` tokens plus the most frequent others up to the keep size (rounded up to a multiple
of ``multiple x tp``; by default the most frequent ``keep / tp`` of each teacher tensor-parallel
shard, so the student vocabulary is exactly the keep size: the ``balanced`` selection), lays
the kept ids out so each tensor-parallel shard of the student maps into the same shard of the
teacher (:mod:`gkd_cli.vocab.selection`), maps each dropped token to the most
similar kept token under the teacher's input embeddings (:mod:`gkd_cli.vocab.similarity`) or to
unk, and writes into ``out_dir``:

- ``vocab_mapping.safetensors``: the mapping (:mod:`gkd_cli.vocab.mapping`);
- ``vocab_report.md`` and ``vocab_report.json``: coverage, sizes, savings, dropped tokens;
- ``tokenizer/``: the compressed tokenizer (:func:`compress_tokenizer`).

Everything is validated before the corpus is read, and the folder appears only complete (it is
assembled in a temporary folder and renamed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gkd_cli.data.documents import CorpusFormat, DocSplit, check_corpus_files, ensure_documents
from gkd_cli.data.files import atomic_write, check_output_dir, staged_directory
from gkd_cli.data.tokenizer import Tokenizer, load_tokenizer
from gkd_cli.vocab.counting import Progress, TokenCounts, count_tokens
from gkd_cli.vocab.mapping import VocabMapping, consistency_problem
from gkd_cli.vocab.report import build_report, render_markdown
from gkd_cli.vocab.selection import (
    SELECTIONS,
    keep_size,
    layout_kept,
    round_up,
    select_kept,
    select_kept_balanced,
)
from gkd_cli.vocab.similarity import check_similarity, most_similar

MAPPING_FILE = "vocab_mapping.safetensors"
REPORT_MARKDOWN = "vocab_report.md"
REPORT_JSON = "vocab_report.json"
TOKENIZER_DIR = "tokenizer"
COMPRESSED_VOCAB_FILE = "compressed_vocab.json"
MAX_PADDING_ROWS_PER_TP = 1024
"""Teacher embedding rows beyond the tokenizer's vocabulary are accepted as padding up to this
many per tensor-parallel rank (megatron-core pads to 128 x tp; Hugging Face models by a few
hundred); more means the checkpoint belongs to another tokenizer."""


@dataclass(frozen=True, kw_only=True)
class CompressionResult:
    """What :func:`compress_vocab` produced."""

    mapping: VocabMapping
    """The mapping (also written to ``mapping_path``)."""
    counts: TokenCounts
    """Token frequencies of the corpus and counting throughput."""
    report: dict[str, Any]
    """The report (also in ``report_json_path`` and ``report_markdown_path``)."""
    out_dir: Path
    """The output folder."""
    mapping_path: Path
    """``out_dir/vocab_mapping.safetensors``."""
    report_markdown_path: Path
    """``out_dir/vocab_report.md``."""
    report_json_path: Path
    """``out_dir/vocab_report.json``."""
    tokenizer_dir: Path
    """``out_dir/tokenizer``: the compressed tokenizer (load with ``load_tokenizer``)."""

    @property
    def keep(self) -> int:
        """Kept tokens."""
        return self.mapping.num_kept

    @property
    def compressed_vocab_size(self) -> int:
        """Student vocabulary size ``V'`` (padding slots included)."""
        return self.mapping.compressed_vocab_size

    @property
    def coverage(self) -> float:
        """Fraction of corpus tokens that are kept."""
        return float(self.report["coverage"])


def verbalizer_token_ids(tokenizer: Tokenizer, verbalizers: Iterable[str]) -> set[int]:
    """Ids of every token of each verbalizer, as written and with a leading space (prompts put
    label words after a space, and byte-level BPE encodes ``" Yes"`` and ``"Yes"`` differently)."""
    ids: set[int] = set()
    for word in verbalizers:
        if not isinstance(word, str) or not word:
            raise ValueError(f"verbalizers must be non-empty strings, got {word!r}")
        variants = [word] if word[0].isspace() else [word, " " + word]
        for variant in variants:
            ids.update(tokenizer.encode(variant))
    return ids


def force_keep_ids(tokenizer: Tokenizer, force_keep: Iterable[int | str]) -> set[int]:
    """Ids named by ``force_keep``: an int is an id; a string is that exact vocabulary token if
    there is one, else every token of its encoding."""
    ids: set[int] = set()
    for item in force_keep:
        if isinstance(item, bool) or not isinstance(item, int | str | np.integer):
            raise ValueError(f"force_keep entries must be token ids or strings, got {item!r}")
        if isinstance(item, str):
            token_id = tokenizer.token_to_id(item)
            ids.update([token_id] if token_id is not None else tokenizer.encode(item))
        else:
            if not 0 <= int(item) < tokenizer.vocab_size:
                raise ValueError(
                    f"force_keep id {item} is outside the vocabulary [0, {tokenizer.vocab_size})"
                )
            ids.add(int(item))
    return ids


def _check_embedding(embedding, vocab_size: int, tp: int, *, rows_are_layout: bool) -> int:
    """Validate the teacher embedding; return its row count. ``rows_are_layout``: the rows are
    also the teacher's padded vocabulary (no ``teacher_vocab_padded`` was given), so they must
    split evenly over ``tp``."""
    import torch

    if not isinstance(embedding, torch.Tensor) or embedding.ndim != 2:
        raise ValueError(
            "embedding must be the teacher's input embedding matrix as a 2-D torch tensor "
            f"[vocab, hidden], got {type(embedding).__name__} "
            f"{list(getattr(embedding, 'shape', []))}"
        )
    rows = int(embedding.shape[0])
    if rows < vocab_size or rows - vocab_size >= MAX_PADDING_ROWS_PER_TP * tp:
        raise ValueError(
            f"the teacher embedding has {rows} rows but the tokenizer has {vocab_size} tokens: "
            "the teacher was trained with another tokenizer; pass the teacher's own tokenizer"
        )
    if rows_are_layout and rows % tp:
        raise ValueError(
            f"the teacher embedding has {rows} rows, not divisible by tp={tp}: a vocab-parallel "
            "teacher cannot be split that way; use the tp the teacher runs with"
        )
    if not embedding.is_floating_point():
        raise ValueError(f"the teacher embedding must be floating point, got {embedding.dtype}")
    if not bool(torch.isfinite(embedding[:vocab_size]).all()):
        raise ValueError("the teacher embedding holds NaN or infinite values")
    return rows


def compress_vocab(
    tokenizer: Tokenizer | str | os.PathLike,
    corpus_files: Sequence[str | os.PathLike],
    keep: float | int | str,
    embedding,
    out_dir: str | os.PathLike,
    tp: int = 1,
    multiple: int = 128,
    similarity: str = "dot",
    map_to_unk: bool = False,
    force_keep: Iterable[int | str] = (),
    verbalizers: Iterable[str] = (),
    num_workers: int = 2,
    progress: Progress | None = None,
    *,
    teacher_vocab_padded: int | None = None,
    fmt: CorpusFormat = "auto",
    text_field: str = "text",
    doc_split: DocSplit = "paragraph",
    student_hidden_size: int | None = None,
    tied_embeddings: bool = True,
    overwrite: bool = False,
    top_dropped: int = 30,
    selection: str = "balanced",
) -> CompressionResult:
    """Compress the vocabulary of ``tokenizer`` for a student, GLMD style (see module docstring).

    ``keep``: ratio in (0, 1) or token count (or such a string). ``embedding``: the teacher's
    input embedding, a torch tensor ``[Vt_pad, h]`` (full, not tp-sharded; rows beyond the
    tokenizer's ``V`` are padding), or None with ``map_to_unk=True``. ``tp``, ``multiple``: the
    keep size is rounded up to a multiple of ``multiple x tp`` and the slot layout follows the
    teacher's tp shards. ``teacher_vocab_padded`` (without an embedding): the teacher's padded
    vocabulary; default ``roundup(V, multiple x tp)``. ``student_hidden_size`` and
    ``tied_embeddings`` only feed the report's parameter savings. ``num_workers`` processes count
    tokens; ``progress(done_bytes, total_bytes, tokens)`` reports counting progress.
    ``teacher_vocab_padded`` with an embedding: the teacher's padded vocabulary at this ``tp``
    when it differs from the embedding's rows (a Hugging Face teacher is unpadded; a gkd
    checkpoint is padded for the layout it was saved at). ``selection``: ``global`` (the most
    frequent ``keep`` tokens) or ``balanced`` (the most frequent ``keep / tp`` of each teacher
    shard, so ``V' = keep``; see :mod:`gkd_cli.vocab.selection`).

    Every check that can fail does so before the corpus is read (``ValueError``).
    """
    # ---- validation, before any heavy work ------------------------------------------------
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer.is_compressed:
        raise ValueError(f"tokenizer {tokenizer.source} is already compressed; pass the original")
    vocab_size = tokenizer.vocab_size
    kept_size = keep_size(keep, vocab_size, tp=tp, multiple=multiple)
    if not map_to_unk:
        check_similarity(similarity)
    if embedding is None and not map_to_unk:
        raise ValueError(
            "no teacher embedding: pass the teacher (its input embeddings choose replacements for "
            "dropped tokens) or map dropped tokens to unk (map_to_unk / --map-to-unk)"
        )
    if map_to_unk and tokenizer.unk_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.source} has no unk token, so dropped tokens cannot map to unk; "
            "use the teacher's embeddings instead"
        )
    if embedding is not None:
        rows = _check_embedding(
            embedding, vocab_size, tp, rows_are_layout=teacher_vocab_padded is None
        )
        if teacher_vocab_padded is None:
            teacher_vocab_padded = rows
    elif teacher_vocab_padded is None:
        teacher_vocab_padded = round_up(vocab_size, multiple * tp)
    if teacher_vocab_padded < vocab_size or teacher_vocab_padded % tp:
        raise ValueError(
            f"teacher_vocab_padded={teacher_vocab_padded} must be >= the vocabulary "
            f"({vocab_size}) and divisible by tp={tp}"
        )
    special = set(tokenizer.special_ids)
    verbal = verbalizer_token_ids(tokenizer, verbalizers)
    forced_extra = force_keep_ids(tokenizer, force_keep)
    forced = special | verbal | forced_extra
    if len(forced) > kept_size:
        raise ValueError(
            f"keep={keep} gives {kept_size} tokens, fewer than the {len(forced)} that must be kept "
            f"({len(special)} special, {len(verbal)} verbalizer, {len(forced_extra)} force-keep); "
            "raise keep"
        )
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if selection == "balanced":  # dry run: a shard with too many forced tokens fails here
        select_kept_balanced(
            np.zeros(vocab_size, dtype=np.int64), kept_size, forced,
            teacher_vocab_padded=teacher_vocab_padded, tp=tp, multiple=multiple,
        )  # fmt: skip
    if top_dropped < 0:
        raise ValueError(f"top_dropped must be >= 0, got {top_dropped}")
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    paths = check_corpus_files(corpus_files)
    ensure_documents(paths, fmt=fmt, text_field=text_field, doc_split=doc_split)

    # ---- count, select, lay out, map ------------------------------------------------------
    counted = count_tokens(
        tokenizer,
        paths,
        fmt=fmt,
        text_field=text_field,
        doc_split=doc_split,
        num_workers=num_workers,
        progress=progress,
    )
    if selection == "balanced":
        kept_ids = select_kept_balanced(
            counted.counts, kept_size, forced,
            teacher_vocab_padded=teacher_vocab_padded, tp=tp, multiple=multiple,
        )  # fmt: skip
    else:
        kept_ids = select_kept(counted.counts, kept_size, forced)
    comp_to_orig = layout_kept(
        kept_ids, teacher_vocab_padded=teacher_vocab_padded, tp=tp, multiple=multiple
    )
    orig_to_comp = np.full(vocab_size, -1, dtype=np.int64)
    slots = np.flatnonzero(comp_to_orig >= 0)
    orig_to_comp[comp_to_orig[slots]] = slots
    kept_mask = orig_to_comp >= 0
    dropped_ids = np.flatnonzero(~kept_mask)
    if map_to_unk:
        replacements = np.full(len(dropped_ids), tokenizer.unk_id, dtype=np.int64)
    else:
        candidates = np.setdiff1d(kept_ids, np.fromiter(special, dtype=np.int64))
        replacements = most_similar(embedding, dropped_ids, candidates, similarity)  # type: ignore[arg-type]
    orig_to_comp[dropped_ids] = orig_to_comp[replacements]

    metadata = {
        "tokenizer_hash": tokenizer.hash,
        "tp": tp,
        "multiple": multiple,
        "teacher_vocab_padded": teacher_vocab_padded,
        "keep_requested": str(keep),
        "keep": int(len(kept_ids)),
        "selection": selection,
        "similarity": None if map_to_unk else similarity,
        "map_to_unk": bool(map_to_unk),
    }
    mapping = VocabMapping(
        orig_to_comp=orig_to_comp,
        comp_to_orig=comp_to_orig,
        kept_mask=kept_mask,
        metadata={
            **metadata,
            "vocab_size": vocab_size,
            "compressed_vocab_size": len(comp_to_orig),
        },
    )
    problem = consistency_problem(mapping)
    if problem:  # an internal bug, not a user error
        raise RuntimeError(f"vocabulary mapping is inconsistent: {problem}")

    counting = {
        "files": [str(p) for p in paths],
        "num_tokens": counted.num_tokens,
        "num_documents": counted.num_documents,
        "num_bytes": counted.num_bytes,
        "seconds": counted.seconds,
        "tokens_per_second": counted.tokens_per_second,
        "num_workers": counted.num_workers,
    }
    report = build_report(
        tokenizer=tokenizer,
        mapping=mapping,
        counts=counted.counts,
        counting=counting,
        forced={
            "special": len(special),
            "verbalizer": len(verbal - special),
            "force_keep": len(forced_extra - special - verbal),
            "total": len(forced),
        },
        forced_ids=sorted(forced),
        student_hidden_size=student_hidden_size,
        tied_embeddings=tied_embeddings,
        multiple=multiple,
        top_dropped=top_dropped,
    )

    # ---- write, atomically ----------------------------------------------------------------
    with staged_directory(out_dir, overwrite=overwrite) as stage:
        mapping.save(stage / MAPPING_FILE)
        (stage / REPORT_JSON).write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (stage / REPORT_MARKDOWN).write_text(render_markdown(report), encoding="utf-8")
        _write_compressed_tokenizer(tokenizer, mapping, stage / TOKENIZER_DIR)
    return CompressionResult(
        mapping=mapping,
        counts=counted,
        report=report,
        out_dir=out_dir,
        mapping_path=out_dir / MAPPING_FILE,
        report_markdown_path=out_dir / REPORT_MARKDOWN,
        report_json_path=out_dir / REPORT_JSON,
        tokenizer_dir=out_dir / TOKENIZER_DIR,
    )


def _write_compressed_tokenizer(tokenizer: Tokenizer, mapping: VocabMapping, out_dir: Path) -> None:
    compressed = tokenizer.with_mapping(mapping.orig_to_comp, mapping.comp_to_orig)
    compressed.save(out_dir)
    vocabulary = [compressed.id_to_token(i) for i in range(compressed.vocab_size)]
    atomic_write(
        out_dir / COMPRESSED_VOCAB_FILE,
        lambda p: p.write_text(json.dumps(vocabulary, ensure_ascii=False) + "\n", encoding="utf-8"),
    )


def compress_tokenizer(
    tokenizer: Tokenizer | str | os.PathLike,
    mapping: VocabMapping | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Export a tokenizer whose ids are those of the compressed vocabulary.

    Approach (documented choice): the original model file is kept unchanged (``tokenizer.json``
    or ``tokenizer.model``) and an id-remapping step is attached: ``gkd_tokenizer.json`` names
    ``vocab_mapping.safetensors``, and :func:`gkd_cli.data.load_tokenizer` applies
    ``orig_to_comp`` after encoding and ``comp_to_orig`` before decoding. Encoding therefore equals
    encode-then-remap for every text (not only for words made of kept tokens), which rewriting BPE
    merges could not guarantee (a kept token's merge path can pass through dropped tokens).
    ``compressed_vocab.json`` lists the token of every compressed id (null for padding slots),
    for reading. Tools other than gkd see the original tokenizer in ``tokenizer.json``.
    """
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if not isinstance(mapping, VocabMapping):
        from gkd_cli.vocab.mapping import read_mapping

        mapping = read_mapping(mapping)
    if tokenizer.is_compressed:
        raise ValueError(f"tokenizer {tokenizer.source} is already compressed; pass the original")
    expected = mapping.metadata.get("tokenizer_hash")
    if mapping.vocab_size != tokenizer.vocab_size or (expected and expected != tokenizer.hash):
        raise ValueError(
            f"the vocabulary mapping ({mapping.vocab_size} ids) was made for another tokenizer "
            f"than {tokenizer.source} ({tokenizer.vocab_size} ids)"
        )
    out_dir = Path(out_dir)
    with staged_directory(out_dir, overwrite=overwrite) as stage:
        _write_compressed_tokenizer(tokenizer, mapping, stage)
    return out_dir
