"""Data sources: which files, in which format, holding which kind of examples.

A :class:`DataSource` names one file and how to read it. File formats (``format``):

``text``
    UTF-8 plain text; one document per blank-line separated paragraph (``doc_split="paragraph"``)
    or per line (``doc_split="line"``). Only ``kind="text"``.
``jsonl``
    JSON lines (``.jsonl``, ``.json``): one object per line.
``parquet`` / ``arrow``
    Apache Parquet (``.parquet``) or Arrow IPC files (``.arrow``, ``.feather``; file or stream
    format, as Hugging Face ``datasets`` writes them), read with pyarrow in record batches; each row
    is one record with the same field semantics as a JSON line. Needs ``pip install 'gkd[data]'``.
``indexed``
    A megatron indexed dataset (``prefix.bin`` + ``prefix.idx``, as Megatron-LM's
    ``tools/preprocess_data.py`` writes), read with megatron-core's ``IndexedDataset``; each
    document is one example, already tokenized, every token a target.

``auto`` picks the format from the suffix (``.jsonl``/``.json``, ``.parquet``, ``.arrow``/
``.feather``, ``.bin``/``.idx``; anything else is text).

Kinds of example (``kind``), for the record formats (jsonl, parquet, arrow):

``text``
    the string under ``text_field`` (dotted paths reach into nested objects); every token is a
    target; blank documents are skipped (as in the packed token stream).
``prompt_completion``
    strings ``prompt_field`` and ``completion_field``; only the completion (and the end-of-document
    token after it) is a target.
``chat``
    a list of ``{"role", "content"}`` messages under ``messages_field``, rendered with the
    tokenizer's chat template; only assistant turns are targets.

``choice``
    ``{"prompt": str, "options": [str, ...], "label": int | null}`` (``prompt_field``, the fixed
    ``options`` and ``label`` fields): one task example, each option becoming one example of a
    group (:mod:`gkd_cli.data.choices`, :mod:`methods.choices`).

``auto`` decides per file from its first record: ``messages_field`` present means chat,
``options`` (with ``prompt_field``) a choice record, else
``prompt_field`` and ``completion_field`` mean prompt/completion, else text (as TRL's SFT trainer
recognises its dataset types).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from gkd_cli.data.documents import _JSON_TYPES, DocSplit, _lookup

_TYPES: dict[type, str] = {**_JSON_TYPES, str: "a string"}

SourceFormat = Literal["auto", "text", "jsonl", "parquet", "arrow", "indexed"]
ExampleKind = Literal["auto", "text", "prompt_completion", "chat", "choice"]
OverlongPolicy = Literal["truncate", "refuse"]

CHAT_ROLES = ("system", "user", "assistant", "tool")
"""Roles a chat message may have (``tool`` for tool results; ``developer`` is accepted as
OpenAI's newer name for ``system``)."""
_EXTRA_ROLES = ("developer", "ipython", "function")

_SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".bin": "indexed",
    ".idx": "indexed",
}


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """One input file and how to read it (see the module docstring)."""

    path: str
    """The file (for ``indexed``: ``prefix``, ``prefix.bin`` or ``prefix.idx``)."""
    format: SourceFormat = "auto"
    kind: ExampleKind = "auto"
    weight: float | None = None
    """Share of the mixture (see :func:`gkd_cli.data.build.mixture_order`); ``None`` everywhere:
    every example once per epoch."""
    group: str | None = None
    """Sources with the same group (the files one glob matched) share their ``weight`` in
    proportion to their numbers of examples; ``None``: the source is its own group."""
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    doc_split: DocSplit = "paragraph"

    def identity(self) -> dict[str, Any]:
        """What decides the tokens (not the weight): for the cache key."""
        return {
            "format": self.format,
            "kind": self.kind,
            "text_field": self.text_field,
            "prompt_field": self.prompt_field,
            "completion_field": self.completion_field,
            "messages_field": self.messages_field,
            "doc_split": self.doc_split,
        }


def resolve_format(source: DataSource) -> str:
    """The concrete file format of ``source``."""
    if source.format not in get_args(SourceFormat):
        raise ValueError(
            f"data source {source.path}: format must be one of "
            f"{', '.join(get_args(SourceFormat))}, got {source.format!r}"
        )
    if source.format != "auto":
        return source.format
    suffix = Path(source.path).suffix.lower()
    if suffix not in _SUFFIXES and all(
        Path(source.path + ext).is_file() for ext in (".bin", ".idx")
    ):
        return "indexed"  # a megatron path prefix, as Megatron-LM's --data-path names it
    return _SUFFIXES.get(suffix, "text")


