"""Which slices of which Hugging Face tensors make each megatron-core parameter of one rank.

Pure bookkeeping (no torch): :func:`shard_plan` returns, for every parameter of a rank's GPTModel
shard (local layer-spec names), the list of :class:`Piece` s to copy into it. The decoder layers,
the replicated tensors of the first and last stage and the Hugging Face names come from the
model's family (:mod:`parallel.families`, where megatron-core's conventions are written down);
this module adds what every family shares: the vocabulary, padded to a multiple of 128 x tp and
split in equal row blocks (padded rows hold zeros), and the output layer (``lm_head``, or the last
stage's copy of a tied embedding).
"""

from __future__ import annotations

from collections.abc import Sequence

from parallel.config import ModelArch
from parallel.families.base import HFModelSpec, Piece, Range, split

__all__ = ["Piece", "expected_shapes", "shard_plan"]


def expected_shapes(spec: HFModelSpec, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the conversion reads, with the full shape ``config.json``
    implies."""
    shapes = spec.family.expected_shapes(spec.arch, prefix)
    if not spec.arch.tie_embeddings:
        shapes["lm_head.weight"] = (spec.arch.vocab_size, spec.arch.hidden_size)
    return shapes


def _vocab_rows(arch: ModelArch, tp_rank: int, tp_size: int) -> Range | None:
    """The real (unpadded) vocabulary rows of rank ``tp_rank``'s padded shard, or ``None`` when
    the shard is all padding."""
    start, end = split(arch.padded_vocab(tp_size), tp_rank, tp_size)
    end = min(end, arch.vocab_size)
    return (start, end) if start < end else None


def _vocab_pieces(source: str, arch: ModelArch, tp_rank: int, tp_size: int) -> list[Piece]:
    rows = _vocab_rows(arch, tp_rank, tp_size)
    return [Piece(source, rows=rows)] if rows else []


def shard_plan(
    spec: HFModelSpec,
    *,
    tp_rank: int,
    tp_size: int,
    layers: Sequence[tuple[int, int]],
    pre_process: bool,
    post_process: bool,
    prefix: str = "",
) -> dict[str, list[Piece]]:
    """Pieces of every parameter of one rank's GPTModel (local layer-spec names).

    ``layers``: ``(local index, global layer index)`` of the decoder layers this pipeline stage
    holds. ``pre_process``/``post_process``: the stage holds the embedding / the final norm and
    output layer. A parameter with no piece for some rows (vocabulary padding) gets zeros there.
    """
    arch, family = spec.arch, spec.family
    plan: dict[str, list[Piece]] = {}
    for local, global_index in layers:
        layer_plan = family.layer_plan(arch, global_index, tp_rank, tp_size, prefix)
        plan.update({f"decoder.layers.{local}.{k}": v for k, v in layer_plan.items()})
    embedding = family.embedding_name(prefix)
    if pre_process:
        plan["embedding.word_embeddings.weight"] = _vocab_pieces(embedding, arch, tp_rank, tp_size)
        for ours, theirs in family.first_stage_tensors(prefix).items():
            plan[ours] = [Piece(theirs)]
    if post_process:
        for ours, theirs in family.last_stage_tensors(prefix).items():
            plan[ours] = [Piece(theirs)]
        if not arch.tie_embeddings:
            plan["output_layer.weight"] = _vocab_pieces("lm_head.weight", arch, tp_rank, tp_size)
        elif not pre_process:
            # Tied embeddings across pipeline stages: the last stage keeps its own copy of the
            # embedding as the output layer (megatron syncs the two copies' gradients).
            plan["output_layer.weight"] = _vocab_pieces(embedding, arch, tp_rank, tp_size)
    return plan
