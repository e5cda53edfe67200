"""Per-example views of a microbatch's tokens: pooling per example and answer positions.

Tokens are flattened s-major like the logits, labels and masks of :class:`methods.base.LossContext`:
token ``(i, r)`` (position ``i`` of row ``r`` of a ``[s, b]`` grid) has flat index ``i * b + r``.
``example_ids [N]`` (int64) numbers the examples of the microbatch ``0 .. E-1`` and is ``-1`` on
padding. An example never straddles rows, so within one example a larger flat index is a later
position, and the next position of flat index ``k`` is ``k + b``.

Pure torch: everything here is differentiable where it returns features (``index_add`` and
gathers), and works on any device.
"""

from __future__ import annotations

from typing import Literal

import torch

Tensor = torch.Tensor
ExamplePooling = Literal["first", "last", "mean"]


def count_examples(example_ids: Tensor) -> int:
    """``E``: one more than the largest example id (0 for a microbatch of padding only)."""
    if example_ids.numel() == 0:
        return 0
    return int(example_ids.max().item()) + 1


def column_ids(num_tokens: int, batch_size: int, device: torch.device | None = None) -> Tensor:
    """The ids that make every row of the ``[s, b]`` grid one segment (flat ``k`` -> ``k % b``):
    per-window pooling, what methods did before example-aware batches."""
    return torch.arange(num_tokens, device=device) % batch_size


def _flat(features: Tensor, num_tokens: int) -> Tensor:
    """``[s, b, ...]`` or ``[N, ...]`` -> ``[N, ...]`` (s-major). At micro batch size 1 an
    ``[s, 1, ...]`` tensor has ``s == N`` rows too: a size-1 second axis of a 3+-d tensor is the
    batch axis."""
    if features.shape[0] == num_tokens and not (features.dim() >= 3 and features.shape[1] == 1):
        return features
    flat = features.reshape(-1, *features.shape[2:])
    if flat.shape[0] != num_tokens:
        raise ValueError(
            f"features of shape {tuple(features.shape)} do not have the microbatch's "
            f"{num_tokens} tokens (need [s, b, ...] or [s*b, ...], s-major)"
        )
    return flat


def pool_by_example(
    features: Tensor,
    example_ids: Tensor,
    how: ExamplePooling,
    *,
    mask: Tensor | None = None,
    num_examples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """One vector per example.

    Args:
        features: ``[s, b, h]`` or ``[N, h]`` (s-major).
        example_ids: ``[N]`` int64, ``-1`` on padding.
        how: ``first`` (the example's first counted token), ``last`` (its last counted token) or
            ``mean`` (the mean over its counted tokens).
        mask: ``[N]`` (or ``[s, b]``), > 0 for the tokens that count; ``None``: every token of
            the example.
        num_examples: ``E`` when known (else one more than the largest id).

    Returns:
        ``([E, h] pooled vectors, [E] bool: the example has a counted token)``; examples without
        any get a zero vector.
    """
    ids = example_ids.reshape(-1)
    n = ids.numel()
    flat = _flat(features, n)
    count = count_examples(ids) if num_examples is None else num_examples
    counted = ids >= 0
    if mask is not None:
        counted = counted & (mask.reshape(-1).to(flat.device) > 0)
    index = torch.nonzero(counted).squeeze(1)
    owner = ids[index]
    tokens = torch.zeros(count, dtype=torch.long, device=flat.device).index_add_(
        0, owner, torch.ones_like(owner)
    )
    valid = tokens > 0
    width = flat.shape[1:]
    if how == "mean":
        summed = torch.zeros((count, *width), dtype=flat.dtype, device=flat.device).index_add(
            0, owner, flat[index]
        )
        scale = tokens.clamp_min(1).to(flat.dtype).reshape(-1, *([1] * len(width)))
        return summed / scale, valid
    if how in ("first", "last"):
        reduce = "amin" if how == "first" else "amax"
        fill = n if how == "first" else -1
        chosen = torch.full((count,), fill, dtype=torch.long, device=flat.device)
        chosen = chosen.scatter_reduce(0, owner, index, reduce=reduce, include_self=True)
        safe = torch.where(valid, chosen, torch.zeros_like(chosen))
        shape = (-1, *([1] * len(width)))
        return flat[safe] * valid.to(flat.dtype).reshape(shape), valid
    raise ValueError(f"pooling must be 'first', 'last' or 'mean', got {how!r}")


def answer_positions(
    example_ids: Tensor,
    loss_mask: Tensor,
    batch_size: int,
    *,
    num_examples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Where each example's answer starts: ``(last_prompt [E], first_target [E])`` flat indices.

    ``last_prompt`` is the example's first position whose label counts (``loss_mask > 0``): the
    last context token, whose prediction is the first target token. ``first_target`` is the
    position of that first target token (``last_prompt + b``). Both are ``-1`` for an example
    without targets. For a plain-text example (every token a target) they are its first and
    second positions.
    """
    ids = example_ids.reshape(-1)
    n = ids.numel()
    count = count_examples(ids) if num_examples is None else num_examples
    counted = (ids >= 0) & (loss_mask.reshape(-1).to(ids.device) > 0)
    index = torch.nonzero(counted).squeeze(1)
    first = torch.full((count,), n, dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, ids[index], index, reduce="amin", include_self=True)
    missing = first >= n
    last_prompt = torch.where(missing, torch.full_like(first, -1), first)
    first_target = torch.where(missing, torch.full_like(first, -1), first + batch_size)
    return last_prompt, first_target


def per_example_mean(values: Tensor, example_ids: Tensor, weights: Tensor, count: int) -> Tensor:
    """``[E]``: the ``weights``-weighted mean of per-token ``values [N]`` over each example's
    tokens (0 for an example whose weights sum to 0)."""
    ids = example_ids.reshape(-1)
    keep = ids >= 0
    owner = ids[keep]
    w = weights.reshape(-1)[keep].to(values.dtype)
    sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(
        0, owner, values.reshape(-1)[keep] * w
    )
    norm = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, owner, w)
    return sums / norm.clamp_min(1e-12)