def indexed_prefix(path: str | os.PathLike) -> str:
    """The megatron path prefix of ``prefix``, ``prefix.bin`` or ``prefix.idx``."""
    p = str(path)
    return p[:-4] if p.endswith((".bin", ".idx")) else p


def source_files(source: DataSource) -> list[Path]:
    """The files ``source`` reads (two for an indexed dataset); ``ValueError`` when one is
    missing."""
    fmt = resolve_format(source)
    if fmt == "indexed":
        prefix = indexed_prefix(source.path)
        files = [Path(prefix + ".bin"), Path(prefix + ".idx")]
    else:
        files = [Path(source.path)]
    for file in files:
        if not file.exists():
            raise ValueError(f"data file {file} does not exist")
        if not file.is_file():
            raise ValueError(f"data path {file} is not a regular file (pass files, not folders)")
    return files


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One example's raw content and where it came from (``file:line`` or ``file row N``)."""

    where: str
    payload: Any
    """``str`` (text), ``(prompt, completion)`` or a list of message dicts (chat)."""
    size: int
    """Approximate bytes read for it (for progress)."""


def iter_text_documents(path: Path, doc_split: DocSplit) -> Iterator[Record]:
    """Plain-text documents with the line they start on; the same documents, in the same order,
    as :func:`gkd_cli.data.documents.iter_documents`."""
    with open(path, encoding="utf-8-sig", newline=None) as handle:
        if doc_split == "line":
            for number, line in enumerate(handle, start=1):
                text = line.rstrip("\n")
                if text.strip():
                    yield Record(f"{path}:{number}", text, len(line))
            return
        paragraph: list[str] = []
        start = size = 0
        for number, line in enumerate(handle, start=1):
            size += len(line)
            text = line.rstrip("\n")
            if text.strip():
                if not paragraph:
                    start = number
                paragraph.append(text)
            elif paragraph:
                yield Record(f"{path}:{start}", "\n".join(paragraph), size)
                paragraph, size = [], 0
        if paragraph:
            yield Record(f"{path}:{start}", "\n".join(paragraph), size)


def iter_jsonl_records(path: Path) -> Iterator[tuple[str, Any, int]]:
    """``(where, parsed object, bytes)`` per non-blank line; ``ValueError`` naming file:line on
    a line that is not JSON."""
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({error.msg}); each line of a JSON-lines "
                    "file must be one JSON object"
                ) from None
            yield f"{path}:{number}", record, len(line)


def _pyarrow():
    try:
        import pyarrow
    except ImportError:
        raise ValueError(
            "reading Parquet or Arrow files needs pyarrow: pip install 'gkd[data]'"
        ) from None
    return pyarrow


def _arrow_batches(path: Path, fmt: str, columns: list[str] | None):
    pa = _pyarrow()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises ArrowInvalid and friends
            raise ValueError(f"{path} is not a readable Parquet file: {error}") from None
        names = parquet.schema_arrow.names
        yield names
        wanted = [c for c in columns if c in names] if columns is not None else None
        yield from parquet.iter_batches(batch_size=1024, columns=wanted)
        return
    import pyarrow.ipc as ipc

    source = pa.memory_map(str(path), "r")
    try:
        reader: Any = ipc.open_file(source)
        names = reader.schema.names
        yield names
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    except pa.ArrowInvalid:
        pass
    try:
        stream = ipc.open_stream(pa.memory_map(str(path), "r"))
    except pa.ArrowInvalid as error:
        raise ValueError(
            f"{path} is neither an Arrow IPC file nor an Arrow stream: {error}"
        ) from None
    yield stream.schema.names
    yield from stream


