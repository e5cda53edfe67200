"""Training rows from tokenized examples: the three ``data.mode`` s, epochs, and batch order.

A *row* is one sequence of a microbatch: ``seq_length + 1`` tokens (model input ``x = row[:-1]``,
labels ``y = row[1:]``) with, per input position ``i``:

``label_mask[i]``
    1 when label ``y[i]`` counts in the loss: it is a *target* token (the store's mask: a
    completion or assistant token; every token of plain text) of the same example as ``x[i]``.
    Prompt tokens, the boundary between two packed examples and padding never count.
``distill_mask[i]``
    the positions a label-free method (GLMD, hidden-state losses) distills: ``label_mask`` plus
    each example's last position when that token is a target (it has no label inside the
    example, but it is a real position of the answer). ``None`` in ``stream`` mode (the runtime
    then uses ``label_mask``, as before example-aware batches).
``example_ids[i]``
    the store index of the example ``x[i]`` belongs to, ``-1`` on padding. In ``stream`` mode the
    row (a window that may hold parts of several documents) is the example: its sample index.
``positions[i]``
    the position id: restarts at 0 at every example (``packed``); ``0 .. s-1`` otherwise.

Modes (``data.mode``):

``stream``
    every example one after the other as one token stream (each ends with the tokenizer's
    end-of-document id, as the builder stores it) cut into fixed windows: pre-training, GPT-style.
    Identical to :class:`gkd_cli.data.corpus.TokenDataset`'s samples.
``padded``
    one example per row, right-padded (``pad_id``, masked) to ``seq_length``. A causal model
    never attends to the padding on its right, so no attention mask is needed.
``packed``
    whole examples one after the other in a row (next-fit, in the epoch's order) until the next
    does not fit; the rest is padding. The runtime builds a block-diagonal causal attention mask
    from ``example_ids`` (no token attends to another example) and positions restart per example.

An example fits a row when it has at most ``seq_length`` tokens (its last token is then the last
input position it needs). Longer ones are refused with an error naming the example and the fix, or
cut to their first ``seq_length`` tokens and counted (``data.overlong: truncate``).

Order. Epoch ``e`` visits the examples in ``mixture_order(store, seed, e)``
(:mod:`gkd_cli.data.build`: a permutation drawn from ``(seed, e)``, or each source's weighted
share), the windows of ``stream`` mode in ``sample_order(n, seed, e)`` (what
:func:`~gkd_cli.data.corpus.batch_indices` walks); with ``shuffle=False``, the stored order. ``packed`` packs
each epoch's order anew, so the rows of every epoch are deterministic too. The rows of all epochs
follow each other without gaps: global row position ``p = step * global_batch_size + j``.
:func:`step_microbatches` cuts the step's ``global_batch_size`` rows by the rule of
:func:`gkd_cli.data.corpus.batch_indices` (rank ``r`` takes the contiguous slice ``r``), so every
data-parallel size sees the same rows at a step and resuming needs no sampler state.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gkd_cli.data.corpus import sample_order
from gkd_cli.data.store import ExampleStore

log = logging.getLogger(__name__)

Mode = Literal["stream", "padded", "packed"]
Overlong = Literal["refuse", "truncate"]
MODES: tuple[str, ...] = ("stream", "padded", "packed")


@dataclass(frozen=True)
class Row:
    """One sequence of ``seq_length`` input positions (see the module docstring)."""

    tokens: np.ndarray
    """int64 ``[s + 1]``."""
    label_mask: np.ndarray
    """uint8 ``[s]``."""
    distill_mask: np.ndarray | None
    """uint8 ``[s]``, or ``None`` (stream mode: same as ``label_mask``)."""
    example_ids: np.ndarray
    """int64 ``[s]``, ``-1`` on padding."""
    positions: np.ndarray
    """int64 ``[s]``."""


class RowDataset:
    """Rows of one mode over an :class:`ExampleStore` (base class; see the module docstring)."""

    mode: str = ""
    packed: bool = False
    """True when rows hold several examples (the runtime then masks attention between them)."""

    def __init__(self, store: ExampleStore, seq_length: int, *, seed: int, shuffle: bool) -> None:
        if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
            raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
        self.store = store
        self.seq_length = seq_length
        self.seed = int(seed)
        self.shuffle = shuffle
        self._orders = functools.lru_cache(maxsize=4)(self._order)

    # -- per epoch
    def units(self) -> int:
        """What an epoch permutes: examples (rows in stream mode)."""
        return len(self.store)

    def order(self, epoch: int) -> np.ndarray:
        """The units of ``epoch`` in order (cached)."""
        return self._orders(int(epoch))

    def _order(self, epoch: int) -> np.ndarray:
        n = self.units()
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return sample_order(n, self.seed, epoch)

    def rows_in_epoch(self, epoch: int) -> int:
        return self.units()

    def row(self, epoch: int, index: int) -> Row:
        raise NotImplementedError

    # -- global positions
    def locate(self, positions: np.ndarray) -> list[tuple[int, int]]:
        """``(epoch, row)`` of each global row position (epochs follow each other)."""
        n = self.rows_in_epoch(0)
        return [(int(p // n), int(p % n)) for p in positions]


def locate_in_epochs(
    rows_in_epoch: Callable[[int], int], counts: list[int], positions: np.ndarray
) -> list[tuple[int, int]]:
    """``(epoch, row)`` of each global row position when epochs have different numbers of rows
    (packing depends on each epoch's order); ``counts`` caches the rows of epochs 0, 1, ... and
    grows as far as the positions need."""
    out = []
    for p in positions.tolist():
        epoch = 0
        while True:
            while len(counts) <= epoch:
                counts.append(rows_in_epoch(len(counts)))
            if p < counts[epoch]:
                break
            p -= counts[epoch]
            epoch += 1
        out.append((epoch, int(p)))
    return out


def _check_overlong(store: ExampleStore, seq_length: int, overlong: str, where: str) -> int:
    if overlong == "unchecked":  # the caller checks (choice records, whole records at a time)
        return 0
    if overlong not in ("refuse", "truncate"):
        raise ValueError(f"data.overlong must be 'refuse' or 'truncate', got {overlong!r}")
    lengths = store.lengths()
    over = np.flatnonzero(lengths > seq_length)
    if len(over) and overlong == "refuse":
        first = int(over[0])
        raise ValueError(
            f"example {first} of {where} has {int(lengths[first])} tokens, more than "
            f"data.seq_length={seq_length} ({len(over)} of {len(lengths)} examples are longer); "
            "raise data.seq_length, shorten or drop those examples, or set "
            f"data.overlong: truncate (keeps each example's first {seq_length} tokens)"
        )
    if len(over):
        log.warning(
            "%s: %d of %d examples are longer than data.seq_length=%d and are truncated to their "
            "first %d tokens (data.overlong: truncate)",
            where, len(over), len(lengths), seq_length, seq_length,
        )  # fmt: skip
    return len(over)


def _weighted(store: ExampleStore | None) -> bool:
    sources = store.meta.get("sources") if store is not None else None
    return any(s.get("weight") is not None for s in sources or [])


class _ExampleRows(RowDataset):
    """Shared by padded and packed: placing whole examples into rows."""

    def __init__(
        self,
        store: ExampleStore,
        seq_length: int,
        *,
        seed: int,
        shuffle: bool = True,
        overlong: Overlong = "refuse",
        pad_id: int = 0,
        name: str = "",
    ) -> None:
        super().__init__(store, seq_length, seed=seed, shuffle=shuffle)
        if not shuffle and _weighted(store):
            raise ValueError(
                "the data sources have mixture weights, which are drawn per epoch: set "
                "data.shuffle: true (or drop the weights)"
            )
        where = name or str(store.paths["json"])
        self.truncated = _check_overlong(store, seq_length, overlong, where)
        """Examples longer than ``seq_length`` (cut to their first ``seq_length`` tokens)."""
        self.pad_id = int(pad_id)
        self.lengths = np.minimum(store.lengths(), seq_length)

    def _order(self, epoch: int) -> np.ndarray:
        """Examples: :func:`gkd_cli.data.build.mixture_order` (a permutation per epoch; with
        source weights, each source's share of the epoch)."""
        if not self.shuffle:
            return np.arange(self.units(), dtype=np.int64)
        from gkd_cli.data.build import mixture_order

        return mixture_order(self.store, self.seed, epoch)

    def place(self, examples: Sequence[int]) -> Row:
        """The row holding ``examples`` one after the other, then padding."""
        s = self.seq_length
        tokens = np.full(s + 1, self.pad_id, dtype=np.int64)
        label = np.zeros(s, dtype=np.uint8)
        distill = np.zeros(s, dtype=np.uint8)
        ids = np.full(s, -1, dtype=np.int64)
        positions = np.zeros(s, dtype=np.int64)
        offset = 0
        for e in examples:
            e = int(e)
            n = int(self.lengths[e])
            if offset + n > s:
                raise ValueError(f"examples {list(examples)} do not fit one row of {s} tokens")
            tokens[offset : offset + n] = self.store.tokens(e)[:n]
            target = np.asarray(self.store.mask(e)[:n], dtype=np.uint8)
            label[offset : offset + n - 1] = target[1:]
            distill[offset : offset + n - 1] = target[1:]
            distill[offset + n - 1] = target[n - 1]
            ids[offset : offset + n] = e
            positions[offset : offset + n] = np.arange(n)
            offset += n
        if not self.packed:
            positions = np.arange(s, dtype=np.int64)
        return Row(tokens, label, distill, ids, positions)


class PaddedRows(_ExampleRows):
    """``data.mode: padded``: one example per row."""

    mode = "padded"

    def row(self, epoch: int, index: int) -> Row:
        return self.place([int(self.order(epoch)[index])])


class PackedRows(_ExampleRows):
    """``data.mode: packed``: whole examples packed next-fit in each epoch's order."""

    mode = "packed"
    packed = True

    def __init__(self, store: ExampleStore, seq_length: int, **kwargs) -> None:
        super().__init__(store, seq_length, **kwargs)
        self._packs = functools.lru_cache(maxsize=4)(self._pack)
        self._counts: list[int] = []
        """Rows of epochs 0, 1, ... as far as computed."""

    def _pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(order, starts)``: the epoch's example order, and where each row starts in it
        (``starts[-1] == len(order)``)."""
        order = self.order(epoch)
        lengths = self.lengths[order]
        starts = [0]
        used = 0
        for i, n in enumerate(lengths.tolist()):
            if used + n > self.seq_length:
                starts.append(i)
                used = 0
            used += n
        starts.append(len(order))
        return order, np.asarray(starts, dtype=np.int64)

    def rows_in_epoch(self, epoch: int) -> int:
        return len(self._packs(epoch)[1]) - 1

    def row(self, epoch: int, index: int) -> Row:
        order, starts = self._packs(epoch)
        return self.place(order[starts[index] : starts[index + 1]].tolist())

    def locate(self, positions: np.ndarray) -> list[tuple[int, int]]:
        return locate_in_epochs(self.rows_in_epoch, self._counts, positions)


class StreamRows(RowDataset):
    """``data.mode: stream``: the store's tokens as one stream cut into windows (the rows of
    :class:`gkd_cli.data.corpus.TokenDataset`, which also works here as ``samples``)."""

    mode = "stream"

    def __init__(
        self,
        store: ExampleStore | None,
        seq_length: int,
        *,
        seed: int,
        shuffle: bool = True,
        samples=None,
    ) -> None:
        if store is None and samples is None:
            raise ValueError("StreamRows needs an example store or a TokenDataset")
        super().__init__(store, seq_length, seed=seed, shuffle=shuffle)  # type: ignore[arg-type]
        self.samples = samples
        if _weighted(store):
            raise ValueError(
                "data.mode: stream reads every document once per epoch; mixture weights need "
                "data.mode: padded or packed"
            )
        if samples is None:
            assert store is not None
            total = store.num_tokens
            if total < seq_length + 1:
                raise ValueError(
                    f"the corpus has {total} tokens, but seq_length={seq_length} needs at least "
                    f"{seq_length + 1} for one sample: add text or lower seq_length"
                )

    def units(self) -> int:
        if self.samples is not None:
            return len(self.samples)
        return (self.store.num_tokens - 1) // self.seq_length

    def __len__(self) -> int:
        return self.units()

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index``'s ``s + 1`` tokens and ``s`` label-mask values."""
        s = self.seq_length
        if self.samples is not None:
            return np.asarray(self.samples[index], dtype=np.int64), np.ones(s, dtype=np.uint8)
        start = index * s
        tokens = np.array(self.store.all_tokens()[start : start + s + 1], dtype=np.int64)
        if self.store.has_mask:
            a = start + 1
            label = np.array(self.store._mask[a : a + s], dtype=np.uint8)  # type: ignore[index]
        else:
            label = np.ones(s, dtype=np.uint8)
        return tokens, label

    def row(self, epoch: int, index: int) -> Row:
        sample = int(self.order(epoch)[index])
        tokens, label = self.window(sample)
        s = self.seq_length
        return Row(
            tokens, label, None, np.full(s, sample, dtype=np.int64), np.arange(s, dtype=np.int64)
        )


def make_rows(
    store: ExampleStore,
    mode: str,
    seq_length: int,
    *,
    seed: int,
    shuffle: bool = True,
    overlong: Overlong = "refuse",
    pad_id: int = 0,
    name: str = "",
) -> RowDataset:
    """The rows of ``mode`` over ``store``."""
    if mode == "stream":
        return StreamRows(store, seq_length, seed=seed, shuffle=shuffle)
    if mode == "padded":
        cls: type[_ExampleRows] = PaddedRows
    elif mode == "packed":
        cls = PackedRows
    else:
        raise ValueError(f"data.mode must be one of {', '.join(MODES)}, got {mode!r}")
    return cls(
        store, seq_length, seed=seed, shuffle=shuffle, overlong=overlong, pad_id=pad_id, name=name
    )


def step_rows(dataset: RowDataset, step: int, global_batch_size: int) -> list[tuple[int, int]]:
    """``(epoch, row)`` of the ``global_batch_size`` rows of ``step``, in order."""
    positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    return dataset.locate(positions)


def step_microbatches(
    dataset: RowDataset,
    step: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
) -> list[list[tuple[int, int]]]:
    """Microbatches (lists of ``(epoch, row)``) of data-parallel rank ``dp_rank`` at ``step``:
    global microbatch ``m`` is rows ``[m * mbs, (m + 1) * mbs)`` of the step, and rank ``r``
    takes global microbatches ``r * num_micro .. (r + 1) * num_micro - 1`` (the rule of
    :func:`gkd_cli.data.corpus.batch_indices`)."""
    if dp_rank >= dp_size or global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by micro_batch_size x "
            f"dp_size = {micro_batch_size} x {dp_size}, and dp_rank={dp_rank} < dp_size"
        )
    num_micro = global_batch_size // (micro_batch_size * dp_size)
    per_rank = num_micro * micro_batch_size
    rows = step_rows(dataset, step, global_batch_size)[
        dp_rank * per_rank : (dp_rank + 1) * per_rank
    ]
    return [rows[k * micro_batch_size : (k + 1) * micro_batch_size] for k in range(num_micro)]


