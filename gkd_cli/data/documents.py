"""Reading documents out of corpus files: plain text or JSON lines.

Two formats are understood:

- plain text (``.txt`` and anything that is not ``.jsonl``/``.json``): one document per paragraph
  (blank-line separated, ``doc_split="paragraph"``) or per line (``doc_split="line"``);
- JSON lines (``.jsonl``, ``.json``): one object per line, the document is the string under
  ``text_field`` (a dotted path such as ``passage.text`` reaches into nested objects).

Files must be UTF-8. :func:`check_corpus_files` validates existence, encoding (naming the byte
offset of the first bad byte) and non-emptiness cheaply, before any tokenization starts.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

CorpusFormat = Literal["auto", "text", "jsonl", "parquet", "arrow", "indexed"]
EXAMPLE_FORMATS = ("parquet", "arrow", "indexed")
"""Formats read only by :mod:`gkd_cli.data.build` (records or token ids, not text lines)."""
DocSplit = Literal["paragraph", "line"]

_JSONL_SUFFIXES = (".jsonl", ".json")
_CHECK_CHUNK_BYTES = 1 << 20
_SNIFF_LINES = 20
"""Non-empty lines read to tell JSON lines from plain text."""


def resolve_format(path: str | os.PathLike, fmt: CorpusFormat = "auto") -> Literal["text", "jsonl"]:
    """The concrete format of ``path``: ``fmt`` unless it is ``"auto"``, then by file suffix."""
    if fmt in EXAMPLE_FORMATS:
        raise ValueError(
            f"corpus file {path}: format {fmt} is read by gkd_cli.data.build "
            "(build_example_store), not line by line"
        )
    if fmt not in ("auto", "text", "jsonl"):
        raise ValueError(f"corpus format must be 'auto', 'text' or 'jsonl', got {fmt!r}")
    if fmt != "auto":
        return fmt
    return "jsonl" if Path(path).suffix.lower() in _JSONL_SUFFIXES else "text"


COMPRESSION_MAGIC: dict[bytes, tuple[str, str]] = {
    b"\x1f\x8b": ("gzip", "gunzip -k"),
    b"BZh": ("bzip2", "bunzip2 -k"),
    b"\xfd7zXZ\x00": ("xz", "unxz -k"),
    b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d"),
    b"\x04\x22\x4d\x18": ("lz4", "lz4 -d"),
    b"PK\x03\x04": ("zip", "unzip"),
    b"7z\xbc\xaf\x27\x1c": ("7z", "7z x"),
}
"""Leading bytes of compressed files: ``{magic: (format, command that decompresses it)}``."""

CONTROL_BYTES = bytes(b for b in range(32) if chr(b) not in "\t\n\v\f\r\x1b") + b"\x7f"
"""ASCII control characters that do not occur in text (tab, newlines and form feed do, and ESC
starts the color codes of scraped terminal logs)."""
MAX_CONTROL_FRACTION = 0.01
"""More control characters than this share of a file's first MiB: the file is binary, not text."""


def check_not_compressed(path: str | os.PathLike, head: bytes | None = None) -> None:
    """``ValueError`` when the file starts with a compression format's magic bytes."""
    if head is None:
        with open(path, "rb") as handle:
            head = handle.read(8)
    for magic, (kind, command) in COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            raise ValueError(
                f"corpus file {path} is {kind}-compressed; corpora are read as plain UTF-8 text: "
                f"decompress it first (`{command} {path}`) and list the decompressed file"
            )


def check_not_binary(path: str | os.PathLike, head: bytes) -> None:
    """``ValueError`` when more than 1% of ``head`` (the file's first bytes) are control
    characters: a binary file, which would tokenize into garbage."""
    if not head:
        return
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16's NULs would read as binary
        raise ValueError(
            f"corpus file {path} is UTF-16 (it starts with a UTF-16 byte-order mark); re-encode "
            f"it as UTF-8 (e.g. `iconv -f utf-16 -t utf-8 {path}`)"
        )
    count = len(head) - len(head.translate(None, CONTROL_BYTES))
    if count > MAX_CONTROL_FRACTION * len(head):
        first = next(i for i, b in enumerate(head) if b in CONTROL_BYTES)
        raise ValueError(
            f"corpus file {path} looks binary, not text: {count} of its first {len(head)} bytes "
            f"are control characters (the first, {head[first : first + 1]!r}, at byte offset "
            f"{first}); list text files (UTF-8 plain text or JSON lines) only"
        )


