"""Checks ``gkd distill`` runs before it writes anything or launches workers.

Config validation (``gkd_cli.config.validate``) checks the config's own values and that paths
exist; these checks open the files: corpora (empty, not UTF-8, shorter than one sequence),
checkpoints named as teacher/student (a gkd checkpoint's manifest lists every file with its size:
a missing or truncated shard is named here, not as an obscure error in every rank minutes later;
its ``meta.json`` architecture must match the config), and a run directory being resumed (its
newest complete checkpoint's files are all present at their recorded sizes; the workers verify
sha256 checksums when they load it).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from gkd_cli.config import DistillConfig
from gkd_cli.errors import ConfigError

SMALL_CORPUS_BYTES = 8 << 20
"""Corpora up to this size are tokenized here to count their tokens; larger ones cannot be shorter
than one sequence of any supported length."""
SCAN_BYTES = 64 << 20
"""JSON lines are parsed here (every line's JSON and its text field) up to 64 MiB of the corpus in
all, file by file, and at least the first 64 KiB of every file; later lines are checked by the
workers as they tokenize the corpus, before the first training step (a bad line fails the run with
its file and line number). Compression, binary content and the text-vs-JSON-lines format are told
from each file's first MiB; UTF-8 is checked in full."""
MIN_SCAN_BYTES = 64 << 10


def _files(patterns: list[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found.extend(
            Path(p) for p in (sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
        )
    return found


def _records_are_examples(cfg: DistillConfig, files: list[Path]) -> bool:
    """Whether the first record of a JSON-lines file (``data.kind: auto``) is a prompt/completion
    or chat example, which the example builder checks (text records get the line scan below)."""
    import json

    from gkd_cli.data.formats import DataSource, decide_kind

    for file in files:
        try:
            with file.open(encoding="utf-8") as fh:
                line = next((ln for ln in fh if ln.strip()), None)
            record = json.loads(line) if line is not None else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False  # the line scan reports it with its file and line
        source = DataSource(
            path=str(file),
            format="jsonl",
            kind="auto",
            text_field=cfg.data.text_field,
            prompt_field=cfg.data.prompt_field,
            completion_field=cfg.data.completion_field,
            messages_field=cfg.data.messages_field,
        )
        try:
            if decide_kind(source, record, str(file)) != "text":
                return True
        except ValueError:
            return False
    return False


def _check_example_lengths(cfg: DistillConfig, patterns: list[str], field: str) -> None:
    """``data.mode: padded | packed`` with ``data.overlong: refuse``: an example longer than
    ``data.seq_length`` is refused here, naming its file and line, when the data is small enough
    to tokenize at launch (larger data: by the build, before the first step)."""
    if cfg.data.mode == "stream" or cfg.data.overlong != "refuse":
        return
    from gkd_cli.data import load_tokenizer
    from gkd_cli.data.build import check_lengths
    from gkd_cli.data.formats import config_sources

    try:
        sources = config_sources(cfg.data, patterns, lambda p: [str(f) for f in _files([p])])
        check_lengths(
            sources,
            load_tokenizer(cfg.data.tokenizer),
            cfg.data.seq_length,
            max_bytes=SMALL_CORPUS_BYTES,
        )
    except ValueError as err:
        raise ConfigError(f"{field}: {err}", field=field) from None


def check_corpus(cfg: DistillConfig, patterns: list[str], field: str) -> None:
    """Each file exists, is non-empty UTF-8; together they hold more than ``seq_length`` tokens."""
    from gkd_cli.data.documents import check_corpus_files, check_format, ensure_documents

    files = _files(patterns)
    if not files:
        return
    from gkd_cli.data.documents import EXAMPLE_FORMATS

    if (
        cfg.data.format in EXAMPLE_FORMATS
        or cfg.data.kind not in ("auto", "text")
        or (cfg.data.format == "jsonl" and _records_are_examples(cfg, files))
    ):
        from gkd_cli.data import load_tokenizer
        from gkd_cli.data.build import check_sources
        from gkd_cli.data.formats import config_sources

        try:  # the example builder's own checks (files, records, chat template, vocabulary)
            sources = config_sources(cfg.data, patterns, lambda p: [str(f) for f in _files([p])])
            check_sources(sources, load_tokenizer(cfg.data.tokenizer))
        except ValueError as err:
            raise ConfigError(f"{field}: {err}", field=field) from None
        _check_example_lengths(cfg, patterns, field)
        return
    try:
        for file in files:
            if file.is_file() and file.stat().st_size == 0:
                raise ValueError(f"corpus file {file} is empty; remove it from {field} or fill it")
        check_corpus_files(files)
        budget = SCAN_BYTES
        for file in files:
            limit = max(budget, MIN_SCAN_BYTES)
            check_format(file, cfg.data.format, cfg.data.text_field, limit_bytes=limit)
            budget -= min(limit, file.stat().st_size)
        ensure_documents(files, fmt=cfg.data.format, text_field=cfg.data.text_field)
    except ValueError as err:
        raise ConfigError(f"{field}: {err}", field=field) from None
    _check_example_lengths(cfg, patterns, field)
    if cfg.data.mode != "stream":
        return  # rows are padded: any number of examples fills them
    total = sum(f.stat().st_size for f in files)
    need = cfg.data.seq_length + 1
    if total > SMALL_CORPUS_BYTES:
        return
    from gkd_cli.data import load_tokenizer
    from gkd_cli.data.documents import iter_documents

    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (ValueError, OSError) as err:
        raise ConfigError(f"data.tokenizer: {err}", field="data.tokenizer") from None
    tokens = 0
    try:
        for file in files:
            for doc in iter_documents(file, fmt=cfg.data.format, text_field=cfg.data.text_field):
                tokens += len(tokenizer.encode(doc)) + 1  # + the end-of-document token
    except ValueError as err:  # a bad line (file:line) that the scan above did not reach
        raise ConfigError(f"{field}: {err}", field=field) from None
    if tokens < need:
        raise ConfigError(
            f"{field}: the corpus ({', '.join(map(str, files))}) holds about {tokens} tokens, fewer than one sequence of "
            f"data.seq_length+1={need}; add text or lower data.seq_length",
            field=field,
        )


def check_checkpoint(cfg: DistillConfig, role: str, model) -> None:
    """A gkd checkpoint given as ``<role>.checkpoint``: complete, undamaged sizes, same architecture."""
    from parallel import checkpoint as ckpt

    path = Path(model.checkpoint)
    if (path / "config.json").is_file() and not (path / "meta.json").is_file():
        return  # a Hugging Face folder: parallel.hf checks its shards and architecture when loading
    try:
        folder = ckpt.resolve(path)
        ckpt.verify_manifest(folder, checksums=False)
    except ckpt.CheckpointError as err:
        raise ConfigError(f"{role}.checkpoint: {err}", field=f"{role}.checkpoint") from None
    saved = ckpt.read_meta(folder).get("arch")
    if not saved:
        return
    arch = vars(model.arch())
    ignored = {"max_seq_len"} if arch.get("position_embedding") == "rope" else set()
    if getattr(model, "init_layers", None) is not None:
        ignored.add("num_layers")
        try:
            ckpt.resolve_layer_map(
                model.init_layers,
                student_layers=model.num_layers,
                saved_layers=int(saved.get("num_layers", 0)),
            )
        except ValueError as err:
            raise ConfigError(
                f"{role}.init_layers: {err} (checkpoint {folder})", field=f"{role}.init_layers"
            ) from None
    diff = {
        k: (saved[k], v)
        for k, v in arch.items()
        if k in saved and saved[k] != v and k not in ignored
    }
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"{role}.checkpoint {folder} has another architecture ({details}); set {role}.* to the "
            "checkpoint's values (see its meta.json) or point at the right checkpoint",
            field=f"{role}.checkpoint",
        )


def check_resume(cfg: DistillConfig) -> None:
    """The newest complete checkpoint of the run in ``output.dir`` has all its files at their sizes."""
    from parallel import checkpoint as ckpt

    root = Path(cfg.output.dir) / "checkpoints"
    latest = ckpt.latest_complete(root)
    if latest is None:
        return
    try:
        ckpt.verify_manifest(latest, checksums=False)
    except ckpt.CheckpointError as err:
        raise ConfigError(
            f"output.dir: cannot resume: {err} (move {latest} aside to resume from the one before)",
            field="output.dir",
        ) from None


def check_choice_data(cfg: DistillConfig) -> None:
    """Choice data (``data.source: superglue`` with ``data.choices``, or JSON-lines files of choice
    records): a record whose options do not fit ``data.seq_length`` together is refused here,
    naming it (data up to :data:`SMALL_CORPUS_BYTES`; larger files when the workers build them,
    before the first step); a method that needs choice records (``glmd_soft``) is refused when the
    training data hold none."""
    from gkd_cli.data import choices as choice_data
    from methods.registry import REGISTRY

    d = cfg.data
    records: Iterable[tuple[str, str, list[str]]] | None = None
    kinds: list[bool] = []
    where = "data.train_files"
    if d.source == "superglue":
        if d.choices:
            from gkd_cli.superglue import iter_task_records

            assert d.superglue_dir is not None  # validation requires it
            files = [
                Path(d.superglue_dir) / task / f"{d.superglue_split}.jsonl"
                for task in d.superglue_tasks
            ]
            size = sum(f.stat().st_size for f in files if f.is_file())
            records = (
                None
                if size > SMALL_CORPUS_BYTES
                else (
                    (
                        f"{r.task}/{d.superglue_split} example {r.example_id}",
                        r.prompt,
                        list(r.options),
                    )
                    for r in iter_task_records(
                        d.superglue_dir, d.superglue_tasks, d.superglue_split
                    )
                )
            )
            where = "data.superglue_tasks"
    else:
        from gkd_cli.data.formats import config_sources

        sources = config_sources(d, d.train_files, lambda p: [str(f) for f in _files([p])])
        try:
            kinds = choice_data.choice_source_kinds(sources)
        except ValueError as err:
            raise ConfigError(f"data.train_files: {err}", field="data.train_files") from None
        if kinds and all(kinds):
            size = sum(os.path.getsize(s.path) for s in sources)
            if size <= SMALL_CORPUS_BYTES:
                records = choice_data.iter_file_records(sources)
    needing = [
        (i, e.name)
        for i, e in enumerate(cfg.methods)
        if getattr(getattr(REGISTRY.get(e.name), "cls", None), "requires_choices", False)
    ]
    is_choice = (d.source == "superglue" and d.choices) or (
        d.source == "corpus" and bool(kinds) and all(kinds)
    )
    if needing and not is_choice:
        i, name = needing[0]
        raise ConfigError(
            f"methods.{i} ({name}) distills the teacher's scores of each task example's options "
            "and needs choice data, but the training data hold none; use data.source: superglue "
            'with data.choices: true, or JSON-lines choice records {"prompt", "options", '
            '"label"} in data.train_files (README "GLMD recipe")',
            field=f"methods.{i}",
        )
    if records is None or d.overlong != "refuse":  # truncate: the workers leave such records out
        return
    from gkd_cli.data import load_tokenizer

    try:
        choice_data.check_record_lengths(records, load_tokenizer(d.tokenizer), d.seq_length)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}", field=where) from None


def run_preflight(cfg: DistillConfig) -> None:
    """All of the above; raises :class:`ConfigError` on the first problem, writing nothing."""
    if cfg.data.source == "corpus":
        check_corpus(cfg, cfg.data.train_files, "data.train_files")
    check_corpus(cfg, cfg.data.valid_files, "data.valid_files")
    check_choice_data(cfg)
    for role, model in cfg.model_roles():
        if (
            model.checkpoint
            and os.path.isdir(model.checkpoint)
            and getattr(model, "init", None) != "random"
        ):
            check_checkpoint(cfg, role, model)
    if Path(cfg.output.dir).is_dir():
        check_resume(cfg)
    if any(t.cache is not None for t in cfg.teachers):
        from gkd_cli import cache_teacher
        from gkd_cli.build import build_methods

        cache_teacher.preflight(cfg, build_methods(cfg))  # key, checksums, methods vs the cache
