"""Choice records as training rows: one example per option, every group whole in one row.

A choice record (``{"prompt", "options", "label"}``, :func:`gkd_cli.data.formats.choice_payload`)
is a *group*. :func:`expand_choice_sources` writes each option as a prompt/completion record
(``prompt`` + ``option_j``, the option the only target) into one JSON-lines file the example-store
builder tokenizes as usual, next to an ``.npz`` holding, per stored example, its group and option
index, and per group its label (``-1``: none) and where it came from. :class:`ChoiceRows` places
whole groups into rows (``data.mode: padded``: one group per row; ``packed``: groups next-fit),
the examples of a row one after the other with attention block-diagonal and positions restarting
(``packed = True`` in both modes), and drops each example's end-of-document target so the loss
mask covers the option's tokens alone. A group never straddles rows, so no microbatch and no
data-parallel rank ever holds part of one. :meth:`ChoiceRows.collate` adds ``choices`` (a
:class:`methods.choices.ChoiceBatch` numbered within the microbatch) to
:func:`gkd_cli.data.batching.collate`'s microbatch. See :mod:`methods.choices` for the design.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gkd_cli.data import formats
from gkd_cli.data.batching import Row, _ExampleRows, collate, locate_in_epochs
from gkd_cli.data.corpus import sample_order
from gkd_cli.data.store import ExampleStore

log = logging.getLogger(__name__)


def _first_record(source: formats.DataSource, fmt: str) -> tuple[str, Any] | None:
    for where, record, _ in _raw(source, fmt):
        return where, record
    return None


def _raw(source: formats.DataSource, fmt: str):
    path = Path(source.path)
    if fmt == "jsonl":
        yield from formats.iter_jsonl_records(path)
    elif fmt in ("parquet", "arrow"):
        yield from formats.iter_table_records(path, fmt)


def choice_source_kinds(sources: Sequence[formats.DataSource]) -> list[bool]:
    """Per source: whether it holds choice records (its kind, or its first record's)."""
    kinds = []
    for source in sources:
        fmt = formats.resolve_format(source)
        if fmt not in ("jsonl", "parquet", "arrow"):
            kinds.append(False)
            continue
        if source.kind != "auto":
            kinds.append(source.kind == "choice")
            continue
        first = _first_record(source, fmt)
        kinds.append(
            first is not None and formats.decide_kind(source, first[1], first[0]) == "choice"
        )
    return kinds


def expand_choice_sources(
    sources: Sequence[formats.DataSource], directory: Path
) -> tuple[formats.DataSource, Path]:
    """Write every option of the choice records of ``sources`` as a prompt/completion JSON line
    (``directory/choices-<digest>.jsonl``) and the groups (``.npz``); returns the source to build
    and the ``.npz`` path. Atomic (temporary names, then rename); reused when present."""
    digest = hashlib.sha256()
    for source in sources:
        stat = os.stat(source.path)
        digest.update(f"{os.path.abspath(source.path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        digest.update(json.dumps(source.identity(), sort_keys=True).encode())
    stem = directory / f"choices-{digest.hexdigest()[:16]}"
    text, meta = stem.with_suffix(".jsonl"), stem.with_suffix(".npz")
    if not (text.is_file() and meta.is_file()):
        directory.mkdir(parents=True, exist_ok=True)
        group: list[int] = []
        option: list[int] = []
        labels: list[int] = []
        wheres: list[str] = []
        tmp_text = text.with_suffix(".jsonl.tmp")
        with tmp_text.open("w") as out:
            for source in sources:
                fmt = formats.resolve_format(source)
                for where, record, _ in _raw(source, fmt):
                    prompt, options, label = formats.choice_payload(record, source, where)
                    g = len(labels)
                    for k, text_k in enumerate(options):
                        out.write(json.dumps({"prompt": prompt, "completion": text_k}) + "\n")
                        group.append(g)
                        option.append(k)
                    labels.append(-1 if label is None else label)
                    wheres.append(where)
        if not labels:
            tmp_text.unlink()
            raise ValueError(
                f"the choice data ({', '.join(s.path for s in sources)}) hold no record"
            )
        tmp_meta = stem.with_suffix(".tmp.npz")
        np.savez(
            tmp_meta,
            group=np.asarray(group, dtype=np.int64),
            option=np.asarray(option, dtype=np.int64),
            label=np.asarray(labels, dtype=np.int64),
            where=np.asarray(wheres),
        )
        os.replace(tmp_meta, meta)
        os.replace(tmp_text, text)
    built = replace(
        sources[0], path=str(text), format="jsonl", kind="prompt_completion", weight=None,
        group=None, prompt_field="prompt", completion_field="completion",
    )  # fmt: skip
    return built, meta


def prepare_sources(
    sources: Sequence[formats.DataSource], directory: Path
) -> tuple[list[formats.DataSource], Path | None]:
    """``(sources to build, groups file or None)``: choice sources expanded, others as given.
    ``ValueError`` when choice records are mixed with other kinds or carry mixture weights."""
    kinds = choice_source_kinds(sources)
    if not any(kinds):
        return list(sources), None
    if not all(kinds):
        others = [s.path for s, k in zip(sources, kinds, strict=True) if not k]
        raise ValueError(
            f"data: choice records cannot be mixed with other kinds of example ({others[0]} is "
            "not choice records); train on them in separate runs"
        )
    if any(s.weight is not None for s in sources):
        raise ValueError("data.train_weights: choice records take no mixture weights; drop them")
    built, meta = expand_choice_sources(sources, directory)
    return [built], meta


def overlong_record_message(
    where: str, options: int, tokens: int, seq_length: int, count: int
) -> str:
    """The refusal of a choice record whose options do not fit one sequence together."""
    return (
        f"{where}: the {options} options of this choice record take {tokens} tokens together "
        f"(the prompt once per option), more than data.seq_length={seq_length}; the options of "
        "a record must fit one sequence: raise data.seq_length, shorten the record or set "
        f"data.overlong: truncate to leave such records out ({count} record(s) too long)"
    )


def record_tokens(tokenizer: Any, prompt: str, options: Sequence[str]) -> int:
    """Tokens of a choice record's options in one sequence, each option encoded as the example
    builder encodes a prompt/completion example (framed prompt + option + end of sequence)."""
    framed = len(tokenizer.encode_batch_framed([prompt])[0])
    return sum(framed + len(ids) + 1 for ids in tokenizer.encode_batch(list(options)))


def check_record_lengths(
    records: Iterable[tuple[str, str, Sequence[str]]], tokenizer: Any, seq_length: int
) -> None:
    """``ValueError`` naming the first of ``(where, prompt, options)`` whose options do not fit
    ``seq_length`` together (the launch-time check of what :class:`ChoiceRows` refuses)."""
    over: list[tuple[str, int, int]] = []
    for where, prompt, options in records:
        tokens = record_tokens(tokenizer, prompt, options)
        if tokens > seq_length:
            over.append((where, len(options), tokens))
    if over:
        first, count, total = over[0]
        raise ValueError(overlong_record_message(first, count, total, seq_length, len(over)))


def iter_file_records(
    sources: Sequence[formats.DataSource],
) -> Iterator[tuple[str, str, list[str]]]:
    """``(where, prompt, options)`` of every choice record of ``sources``, validated."""
    for source in sources:
        for where, record, _ in _raw(source, formats.resolve_format(source)):
            prompt, options, _ = formats.choice_payload(record, source, where)
            yield where, prompt, options


class ChoiceRows(_ExampleRows):
    """Rows of whole choice groups (see the module docstring)."""

    packed = True

    def __init__(
        self,
        store: ExampleStore,
        seq_length: int,
        groups_file: Path,
        *,
        mode: str,
        overlong: str = "refuse",
        **kwargs,
    ) -> None:
        """``overlong``: ``"refuse"`` a record whose options do not fit ``seq_length`` together
        (``ValueError`` naming it), or ``"truncate"``: leave such records out (counted and
        logged; cutting a record would change its option scores)."""
        if mode not in ("padded", "packed"):
            raise ValueError(
                f"choice records need data.mode: padded or packed (got {mode!r}): the options "
                "of a task example are separate examples"
            )
        if overlong not in ("refuse", "truncate"):
            raise ValueError(f"data.overlong must be 'refuse' or 'truncate', got {overlong!r}")
        # Examples are checked here, as whole records (an option of a left-out record may be
        # longer than a sequence by itself).
        kwargs["overlong"] = "unchecked"
        super().__init__(store, seq_length, **kwargs)
        self.mode = mode
        with np.load(groups_file) as meta:
            self.group = meta["group"]
            self.option = meta["option"]
            self.labels = meta["label"]
            self.wheres = [str(w) for w in meta["where"]]
        if len(self.group) != len(store):
            raise ValueError(
                f"the choice data have {len(self.group)} options but the example store "
                f"{store.paths['json']} has {len(store)} examples; delete the cache folder and "
                "run again"
            )
        count = len(self.labels)
        self.starts = np.searchsorted(self.group, np.arange(count + 1))
        lengths = np.add.reduceat(store.lengths(), self.starts[:-1]) if count else np.zeros(0)
        self.group_lengths = np.asarray(lengths, dtype=np.int64)
        over = np.nonzero(self.group_lengths > seq_length)[0]
        if len(over) and overlong == "refuse":
            g = int(over[0])
            raise ValueError(
                overlong_record_message(
                    self.wheres[g], int(self.starts[g + 1] - self.starts[g]),
                    int(self.group_lengths[g]), seq_length, len(over),
                )
            )  # fmt: skip
        self.kept = np.nonzero(self.group_lengths <= seq_length)[0].astype(np.int64)
        """The records trained on (all of them unless ``overlong="truncate"`` left some out)."""
        self.left_out = len(over)
        where = kwargs.get("name") or store.paths["json"]
        if len(over) and not len(self.kept):
            raise ValueError(
                f"no choice record of {where} fits data.seq_length={seq_length} with all its "
                "options; raise data.seq_length"
            )
        if len(over):
            log.warning(
                "%s: %d of %d choice records do not fit data.seq_length=%d with all their "
                "options and are left out (data.overlong: truncate); the first: %s",
                where, len(over), count, seq_length, self.wheres[int(over[0])],
            )  # fmt: skip
        self._counts: list[int] = []

    @property
    def labeled(self) -> bool:
        return bool((self.labels[self.kept] >= 0).all())

    def units(self) -> int:
        return len(self.kept)

    def _order(self, epoch: int) -> np.ndarray:
        n = self.units()
        if not self.shuffle:
            return self.kept.copy()
        return self.kept[sample_order(n, self.seed, epoch)]

    def _pack(self, epoch: int) -> list[list[int]]:
        order = self.order(epoch).tolist()
        if self.mode == "padded":
            return [[g] for g in order]
        rows: list[list[int]] = []
        used = self.seq_length + 1
        for g in order:
            n = int(self.group_lengths[g])
            if used + n > self.seq_length:
                rows.append([])
                used = 0
            rows[-1].append(g)
            used += n
        return rows

    def _rows(self, epoch: int) -> list[list[int]]:
        cache = self.__dict__.setdefault("_row_cache", {})
        if epoch not in cache:
            if len(cache) > 3:
                cache.clear()
            cache[epoch] = self._pack(epoch)
        return cache[epoch]  # type: ignore[no-any-return]

    def rows_in_epoch(self, epoch: int) -> int:
        return len(self._rows(epoch))

    def locate(self, positions: np.ndarray) -> list[tuple[int, int]]:
        return locate_in_epochs(self.rows_in_epoch, self._counts, positions)

    def row(self, epoch: int, index: int) -> Row:
        examples = [
            e for g in self._rows(epoch)[index] for e in range(self.starts[g], self.starts[g + 1])
        ]
        row = self.place(examples)
        # The end-of-document token after each option is not part of the option's score.
        offset = 0
        for e in examples:
            n = int(self.lengths[e])
            row.label_mask[offset + n - 2] = 0
            offset += n
        distill = row.label_mask.copy()
        return Row(row.tokens, row.label_mask, distill, row.example_ids, row.positions)

    def collate(self, rows: Sequence[Row]) -> dict:
        """:func:`gkd_cli.data.batching.collate` plus ``choices`` (a ``ChoiceBatch``)."""
        import torch

        from methods.choices import ChoiceBatch

        micro = collate(rows, packed=True)
        store_ids = np.stack([r.example_ids for r in rows])  # [b, s], row order as local ids
        flat = store_ids.reshape(-1)
        previous = np.concatenate([[-2], flat[:-1]])
        starts = (flat >= 0) & (
            (flat != previous) | (np.arange(len(flat)) % store_ids.shape[1] == 0)
        )
        examples = flat[starts]
        global_groups = self.group[examples]
        local: dict[int, int] = {}
        for g in global_groups.tolist():
            local.setdefault(int(g), len(local))
        micro["choices"] = ChoiceBatch(
            group_ids=torch.as_tensor([local[int(g)] for g in global_groups], dtype=torch.long),
            option_index=torch.as_tensor(self.option[examples], dtype=torch.long),
            labels=torch.as_tensor(self.labels[list(local)], dtype=torch.long),
        )
        return micro


def check_choice_config(cfg: Any) -> None:
    """``ConfigError`` naming the field and the fix when ``data.choices``/``data.labels`` do not
    fit the run: choice records are written for ``data.source: superglue`` in ``padded``/``packed``
    mode at ``train.stage: task``, and a method that trains on labels (``lm``, ``kd``'s hard term,
    ``continuation_kd``) needs ``data.labels: true``; ``glmd_soft`` needs choice data."""
    from gkd_cli.errors import ConfigError
    from methods.choices import needs_choice_labels

    d = cfg.data
    names = [e.name for e in cfg.methods]
    if d.labels and not d.choices:
        raise ConfigError(
            "data.labels: true needs data.choices: true (labels go into choice records)",
            field="data.labels",
        )
    if d.source == "superglue" and not d.choices and "glmd_soft" in names:
        raise ConfigError(
            "methods: glmd_soft distills option scores; set data.choices: true (and "
            "data.mode: padded or packed)",
            field="data.choices",
        )
    if not d.choices:
        return
    if d.source != "superglue":
        raise ConfigError(
            "data.choices: true writes SuperGLUE examples as choice records (data.source: "
            "superglue); corpus files holding choice records are recognised by their fields",
            field="data.choices",
        )
    if d.mode not in ("padded", "packed"):
        raise ConfigError(
            f"data.choices: true needs data.mode: padded or packed (got {d.mode}): each option "
            "is an example of its own",
            field="data.mode",
        )
    if str(getattr(cfg.train.stage, "value", cfg.train.stage)) != "task":
        raise ConfigError(
            "data.choices: true is task data: set train.stage: task", field="train.stage"
        )
    if not d.labels:
        for i, entry in enumerate(cfg.methods):
            if needs_choice_labels(entry.name, entry.params):
                fix = "" if entry.name == "lm" else f" or set methods.{i}.hard_weight: 0"
                if entry.name == "continuation_kd":
                    fix = ""
                raise ConfigError(
                    f"methods.{i} ({entry.name}) trains on the task's labels, but data.labels is "
                    f"false (GLMD's setting: no gold answers); set data.labels: true{fix}",
                    field=f"methods.{i}",
                )
