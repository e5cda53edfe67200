"""``gkd compress-vocab``: GLMD vocabulary compression from the command line.

The library (:mod:`gkd_cli.vocab`) does the work; this module reads the teacher's input embedding
(:mod:`gkd_cli.vocab.teacher`), shows a Rich progress bar while token frequencies are counted and
a Rich summary afterwards (sizes, coverage, parameter savings, the most frequent dropped tokens
and their replacements). Bad input is one red line and exit code 2, and nothing is written (the
output folder appears only complete).

Mounted by ``gkd_cli.app``::

    from gkd_cli.compress import compress_vocab_command
    app.command("compress-vocab")(compress_vocab_command)
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gkd_cli.errors import GkdError

FORMATS = ("auto", "text", "jsonl")
SELECTION_HELP = (
    "balanced: the most frequent keep/tp tokens of each teacher tensor-parallel shard, so the "
    "student vocabulary is exactly the keep size; global: the most frequent tokens overall "
    "(higher coverage, but at tp > 1 the shards are padded to the fullest one, so the student "
    "vocabulary can grow well beyond the keep size). Same result at --tp 1. GLMD's own recipe is "
    "--selection global --similarity dot; the report compares both selections' coverage at the "
    "student vocabulary you get."
)


def _err_console() -> Console:
    return Console(stderr=True, highlight=False)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _err_console().print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    return typer.Exit(code)


def _expand_corpus(patterns: list[Path]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise ValueError(f"--corpus pattern {text} matches no file")
            files.extend(Path(m) for m in matches)
        else:
            files.append(pattern)
    if not files:
        raise ValueError("no corpus files given: pass --corpus FILE (text or JSON lines)")
    return files


def _read_force_keep_file(path: Path) -> list[str]:
    """One token per line (exact text; only the line break is removed, so ``" yes"`` keeps its
    space); empty lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--force-keep-file {path} is unreadable: {error}") from None
    return [line for line in text.split("\n") if line.rstrip("\r")]


def _default_workers() -> int:
    cores = os.cpu_count() or 1
    # The reading process needs a core of its own; on two cores counting in-process is fastest.
    return 0 if cores <= 2 else min(8, cores - 1)


