"""Readable report of a vocabulary compression: coverage, sizes, savings, dropped tokens."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from gkd_cli.data.tokenizer import Tokenizer
from gkd_cli.vocab.mapping import VocabMapping
from gkd_cli.vocab.selection import equal_size_coverage, round_up


def coverage(counts: np.ndarray, kept_mask: np.ndarray) -> float:
    """Fraction of corpus tokens whose id is kept (``counts``, ``kept_mask``: ``[V]``)."""
    total = int(np.asarray(counts).sum())
    if total == 0:
        return 0.0
    return int(np.asarray(counts)[np.asarray(kept_mask, dtype=bool)].sum()) / total


def parameter_savings(
    vocab_size: int,
    compressed_vocab_size: int,
    hidden_size: int,
    *,
    tied_embeddings: bool,
    tp: int = 1,
    multiple: int = 128,
) -> dict[str, int]:
    """Student parameters saved by the compressed vocabulary.

    The uncompressed student would hold ``roundup(V, multiple x tp)`` rows (megatron-core's
    padding); the compressed one ``V'``. Each row costs ``hidden_size`` parameters in the input
    embedding, and as many again in the output layer unless the two are tied.
    """
    full_rows = round_up(vocab_size, multiple * tp)
    matrices = 1 if tied_embeddings else 2
    return {
        "hidden_size": hidden_size,
        "tied_embeddings": tied_embeddings,
        "rows_before": full_rows,
        "rows_after": compressed_vocab_size,
        "parameters_before": full_rows * hidden_size * matrices,
        "parameters_after": compressed_vocab_size * hidden_size * matrices,
        "parameters_saved": (full_rows - compressed_vocab_size) * hidden_size * matrices,
    }


def _token_entry(tokenizer: Tokenizer, token_id: int) -> dict[str, Any]:
    return {
        "id": int(token_id),
        "token": tokenizer.id_to_token(int(token_id)),
        "text": tokenizer.decode([int(token_id)]),
    }


def build_report(
    *,
    tokenizer: Tokenizer,
    mapping: VocabMapping,
    counts: np.ndarray,
    counting: dict[str, Any],
    forced: dict[str, int],
    forced_ids: Iterable[int] = (),
    student_hidden_size: int | None,
    tied_embeddings: bool,
    multiple: int,
    top_dropped: int = 30,
) -> dict[str, Any]:
    """The report as a JSON-serializable dict (``tokenizer``: the original, uncompressed one)."""
    meta = mapping.metadata
    kept_mask = mapping.kept_mask
    dropped = np.flatnonzero(~kept_mask)
    order = dropped[np.argsort(-counts[dropped], kind="stable")][:top_dropped]
    top = []
    for token_id in order:
        replacement = int(mapping.comp_to_orig[mapping.orig_to_comp[token_id]])
        top.append(
            {
                **_token_entry(tokenizer, token_id),
                "count": int(counts[token_id]),
                "replacement": _token_entry(tokenizer, replacement),
            }
        )
    tp = mapping.tp
    width = mapping.compressed_vocab_size // tp
    shards = []
    for rank in range(tp):
        held = int((mapping.comp_to_orig[rank * width : (rank + 1) * width] >= 0).sum())
        shards.append({"rank": rank, "kept": held, "padding": width - held})
    seen = counts > 0
    report: dict[str, Any] = {
        "tokenizer_hash": meta.get("tokenizer_hash"),
        "vocab_size": mapping.vocab_size,
        "keep_requested": meta.get("keep_requested"),
        "selection": meta.get("selection", "global"),
        "keep": mapping.num_kept,
        "compressed_vocab_size": mapping.compressed_vocab_size,
        "padding_slots": mapping.compressed_vocab_size - mapping.num_kept,
        "dropped": int(len(dropped)),
        "tp": tp,
        "multiple": multiple,
        "teacher_vocab_padded": mapping.teacher_vocab_padded,
        "replacement": (
            "unk"
            if meta.get("map_to_unk")
            else f"most similar kept token ({meta.get('similarity')})"
        ),
        "forced": forced,
        "corpus": counting,
        "coverage": coverage(counts, kept_mask),
        "token_types_seen": int(seen.sum()),
        "token_types_seen_kept": int((seen & kept_mask).sum()),
        "shards": shards,
        "equal_size": equal_size_coverage(
            counts,
            forced_ids,
            compressed_vocab_size=mapping.compressed_vocab_size,
            teacher_vocab_padded=mapping.teacher_vocab_padded,
            tp=tp,
        ),
        "top_dropped": top,
    }
    if student_hidden_size is not None:
        report["parameters"] = parameter_savings(
            mapping.vocab_size,
            mapping.compressed_vocab_size,
            student_hidden_size,
            tied_embeddings=tied_embeddings,
            tp=tp,
            multiple=multiple,
        )
    return report


def _cell(text: str | None) -> str:
    if text is None:
        return "-"
    return json.dumps(text, ensure_ascii=False).replace("|", "\\|").replace("`", "'")


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    corpus = report["corpus"]
    lines = [
        "# Vocabulary compression report",
        "",
        "GLMD vocabulary compression (Tan et al. 2023, arXiv 2306.06625): keep the most frequent",
        "tokens; map the others to the most similar kept token.",
        "",
        "| | |",
        "|---|---|",
        f"| original vocabulary | {report['vocab_size']:,} |",
        f"| kept tokens | {report['keep']:,} (requested {report['keep_requested']}, "
        f"{report.get('selection', 'global')} selection) |",
        f"| compressed vocabulary (with padding slots) | {report['compressed_vocab_size']:,} |",
        f"| dropped tokens | {report['dropped']:,} |",
        f"| tensor-parallel size / rounding multiple | {report['tp']} / {report['multiple']} |",
        f"| teacher padded vocabulary | {report['teacher_vocab_padded']:,} |",
        f"| dropped tokens map to | {report['replacement']} |",
        "| always kept | "
        + ", ".join(f"{name} {n}" for name, n in report["forced"].items())
        + " |",
        f"| corpus | {corpus['num_documents']:,} documents, {corpus['num_tokens']:,} tokens |",
        f"| counting | {corpus['seconds']:.2f} s, {corpus['tokens_per_second']:,.0f} tokens/s, "
        f"{corpus['num_workers']} worker processes |",
        f"| corpus coverage of the kept set | {100 * report['coverage']:.3f}% of tokens |",
        f"| token types seen / kept among them | {report['token_types_seen']:,} / "
        f"{report['token_types_seen_kept']:,} |",
    ]
    same = report.get("equal_size")
    if same:
        lines.append(
            f"| coverage at this student vocabulary ({same['compressed_vocab_size']:,}): balanced "
            f"/ global selection | {100 * same['balanced_coverage']:.3f}% "
            f"({same['balanced_kept']:,} kept, {same['balanced_unseen_kept']:,} never seen) / "
            f"{100 * same['global_coverage']:.3f}% ({same['global_kept']:,} kept, "
            f"{same['global_unseen_kept']:,} never seen) |"
        )
    params = report.get("parameters")
    if params:
        tie = "tied" if params["tied_embeddings"] else "untied"
        lines.append(
            f"| student parameters saved (hidden {params['hidden_size']}, {tie} embeddings) | "
            f"{params['parameters_saved']:,} ({params['rows_before']:,} -> "
            f"{params['rows_after']:,} rows) |"
        )
    lines += ["", "## Tensor-parallel shards", "", "| rank | kept | padding |", "|---|---|---|"]
    lines += [f"| {s['rank']} | {s['kept']} | {s['padding']} |" for s in report["shards"]]
    lines += [
        "",
        "## Most frequent dropped tokens",
        "",
        "| id | token | count | replaced by | replacement id |",
        "|---|---|---|---|---|",
    ]
    for entry in report["top_dropped"]:
        lines.append(
            f"| {entry['id']} | {_cell(entry['text'])} | {entry['count']:,} | "
            f"{_cell(entry['replacement']['text'])} | {entry['replacement']['id']} |"
        )
    return "\n".join(lines) + "\n"