def local_example_ids(global_ids: np.ndarray) -> np.ndarray:
    """``[b, s]`` store indices (``-1`` padding) -> ids ``0 .. E-1`` numbering the examples of the
    microbatch in row order (each contiguous run of one index in a row is one example)."""
    b, s = global_ids.shape
    real = global_ids >= 0
    previous = np.concatenate([np.full((b, 1), -2, dtype=np.int64), global_ids[:, :-1]], axis=1)
    starts = real & (global_ids != previous)
    numbers = np.cumsum(starts.reshape(-1)).reshape(b, s) - 1
    return np.where(real, numbers, -1)


def collate(rows: Sequence[Row], *, packed: bool) -> dict:
    """A microbatch for :meth:`parallel.runtime.DistillationRuntime.train_step`: ``tokens``
    ``[b, s+1]``, ``loss_mask`` and ``token_mask`` (``None`` in stream mode) ``[b, s]`` float32,
    ``example_ids`` (local, ``0 .. E-1``) and ``position_ids`` ``[b, s]`` int64, ``packed``
    (build the block-diagonal attention mask), and ``example_index`` (store indices, for logs
    and tests)."""
    import torch

    global_ids = np.stack([r.example_ids for r in rows])
    distill = None
    masks = [r.distill_mask for r in rows if r.distill_mask is not None]
    if masks:
        distill = torch.from_numpy(np.stack(masks).astype(np.float32))
    return {
        "tokens": torch.from_numpy(np.stack([r.tokens for r in rows]).astype(np.int64)),
        "loss_mask": torch.from_numpy(np.stack([r.label_mask for r in rows]).astype(np.float32)),
        "token_mask": distill,
        "example_ids": torch.from_numpy(local_example_ids(global_ids)),
        "position_ids": torch.from_numpy(np.stack([r.positions for r in rows])),
        "packed": packed,
        "example_index": torch.from_numpy(global_ids),
    }