def _progress(console: Console):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    class TokensColumn(ProgressColumn):
        def render(self, task) -> Text:
            tokens = task.fields.get("tokens", 0)
            elapsed = task.elapsed or 0.0
            rate = tokens / elapsed if elapsed > 0 else 0.0
            return Text(f"{tokens:,} tokens, {rate:,.0f} tokens/s", style="cyan")

    return Progress(
        TextColumn("counting"),
        BarColumn(bar_width=24),
        TaskProgressColumn(),
        DownloadColumn(),
        TokensColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _token_text(entry: dict[str, Any]) -> str:
    text = entry.get("text")
    return json.dumps(text if text is not None else entry.get("token"), ensure_ascii=False)


def _summary(result, *, teacher_line: str, tokenizer_line: str, show_dropped: int) -> list[Any]:
    report = result.report
    corpus = report["corpus"]
    table = Table(title="Vocabulary compression (GLMD)", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    forced = report["forced"]
    padding = report["padding_slots"]
    rows = [
        ("tokenizer", tokenizer_line),
        ("teacher", teacher_line),
        (
            "corpus",
            f"{len(corpus['files'])} file(s), {corpus['num_documents']:,} documents, "
            f"{corpus['num_tokens']:,} tokens, {corpus['num_bytes'] / 1e6:,.1f} MB",
        ),
        (
            "counting",
            f"{corpus['seconds']:.2f} s, {corpus['tokens_per_second']:,.0f} tokens/s "
            f"({corpus['num_workers']} worker processes)",
        ),
        (
            "kept tokens",
            f"{report['keep']:,} of {report['vocab_size']:,} (requested {report['keep_requested']}, "
            f"{report['selection']} selection; always kept: {forced['special']} special, "
            f"{forced['verbalizer']} verbalizer, {forced['force_keep']} --force-keep)",
        ),
        (
            "student vocabulary",
            f"{report['compressed_vocab_size']:,} ids at tp={report['tp']}"
            + (f" ({padding:,} padding slots)" if padding else " (no padding slots)"),
        ),
        (
            "coverage",
            f"{100 * report['coverage']:.2f}% of corpus tokens are kept; "
            f"{report['token_types_seen_kept']:,} of {report['token_types_seen']:,} token types seen",
        ),
        ("dropped tokens map to", report["replacement"]),
    ]
    same = report.get("equal_size")
    if same and report["tp"] > 1:
        rows.insert(
            -1,
            (
                "at this student size",
                f"balanced selection covers {100 * same['balanced_coverage']:.2f}% "
                f"({same['balanced_unseen_kept']:,} kept tokens never seen), global "
                f"{100 * same['global_coverage']:.2f}% ({same['global_unseen_kept']:,} never seen)",
            ),
        )
    params = report.get("parameters")
    if params:
        tie = "tied" if params["tied_embeddings"] else "untied"
        rows.append(
            (
                "student parameters saved",
                f"{params['parameters_saved']:,} ({params['rows_before']:,} -> "
                f"{params['rows_after']:,} vocabulary rows x hidden {params['hidden_size']}, "
                f"{tie} embeddings)",
            )
        )
    else:
        rows.append(
            (
                "student parameters saved",
                f"{report['teacher_vocab_padded'] - report['compressed_vocab_size']:,} vocabulary "
                "rows x hidden size per embedding matrix (pass --student-hidden for a number)",
            )
        )
    for name, value in rows:
        table.add_row(name, Text(str(value)))
    parts: list[Any] = [table]
    top = report["top_dropped"][:show_dropped]
    if top:
        total = max(1, corpus["num_tokens"])
        dropped = Table(title="Most frequent dropped tokens", title_justify="left")
        for column in ("id", "token", "count", "share", "replaced by", "id "):
            dropped.add_column(
                column, justify="right" if column in ("id", "count", "share") else "left"
            )
        for entry in top:
            dropped.add_row(
                str(entry["id"]),
                Text(_token_text(entry)),
                f"{entry['count']:,}",
                f"{100 * entry['count'] / total:.3f}%",
                Text(_token_text(entry["replacement"])),
                str(entry["replacement"]["id"]),
            )
        parts.append(dropped)
    return parts


def compress_vocab_command(
    tokenizer: Annotated[
        Path,
        typer.Option(
            "--tokenizer",
            help="The teacher's tokenizer: tokenizer.json, a SentencePiece .model, or a folder.",
            show_default=False,
        ),
    ],
    corpus: Annotated[
        list[Path],
        typer.Option(
            "--corpus",
            help="Corpus file (text or JSON lines; globs allowed). Repeat it, or list more files "
            "after it.",
            show_default=False,
        ),
    ],
    keep: Annotated[
        str,
        typer.Option(
            help="Tokens to keep: a ratio in (0, 1) of the vocabulary or a count; rounded up to "
            "a multiple of --multiple x --tp.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Output folder: vocab_mapping.safetensors, vocab_report.md/.json, tokenizer/.",
            show_default=False,
        ),
    ],
    more_corpus: Annotated[
        list[Path] | None,
        typer.Argument(help="More corpus files.", show_default=False, metavar="FILES"),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            help="Teacher whose input embeddings pick the replacement of each dropped token: a "
            "gkd checkpoint (step folder or run directory) or a Hugging Face model folder.",
            show_default=False,
        ),
    ] = None,
    tp: Annotated[
        int,
        typer.Option(
            help="Tensor-parallel size of the distillation run (kept tokens are grouped per "
            "teacher shard; a mapping made for tp also trains at tp=1)."
        ),
    ] = 1,
    multiple: Annotated[
        int, typer.Option(help="Round the keep size (per shard) to a multiple of this.")
    ] = 128,
    similarity: Annotated[
        str,
        typer.Option(
            help="Embedding similarity that picks each dropped token's replacement: dot (GLMD's), "
            "cosine or euclidean."
        ),
    ] = "dot",
    selection: Annotated[str, typer.Option(help=SELECTION_HELP)] = "balanced",
    map_to_unk: Annotated[
        bool,
        typer.Option(
            "--map-to-unk",
            help="Map dropped tokens to the unk token (no teacher embedding needed).",
        ),
    ] = False,
    force_keep: Annotated[
        list[str] | None,
        typer.Option(
            "--force-keep",
            help="A token to keep whatever its frequency (exact vocabulary token, else every "
            "token of its encoding); repeat for more.",
            show_default=False,
        ),
    ] = None,
    force_keep_file: Annotated[
        Path | None,
        typer.Option(help="File with one token to keep per line.", show_default=False),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Counting processes (0: in this process). Default: 0 on 1-2 cores, else cores-1 "
            "(at most 8).",
            show_default=False,
        ),
    ] = None,
    format: Annotated[  # noqa: A002 (the option is --format)
        str, typer.Option("--format", help="Corpus format: auto (by suffix), text or jsonl.")
    ] = "auto",
    text_field: Annotated[
        str, typer.Option(help="JSON key (dotted path) of the text in JSON-lines files.")
    ] = "text",
    student_hidden: Annotated[
        int | None,
        typer.Option(
            help="Student hidden size, to report the parameters saved.", show_default=False
        ),
    ] = None,
    student_untied: Annotated[
        bool,
        typer.Option(
            "--student-untied",
            help="The student's output layer is not tied to its embedding (doubles the savings).",
        ),
    ] = False,
    show_dropped: Annotated[
        int, typer.Option(help="Dropped tokens listed in the summary (the report has 30).")
    ] = 10,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")
    ] = False,
) -> None:
    """Compress the vocabulary for a student (GLMD): keep the most frequent tokens of a corpus,
    map the others to their most similar kept token under the teacher's input embeddings, and
    write the mapping, a report and the compressed tokenizer."""
    try:
        _run(
            tokenizer_path=tokenizer,
            corpus=[*corpus, *(more_corpus or [])],
            keep=keep,
            out=out,
            teacher=teacher,
            tp=tp,
            multiple=multiple,
            similarity=similarity,
            selection=selection,
            map_to_unk=map_to_unk,
            force_keep=list(force_keep or []),
            force_keep_file=force_keep_file,
            workers=_default_workers() if workers is None else workers,
            fmt=format,
            text_field=text_field,
            student_hidden=student_hidden,
            student_tied=not student_untied,
            show_dropped=show_dropped,
            overwrite=overwrite,
        )
    except ValueError as error:  # bad input (ConfigError is one too)
        raise _fail(str(error)) from None
    except GkdError as error:
        raise _fail(str(error), error.exit_code) from None