def iter_table_records(path: Path, fmt: str, columns: list[str] | None = None):
    """``(where, row dict, bytes)`` per row of a Parquet or Arrow file, ``where`` = ``file row N``
    (0-based, as pandas and ``datasets`` count). The first item yielded is the column list."""
    batches = _arrow_batches(path, fmt, columns)
    names = next(batches)
    yield names
    row = 0
    size = max(1, path.stat().st_size)
    for batch in batches:
        rows = batch.to_pylist()
        approx = max(1, batch.nbytes // max(1, len(rows)))
        for record in rows:
            yield f"{path} row {row}", record, min(approx, size)
            row += 1


# -- kinds and fields ---------------------------------------------------------------------------


def decide_kind(source: DataSource, record: Any, where: str) -> str:
    """The example kind of ``source`` given its first record (``auto``), or the one asked for."""
    if source.kind not in get_args(ExampleKind):
        raise ValueError(
            f"data source {source.path}: kind must be one of {', '.join(get_args(ExampleKind))}, "
            f"got {source.kind!r}"
        )
    if source.kind != "auto":
        return source.kind
    if isinstance(record, dict):
        if _lookup(record, source.messages_field) is not None:
            return "chat"
        if (
            _lookup(record, "options") is not None
            and _lookup(record, source.prompt_field) is not None
        ):
            return "choice"
        if (
            _lookup(record, source.prompt_field) is not None
            and _lookup(record, source.completion_field) is not None
        ):
            return "prompt_completion"
        if _lookup(record, source.text_field) is not None:
            return "text"
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise ValueError(
            f"{where}: cannot tell the kind of example: the record has none of the fields "
            f"{source.messages_field!r} (chat), {source.prompt_field!r}+"
            f"{source.completion_field!r} (prompt/completion) or {source.text_field!r} (text) "
            f"(its keys: {keys}); set the source's kind and field names"
        )
    return "text"


def _string_field(record: Any, field: str, where: str, what: str) -> str:
    value = _lookup(record, field)
    if isinstance(value, str):
        return value
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: the record is {_TYPES.get(type(record), 'a value')}, not an object "
            f"with a string field {field!r}: fix or remove it"
        )
    if not _has(record, field):
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise ValueError(
            f"{where}: no field {field!r} ({what}) in this record (its keys: {keys}); fix the "
            f"record or set the source's {what}_field"
        )
    raise ValueError(
        f"{where}: field {field!r} ({what}) is {_TYPES.get(type(value), 'a value')} "
        f"({json.dumps(value, default=str)[:60]}), not a string; fix or remove the record"
    )


def _has(record: dict, dotted: str) -> bool:
    parent: Any = record
    *heads, leaf = dotted.split(".")
    for key in heads:
        if not isinstance(parent, dict) or key not in parent:
            return False
        parent = parent[key]
    return isinstance(parent, dict) and leaf in parent


def text_payload(record: Any, source: DataSource, where: str) -> str | None:
    """The document text of a record, ``None`` when blank (skipped, as in token streams)."""
    text = _string_field(record, source.text_field, where, "text")
    return text if text.strip() else None


def prompt_completion_payload(record: Any, source: DataSource, where: str) -> tuple[str, str]:
    prompt = _string_field(record, source.prompt_field, where, "prompt")
    completion = _string_field(record, source.completion_field, where, "completion")
    if not completion.strip():
        raise ValueError(
            f"{where}: the completion is empty: an example without a completion has nothing to "
            "train on; remove the record"
        )
    return prompt, completion


def choice_payload(
    record: Any, source: DataSource, where: str
) -> tuple[str, list[str], int | None]:
    """``(prompt, options, label or None)`` of a choice record, validated: at least two non-empty
    string options, a label that is ``null`` or an integer index into them."""
    prompt = _string_field(record, source.prompt_field, where, "prompt")
    options = record.get("options") if isinstance(record, dict) else None
    if not isinstance(options, list) or len(options) < 2:
        raise ValueError(
            f"{where}: field 'options' is {_TYPES.get(type(options), 'a value')} "
            f"({json.dumps(options, default=str)[:60]}), not a list of at least two option "
            "strings; fix or remove the record"
        )
    for k, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            raise ValueError(
                f"{where}: option {k} is {json.dumps(option, default=str)[:60]}, not a "
                "non-empty string; fix or remove the record"
            )
    label = record.get("label")
    if label is not None and (
        isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(options)
    ):
        raise ValueError(
            f"{where}: label {json.dumps(label, default=str)[:60]} is not null or an option "
            f"index 0..{len(options) - 1}; fix the record"
        )
    return prompt, list(options), label