def check_utf8(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` and the byte offset if the file is not valid UTF-8,
    is compressed (naming the format and the command that decompresses it) or is binary.

    Reads the file in 1 MiB chunks with an incremental decoder, so memory stays bounded.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        first = True
        while True:
            chunk = handle.read(_CHECK_CHUNK_BYTES)
            if first:  # before decoding: a gzip file is not "latin1 to re-encode"
                check_not_compressed(path, chunk[:8])
                check_not_binary(path, chunk)
                first = False
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                bad = offset - pending + error.start
                raise ValueError(
                    f"corpus file {path} is not valid UTF-8: {error.reason} at byte offset {bad}; "
                    "re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def check_corpus_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Validate corpus files before heavy work; return them as ``Path`` objects in order.

    Errors (``ValueError``): no files given, a missing path or a directory, a file that is not
    UTF-8 (with the byte offset). Emptiness is checked by the callers that read documents.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("no corpus files given: pass at least one text or JSON-lines file")
    for file in files:
        if not file.exists():
            raise ValueError(f"corpus file {file} does not exist")
        if not file.is_file():
            raise ValueError(f"corpus path {file} is not a regular file (pass files, not folders)")
    for file in files:
        check_utf8(file)
    return files


def _lookup(record: object, dotted: str) -> object:
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _jsonl_text(path: Path, line_number: int, line: str, text_field: str, *, hint: str = "") -> str:
    """The string ``text_field`` of one JSON-lines record; ``ValueError`` naming file:line when
    the line is not JSON or the field is missing or not a string."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}:{line_number}: not valid JSON ({error.msg}); each line of a JSON-lines "
            f"corpus must be one object with a string field {text_field!r}{hint}"
        ) from None
    text = _lookup(record, text_field)
    if not isinstance(text, str):
        raise ValueError(_field_problem(path, line_number, record, text_field))
    return text


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    # utf-8-sig: a leading byte-order mark is not part of the text.
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            text = _jsonl_text(path, line_number, line, text_field)
            if text.strip():
                yield text


_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _field_problem(path: Path, line_number: int, record: object, text_field: str) -> str:
    """Why line ``line_number`` has no usable text: not an object, field missing, or not a string."""
    where = f"{path}:{line_number}"
    if not isinstance(record, dict):
        return (
            f"{where}: the line is {_JSON_TYPES.get(type(record), 'a value')}, not a JSON object; "
            f"each line of a JSON-lines corpus must be one object with a string field "
            f"{text_field!r}: fix or remove the line"
        )
    parent = _lookup(record, text_field.rpartition(".")[0]) if "." in text_field else record
    leaf = text_field.rpartition(".")[2]
    if isinstance(parent, dict) and leaf in parent:
        value = parent[leaf]
        shown = json.dumps(value)[:60]
        return (
            f"{where}: field {text_field!r} is {_JSON_TYPES.get(type(value), 'a value')} "
            f"({shown}), not a string; fix or remove the line (every document's text must be a "
            "JSON string)"
        )
    keys = ", ".join(map(repr, list(record)[:8])) or "none"
    return (
        f"{where}: no field {text_field!r} in this JSON object (its keys: {keys}); set "
        "data.text_field to the field that holds the text"
    )


def check_format(
    path: str | os.PathLike, fmt: CorpusFormat, text_field: str, *, limit_bytes: int
) -> None:
    """Read up to ``limit_bytes`` of ``path`` and raise ``ValueError`` on a format mismatch:
    ``text`` on a file whose lines are all JSON objects (set ``format: jsonl``), or, for JSON
    lines, the first line that is not JSON or lacks a string ``text_field`` (file:line).
    Lines beyond the limit are checked when the corpus is tokenized."""
    path = Path(path)
    if fmt in EXAMPLE_FORMATS:
        return  # read and checked by gkd_cli.data.build
    concrete = resolve_format(path, fmt)
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        read = 0
        objects = 0
        for line_number, line in enumerate(handle, start=1):
            read += len(line)
            if read > limit_bytes and line_number > 1:
                break
            if not line.strip():
                continue
            if concrete == "jsonl":
                _jsonl_text(
                    path, line_number, line, text_field, hint=" (plain text? set data.format: text)"
                )
                continue
            stripped = line.strip()
            if not (stripped.startswith("{") and stripped.endswith("}")):
                return  # a plain-text line: the file is text
            try:
                if not isinstance(json.loads(stripped), dict):
                    return
            except json.JSONDecodeError:
                return
            objects += 1
            if objects >= _SNIFF_LINES:
                break
    if concrete == "text" and objects:
        raise ValueError(
            f"corpus file {path} is JSON lines (its first {objects} non-empty line(s) are JSON "
            "objects), but data.format is text: the braces, keys and quotes would be trained on "
            "as text; set data.format: jsonl (and data.text_field to the field holding the text)"
        )


def _iter_text(path: Path, doc_split: DocSplit) -> Iterator[str]:
    with open(path, encoding="utf-8-sig", newline=None) as handle:
        if doc_split == "line":
            for line in handle:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
            return
        paragraph: list[str] = []
        for line in handle:
            line = line.rstrip("\n")
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)


def iter_documents(
    path: str | os.PathLike,
    *,
    fmt: CorpusFormat = "auto",
    text_field: str = "text",
    doc_split: DocSplit = "paragraph",
) -> Iterator[str]:
    """Yield the non-empty documents of one corpus file, in file order.

    ``doc_split`` applies to plain text only; ``text_field`` to JSON lines only.
    """
    if doc_split not in ("paragraph", "line"):
        raise ValueError(f"doc_split must be 'paragraph' or 'line', got {doc_split!r}")
    path = Path(path)
    if resolve_format(path, fmt) == "jsonl":
        yield from _iter_jsonl(path, text_field)
    else:
        yield from _iter_text(path, doc_split)


def ensure_documents(
    files: Sequence[Path],
    *,
    fmt: CorpusFormat = "auto",
    text_field: str = "text",
    doc_split: DocSplit = "paragraph",
) -> None:
    """``ValueError`` when none of ``files`` holds a document (reads only up to the first one)."""
    for file in files:
        resolve_format(file, fmt)
    for file in files:
        if next(iter_documents(file, fmt=fmt, text_field=text_field, doc_split=doc_split), None):
            return
    raise ValueError(
        f"the corpus is empty: no documents in {', '.join(map(str, files))} "
        f"(format {fmt}, text field {text_field!r}, documents split by {doc_split})"
    )


def iter_batches(documents: Iterable[str], batch_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Group documents into lists of about ``batch_chars`` characters (for batched encoding)."""
    batch: list[str] = []
    size = 0
    for document in documents:
        batch.append(document)
        size += len(document)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def describe_sources(files: Sequence[Path]) -> list[dict[str, Any]]:
    """Identity of each source file (resolved path, size, mtime) for cache invalidation."""
    sources = []
    for file in files:
        stat = file.stat()
        sources.append(
            {"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        )
    return sources
