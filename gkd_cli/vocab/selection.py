"""Which tokens to keep, and in which order (GLMD vocabulary compression, arXiv 2306.06625).

Keep size. A request is a ratio ``0 < r < 1`` of the vocabulary (``ceil(r * V)`` tokens) or a
count ``N``; it must be below ``V``. It is rounded up to a multiple of ``multiple x tp`` (128 x tp
by default, megatron-core's vocabulary padding rule), then capped at ``V``.

Selection. Forced tokens (special, verbalizer and ``force_keep`` tokens) are always kept; the
remaining places go to the most frequent other tokens, ties broken by the lower original id.

Order (the shard rule). The teacher's output layer holds its padded vocabulary ``Vt_pad`` split
into ``tp`` contiguous shards of width ``W = Vt_pad / tp``; teacher shard ``r`` owns original ids
``[r W, (r+1) W)``. Kept ids are partitioned by teacher shard (``c_r`` kept ids in shard ``r``).
Every student shard gets the same width ``S = roundup(max_r c_r, multiple)``, so
``V' = tp x S``; student shard ``r`` (compressed ids ``[r S, (r+1) S)``) holds exactly the kept
ids of teacher shard ``r`` in ascending order, followed by padding slots (``-1``). Consequently
the teacher's logits restricted to the kept tokens of student shard ``r`` are all on tp rank
``r``: :func:`shard_local_index` gives their local column indices, and restricting the teacher's
logits needs no communication. When the kept tokens spread evenly over teacher shards,
``V'`` equals the keep size; otherwise some padding is added.

Balanced selection (:func:`select_kept_balanced`). Frequent tokens are not spread evenly: a BPE
vocabulary gives low ids to bytes and early merges, so the global top-``K`` crowd into teacher
shard 0 and ``V' = tp x S`` can approach the full vocabulary. Selecting the most frequent tokens
*within each teacher shard*, ``K / tp`` per shard (forced tokens first), makes every shard exactly
full: ``V' = K`` with no padding. For a given ``V'`` this is the selection of highest corpus
coverage that the shard rule admits (each student shard holds at most ``V'/tp`` ids of its teacher
shard, and per shard the most frequent ones cover most); compared with the global top-``K`` it
keeps as many tokens but trades some frequent tokens of crowded shards for rarer ones of sparse
shards. At ``tp = 1`` both selections are the same. Within a shard the selection is by count, so
a token never seen in the corpus is kept only when every seen token of its shard is kept too
(forced tokens aside); across shards it can happen (a sparse shard fills its quota with unseen
tokens while a crowded one drops frequent tokens): :func:`equal_size_coverage` measures what each
selection covers at the same student vocabulary, and the report prints it.

GLMD's own recipe (Tan et al. 2023, Sec. 3.3; the authors' GLMKD code) is the global selection with
dot-product similarity of the teacher's (tied) word embeddings: ``--selection global --similarity
dot``. Similarity defaults to ``dot``; selection defaults to ``balanced``, which is the same set at
``tp = 1`` and keeps the student vocabulary at the requested size at ``tp > 1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def parse_keep(keep: float | int | str) -> float | int:
    """``"0.5"`` -> 0.5, ``"3000"`` -> 3000 (for command-line strings); numbers pass through."""
    if isinstance(keep, str):
        text = keep.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"keep={keep!r} is neither a ratio in (0, 1) nor a token count"
            ) from None
    return keep


def keep_size(keep: float | int | str, vocab_size: int, *, tp: int = 1, multiple: int = 128) -> int:
    """Number of tokens to keep: the request rounded up to a multiple of ``multiple x tp``,
    never above ``vocab_size``. ``ValueError`` for a ratio outside (0, 1), a count < 1 or a
    request that is not below the vocabulary."""
    keep = parse_keep(keep)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise ValueError(f"keep must be a ratio in (0, 1) or a token count, got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep < 1.0:
            raise ValueError(
                f"keep={keep} as a ratio must lie strictly between 0 and 1; pass an integer to "
                "give a token count"
            )
        requested = math.ceil(keep * vocab_size)
    else:
        if keep < 1:
            raise ValueError(f"keep={keep} must be at least 1 token")
        requested = keep
    if requested >= vocab_size:
        raise ValueError(
            f"keep={keep} ({requested} tokens) is not smaller than the vocabulary ({vocab_size} "
            "tokens): nothing would be compressed; lower keep"
        )
    return min(round_up(requested, multiple * tp), vocab_size)


def select_kept(counts: np.ndarray, keep: int, forced_ids: Iterable[int]) -> np.ndarray:
    """Sorted original ids of the ``keep`` tokens to keep.

    ``counts``: ``[V]`` token frequencies. All ``forced_ids`` are kept; the rest of the places go
    to the most frequent remaining ids (ties: lower id first). ``ValueError`` when there are more
    forced ids than places.
    """
    counts = np.asarray(counts)
    vocab = len(counts)
    forced = np.unique(np.fromiter((int(i) for i in forced_ids), dtype=np.int64))
    if forced.size and (forced.min() < 0 or forced.max() >= vocab):
        raise ValueError(f"forced token ids must lie in [0, {vocab})")
    if len(forced) > keep:
        raise ValueError(
            f"keep={keep} is smaller than the {len(forced)} tokens that must be kept (special, "
            "verbalizer and --force-keep tokens); raise keep"
        )
    if keep > vocab:
        raise ValueError(f"keep={keep} exceeds the vocabulary ({vocab})")
    candidates = np.setdiff1d(np.arange(vocab, dtype=np.int64), forced)
    # Stable sort on descending count keeps ascending id order among equal counts.
    order = candidates[np.argsort(-counts[candidates], kind="stable")]
    return np.sort(np.concatenate([forced, order[: keep - len(forced)]]))


def layout_kept(
    kept_ids: np.ndarray, *, teacher_vocab_padded: int, tp: int = 1, multiple: int = 128
) -> np.ndarray:
    """``comp_to_orig`` ``[V']`` (int64, -1 = padding slot) laying ``kept_ids`` out by the
    shard rule of this module's docstring."""
    if teacher_vocab_padded % tp:
        raise ValueError(
            f"the teacher's padded vocabulary ({teacher_vocab_padded}) is not divisible by tp={tp}"
        )
    kept_ids = np.sort(np.asarray(kept_ids, dtype=np.int64))
    if kept_ids.size and (kept_ids[0] < 0 or kept_ids[-1] >= teacher_vocab_padded):
        raise ValueError(f"kept ids must lie in [0, {teacher_vocab_padded})")
    width = teacher_vocab_padded // tp
    shard_of = kept_ids // width
    per_shard = [kept_ids[shard_of == r] for r in range(tp)]
    student_width = round_up(max(1, max(len(ids) for ids in per_shard)), multiple)
    comp_to_orig = np.full(tp * student_width, -1, dtype=np.int64)
    for rank, ids in enumerate(per_shard):
        comp_to_orig[rank * student_width : rank * student_width + len(ids)] = ids
    return comp_to_orig


def shard_local_index(
    comp_to_orig: np.ndarray, tp: int, teacher_vocab_padded: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Columns of teacher tp-shard ``rank`` that student tp-shard ``rank`` needs.

    Returns ``(local_index, valid)``, both ``[V'/tp]``: slot ``j`` of student shard ``rank``
    (compressed id ``rank * V'/tp + j``) is the teacher's local logit column ``local_index[j]`` of
    its shard ``[.., Vt_pad/tp]``; ``valid[j]`` is False for padding slots (``local_index`` 0
    there: mask those logits to -inf). Usage on rank ``r``::

        restricted = teacher_logits[..., torch.from_numpy(local_index)]   # [s, b, V'/tp]
        restricted.masked_fill_(~torch.from_numpy(valid), float("-inf"))

    ``ValueError`` if the layout does not follow the shard rule for this ``tp`` and
    ``teacher_vocab_padded``.
    """
    comp_to_orig = np.asarray(comp_to_orig, dtype=np.int64)
    if tp < 1 or len(comp_to_orig) % tp or teacher_vocab_padded % tp:
        raise ValueError(
            f"compressed vocabulary {len(comp_to_orig)} and teacher vocabulary "
            f"{teacher_vocab_padded} must both be divisible by tp={tp}"
        )
    if not 0 <= rank < tp:
        raise ValueError(f"rank={rank} must lie in [0, {tp})")
    student_width = len(comp_to_orig) // tp
    teacher_width = teacher_vocab_padded // tp
    slots = comp_to_orig[rank * student_width : (rank + 1) * student_width]
    valid = slots >= 0
    local = np.where(valid, slots - rank * teacher_width, 0)
    if ((local < 0) | (local >= teacher_width))[valid].any():
        raise ValueError(
            f"the vocabulary mapping was not laid out for tp={tp} with a teacher vocabulary of "
            f"{teacher_vocab_padded}: student shard {rank} holds ids of another teacher shard; "
            "recompute it with `gkd compress-vocab --tp` matching the run"
        )
    return local.astype(np.int64), valid


SELECTIONS: tuple[str, ...] = ("balanced", "global")
"""``balanced``: the most frequent ``K/tp`` tokens of each teacher shard (``V' = K``);
``global``: the most frequent ``K`` tokens overall (``V' >= K`` at ``tp > 1``)."""


def select_kept_balanced(
    counts: np.ndarray,
    keep: int,
    forced_ids: Iterable[int],
    *,
    teacher_vocab_padded: int,
    tp: int,
    multiple: int = 1,
) -> np.ndarray:
    """Sorted original ids to keep: in each teacher tp shard, the forced ids there plus its most
    frequent other ids up to the shard quota ``roundup(ceil(keep / tp), multiple)`` (ties: lower
    id first). A shard with fewer real ids than the quota keeps all of them.

    ``counts``: ``[V]`` token frequencies; ids of shard ``r`` are ``[r W, (r+1) W)`` with
    ``W = teacher_vocab_padded / tp`` (ids ``>= V`` are teacher padding rows, never kept).
    ``ValueError`` when a shard holds more forced ids than its quota.
    """
    counts = np.asarray(counts)
    vocab = len(counts)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if teacher_vocab_padded % tp or teacher_vocab_padded < vocab:
        raise ValueError(
            f"the teacher's padded vocabulary ({teacher_vocab_padded}) must be >= the vocabulary "
            f"({vocab}) and divisible by tp={tp}"
        )
    forced = np.unique(np.fromiter((int(i) for i in forced_ids), dtype=np.int64))
    if forced.size and (forced.min() < 0 or forced.max() >= vocab):
        raise ValueError(f"forced token ids must lie in [0, {vocab})")
    if keep > vocab:
        raise ValueError(f"keep={keep} exceeds the vocabulary ({vocab})")
    quota = round_up(-(-keep // tp), multiple)
    width = teacher_vocab_padded // tp
    kept = []
    for rank in range(tp):
        start, stop = rank * width, min((rank + 1) * width, vocab)
        ids = np.arange(start, max(start, stop), dtype=np.int64)
        mine = forced[(forced >= start) & (forced < stop)]
        if len(mine) > quota:
            raise ValueError(
                f"teacher tensor-parallel shard {rank} (ids {start}-{stop - 1}) holds {len(mine)} "
                f"tokens that must be kept, more than its share of {quota} (keep={keep} / tp={tp}); "
                "raise keep or use the global selection"
            )
        others = np.setdiff1d(ids, mine)
        order = others[np.argsort(-counts[others], kind="stable")]
        kept.append(mine)
        kept.append(order[: max(0, quota - len(mine))])
    return np.sort(np.concatenate(kept))


def global_prefix_fitting(
    counts: np.ndarray,
    forced_ids: Iterable[int],
    *,
    teacher_vocab_padded: int,
    tp: int,
    shard_width: int,
) -> np.ndarray:
    """Sorted ids of the longest prefix of the global order (forced ids, then by descending count,
    ties by lower id) whose kept ids number at most ``shard_width`` in every teacher shard: the
    global selection that fits a student vocabulary of ``tp x shard_width``."""
    counts = np.asarray(counts)
    vocab = len(counts)
    forced = np.unique(np.fromiter((int(i) for i in forced_ids), dtype=np.int64))
    others = np.setdiff1d(np.arange(vocab, dtype=np.int64), forced)
    order = np.concatenate([forced, others[np.argsort(-counts[others], kind="stable")]])
    width = teacher_vocab_padded // tp
    # Number of ids of each shard among the first i of the order; the prefix fits while no shard
    # count exceeds shard_width.
    onehot_shard = order // width
    running = np.zeros((len(order), tp), dtype=np.int64)
    running[np.arange(len(order)), onehot_shard] = 1
    running = np.cumsum(running, axis=0)
    over = np.flatnonzero((running > shard_width).any(axis=1))
    length = int(over[0]) if len(over) else len(order)
    return np.sort(order[:length])


def equal_size_coverage(
    counts: np.ndarray,
    forced_ids: Iterable[int],
    *,
    compressed_vocab_size: int,
    teacher_vocab_padded: int,
    tp: int,
) -> dict[str, float | int]:
    """Corpus coverage of the balanced and of the global selection at the same student vocabulary
    ``V' = compressed_vocab_size`` (both laid out by the shard rule at ``tp``): the balanced one
    keeps the top ``V'/tp`` ids of each teacher shard; the global one keeps the longest global
    top-K that fits ``V'/tp`` slots per shard. Also how many kept ids of each were never seen in
    the corpus (count 0), forced ids (special, verbalizer, force-keep) not counted."""
    counts = np.asarray(counts)
    forced = list(forced_ids)
    shard_width = compressed_vocab_size // tp
    balanced = select_kept_balanced(
        counts, compressed_vocab_size, forced, teacher_vocab_padded=teacher_vocab_padded, tp=tp
    )
    global_ = global_prefix_fitting(
        counts, forced, teacher_vocab_padded=teacher_vocab_padded, tp=tp, shard_width=shard_width
    )
    total = max(1, int(counts.sum()))
    forced_set = np.asarray(sorted({int(i) for i in forced}), dtype=np.int64)

    def unseen(kept: np.ndarray) -> int:
        chosen = np.setdiff1d(kept, forced_set)
        return int((counts[chosen] == 0).sum())

    return {
        "compressed_vocab_size": int(compressed_vocab_size),
        "balanced_kept": int(len(balanced)),
        "balanced_coverage": int(counts[balanced].sum()) / total,
        "balanced_unseen_kept": unseen(balanced),
        "global_kept": int(len(global_)),
        "global_coverage": int(counts[global_].sum()) / total,
        "global_unseen_kept": unseen(global_),
    }