def chat_payload(record: Any, source: DataSource, where: str) -> list[dict[str, Any]]:
    """The validated message list of a chat record."""
    field = source.messages_field
    if not isinstance(record, dict) or not _has(record, field):
        keys = ", ".join(map(repr, list(record)[:8])) if isinstance(record, dict) else "none"
        raise ValueError(
            f"{where}: no field {field!r} (the chat messages) in this record (its keys: {keys}); "
            "fix the record or set the source's messages_field"
        )
    messages = _lookup(record, field)
    if not isinstance(messages, list):
        raise ValueError(
            f"{where}: field {field!r} is {_TYPES.get(type(messages), 'a value')}, not a "
            'list of {"role": ..., "content": ...} messages'
        )
    if not messages:
        raise ValueError(f"{where}: the message list {field!r} is empty; remove the record")
    known = CHAT_ROLES + _EXTRA_ROLES
    has_assistant = False
    for n, message in enumerate(messages):
        at = f"{where}: message {n}"
        if not isinstance(message, dict):
            raise ValueError(
                f"{at} is {_TYPES.get(type(message), 'a value')}, not an object with "
                "'role' and 'content'"
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in known:
            raise ValueError(
                f"{at} has role {json.dumps(role, default=str)}; roles are {', '.join(known)}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            if role == "assistant" and content is None and message.get("tool_calls"):
                continue
            raise ValueError(
                f"{at} ({role}) has content {_TYPES.get(type(content), 'a value')} "
                f"({json.dumps(content, default=str)[:60]}), not a string; multimodal or "
                "structured content is not supported: flatten it to text"
            )
        if role == "assistant" and content.strip():
            has_assistant = True
    if not has_assistant:
        raise ValueError(
            f"{where}: no assistant message with content: nothing to train on (only assistant "
            "turns are targets); remove the record"
        )
    return messages


# -- config --------------------------------------------------------------------------------------


def check_data_fields(data: Any) -> None:
    """``ValueError`` naming the ``data.*`` field when the format options of a ``DataConfig``
    are inconsistent (called from :func:`gkd_cli.config.validate`)."""
    weights = list(getattr(data, "train_weights", []) or [])
    files = list(getattr(data, "train_files", []) or [])
    if weights and len(weights) != len(files):
        raise ValueError(
            f"data.train_weights has {len(weights)} entries for {len(files)} data.train_files "
            "entries; give one weight per entry (or none: every example once per epoch)"
        )
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0:
            raise ValueError(f"data.train_weights.{i}: {w!r} must be a number >= 0")
    if weights and not sum(weights) > 0:
        raise ValueError("data.train_weights sum to 0; give at least one a positive weight")
    workers = getattr(data, "workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"data.workers: {workers!r} must be an integer >= 0 (0: automatic)")
    for name in ("text_field", "prompt_field", "completion_field", "messages_field"):
        value = getattr(data, name, "x")
        if not isinstance(value, str) or not value or value.startswith(".") or ".." in value:
            raise ValueError(f"data.{name}: {value!r} must be a field name (dotted paths allowed)")
    fields = [getattr(data, n, None) for n in ("prompt_field", "completion_field")]
    if fields[0] == fields[1]:
        raise ValueError(
            f"data.prompt_field and data.completion_field are both {fields[0]!r}; they must differ"
        )


def default_workers() -> int:
    """Tokenizing processes for ``data.workers: 0``: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def config_sources(data: Any, patterns: list[str], expand: Any) -> list[DataSource]:
    """The :class:`DataSource` list of ``patterns`` (``data.train_files`` or ``valid_files``) under
    a ``DataConfig``'s format fields; ``expand(pattern)`` lists a pattern's files in order.
    ``data.train_weights`` (when given, and ``patterns`` are the train files) become the
    weights, each pattern's files one group."""
    weights = list(getattr(data, "train_weights", []) or [])
    use_weights = bool(weights) and patterns == list(data.train_files)
    sources = []
    for i, pattern in enumerate(patterns):
        for path in expand(pattern):
            sources.append(
                DataSource(
                    path=path,
                    format=data.format,
                    kind=getattr(data, "kind", "auto"),
                    weight=float(weights[i]) if use_weights else None,
                    group=f"train_files.{i}" if use_weights else None,
                    text_field=data.text_field,
                    prompt_field=getattr(data, "prompt_field", "prompt"),
                    completion_field=getattr(data, "completion_field", "completion"),
                    messages_field=getattr(data, "messages_field", "messages"),
                )
            )
    return sources