def _run(
    *,
    tokenizer_path: Path,
    corpus: list[Path],
    keep: str,
    out: Path,
    teacher: Path | None,
    tp: int,
    multiple: int,
    similarity: str,
    selection: str,
    map_to_unk: bool,
    force_keep: list[str],
    force_keep_file: Path | None,
    workers: int,
    fmt: str,
    text_field: str,
    student_hidden: int | None,
    student_tied: bool,
    show_dropped: int,
    overwrite: bool,
) -> None:
    from gkd_cli.data import load_tokenizer
    from gkd_cli.superglue import verbalizer_tokens
    from gkd_cli.vocab import compress_vocab, keep_size
    from gkd_cli.vocab.compressed import VOCAB_PAD_MULTIPLE

    console = Console(highlight=False)
    # ---- cheap checks first: nothing heavy happens before the input is known to be usable ----
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if multiple < 1 or multiple % VOCAB_PAD_MULTIPLE:
        raise ValueError(
            f"--multiple {multiple} must be a positive multiple of {VOCAB_PAD_MULTIPLE}: "
            f"megatron-core pads the student's vocabulary to {VOCAB_PAD_MULTIPLE} x tp, and each "
            "tensor-parallel shard of the mapping must line up with the student's"
        )
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if student_hidden is not None and student_hidden < 1:
        raise ValueError(f"--student-hidden must be >= 1, got {student_hidden}")
    if show_dropped < 0:
        raise ValueError(f"--show-dropped must be >= 0, got {show_dropped}")
    if teacher is None and not map_to_unk:
        raise ValueError(
            "--teacher is required: its input embeddings choose the replacement of each dropped "
            "token (or pass --map-to-unk to map dropped tokens to the unk token)"
        )
    files = _expand_corpus(corpus)
    if force_keep_file is not None:
        force_keep = [*force_keep, *_read_force_keep_file(force_keep_file)]
    tok = load_tokenizer(tokenizer_path)
    if tok.is_compressed:
        raise ValueError(
            f"tokenizer {tokenizer_path} is already compressed; pass the original (teacher's) one"
        )
    keep_size(keep, tok.base_vocab_size, tp=tp, multiple=multiple)  # keep >= vocabulary fails here

    # ---- the teacher: its embedding (or, with --map-to-unk, just its vocabulary size) ----------
    embedding = None
    if teacher is not None:
        from gkd_cli.vocab.teacher import load_teacher_embedding, teacher_vocab_size

        if map_to_unk:
            teacher_vocab = teacher_vocab_size(teacher)
            teacher_line = f"{teacher} ({teacher_vocab:,} ids; not read: --map-to-unk)"
        else:
            with console.status("reading the teacher's input embedding"):
                loaded = load_teacher_embedding(teacher)
            embedding, teacher_vocab = loaded.weight, loaded.vocab_size
            teacher_line = (
                f"{loaded.path} ({loaded.source}; embedding {list(embedding.shape)}, "
                f"{teacher_vocab:,} real ids)"
            )
        _check_teacher_vocab(tok, teacher_vocab, teacher)
    else:
        teacher_vocab = tok.vocab_size
        teacher_line = "none (dropped tokens map to unk)"
    step = VOCAB_PAD_MULTIPLE * tp
    teacher_padded = -(-teacher_vocab // step) * step

    # ---- count, select, map, write -------------------------------------------------------------
    with _progress(console) as progress:
        task = progress.add_task("count", total=None, tokens=0)

        def report(done: int, total: int, tokens: int) -> None:
            progress.update(task, completed=done, total=total, tokens=tokens)

        started = time.perf_counter()
        result = compress_vocab(
            tok,
            files,
            keep,
            embedding,
            out,
            tp=tp,
            multiple=multiple,
            similarity=similarity,
            map_to_unk=map_to_unk,
            force_keep=force_keep,
            verbalizers=verbalizer_tokens(),
            num_workers=workers,
            progress=report,
            teacher_vocab_padded=teacher_padded,
            fmt=fmt,  # type: ignore[arg-type]
            text_field=text_field,
            student_hidden_size=student_hidden,
            tied_embeddings=student_tied,
            overwrite=overwrite,
            selection=selection,
        )
        seconds = time.perf_counter() - started
    tokenizer_line = f"{tok.source} ({tok.vocab_size:,} ids, {tok.kind})"
    for part in _summary(
        result, teacher_line=teacher_line, tokenizer_line=tokenizer_line, show_dropped=show_dropped
    ):
        console.print(part)
    console.print(
        Text(
            f"wrote {result.out_dir} in {seconds:.1f} s: {result.mapping_path.name}, "
            f"{result.report_markdown_path.name}, {result.report_json_path.name}, "
            f"{result.tokenizer_dir.name}/"
        )
    )
    console.print(
        Text(
            "train the student with: data.vocab_mapping="
            f"{result.mapping_path} student.vocab_size={result.compressed_vocab_size}",
            style="green",
        ),
        soft_wrap=True,
    )


def _check_teacher_vocab(tokenizer, teacher_vocab: int, teacher: Path) -> None:
    """The tokenizer must be the teacher's: its ids fit the teacher's vocabulary, which may only
    be a little larger (Hugging Face models round their embedding up by a few hundred rows)."""
    vocab = tokenizer.vocab_size
    if vocab > teacher_vocab or teacher_vocab - vocab > 1024:
        raise ValueError(
            f"tokenizer {tokenizer.source} has {vocab:,} ids but teacher {teacher} has a "
            f"vocabulary of {teacher_vocab:,}: the tokenizer is not the teacher's; pass the "
            "tokenizer the teacher was trained with"
        )