def microbatches(
    dataset: RowDataset,
    step: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
) -> list[dict]:
    """This rank's collated microbatches of ``step`` (a dataset with its own ``collate``, e.g.
    :class:`gkd_cli.data.choices.ChoiceRows`, collates its rows itself)."""
    own = getattr(dataset, "collate", None)
    return [
        (own(rows) if own is not None else collate(rows, packed=dataset.packed))
        for rows in (
            [dataset.row(e, r) for e, r in micro]
            for micro in step_microbatches(
                dataset, step, global_batch_size, dp_rank, dp_size, micro_batch_size
            )
        )
    ]


def epochs_covered(dataset: RowDataset, steps: int, global_batch_size: int) -> float:
    """About how many epochs ``steps`` steps read (for the log line at the start of a run; in
    ``packed`` mode epochs after the first may pack into a few more or fewer rows)."""
    return steps * global_batch_size / dataset.rows_in_epoch(0)


def check_packed_method(method: object, taps: Sequence, where: str) -> None:
    """``ValueError`` when ``method`` relates the token positions of a whole sequence (it taps
    attention maps or Q/K/V, or declares ``relates_positions``: token relations): in
    ``data.mode: packed`` a sequence holds several examples, which such terms would mix (the
    methods apply a plain causal mask to the captured maps)."""
    from methods.base import FeatureKind

    kinds = {
        FeatureKind.ATTENTION_SCORES,
        FeatureKind.ATTENTION_PROBS,
        FeatureKind.QUERY,
        FeatureKind.KEY,
        FeatureKind.VALUE,
    }
    if any(t.kind in kinds for t in taps) or getattr(method, "relates_positions", False):
        raise ValueError(
            f"{where} relates the token positions of a whole sequence (attention maps, Q/K/V "
            "or token relations); with data.mode: packed a sequence holds several examples, "
            "which these terms would mix: use data.mode: padded"
        )
