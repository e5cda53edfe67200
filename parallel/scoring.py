"""Log-likelihood scoring of option continuations with a megatron-core GPT model (TP/PP/DP).

:class:`Scorer` implements the ``loglikelihood`` contract of
:class:`gkd_cli.superglue.LogLikelihoodModel` (structurally; ``parallel/`` does not import
``gkd_cli``): a request is ``(context ids, [option ids, ...])`` and the answer, per option, is
``(sum of log p(option token | context, earlier option tokens), number of option tokens)`` under
the model's softmax over its real vocabulary (the tensor-parallel padding of the vocabulary, and
any ids the caller excludes, get probability 0).

Shared-context packing
----------------------
A request's context is run once for all its options. One packed row holds the context followed by
every option's tokens, ``[c_0 .. c_{C-1} | o1_0 .. o1_{L1-1} | o2_0 .. | ...]``, with

* an explicit attention mask (megatron's ``[b, 1, s, s]`` bool, True = masked): a context token
  sees the context up to itself; a token of option k sees the whole context and option k up to
  itself, never another option;
* position ids restarting at ``C`` for every option, so option k's token j sits at position
  ``C + j`` as it would in ``context + option_k`` alone. Learned absolute positions read them
  directly; for RoPE, a forward hook on the model's rotary embedding turns megatron's
  ``arange(s)`` table into per-token angles ``[s, b, 1, d]`` gathered at the position ids (RoPE
  only depends on relative positions, so scores equal the unpacked ones).

Leading tokens common to all options (ReCoRD's options are the query with each candidate entity
filled in, so they share the query up to the entity) join the shared part: they are run once and
their log-probabilities count in every option's sum. The log-probability of an option's first
own token is read at the shared part's last position. Each option is thus scored exactly as if
``context + option`` were run alone (up to float rounding; the tests compare with naive
per-option scoring), at the cost of ``C + P + sum(L_k - P)`` instead of ``sum(C + L_k)`` tokens
(``P``: the common leading tokens).

Only the hidden states at scored positions go through the output layer (a forward pre-hook
selects them), so the ``[s, b, V/tp]`` logits of context tokens are never materialized.
Log-probabilities come from megatron's ``vocab_parallel_cross_entropy`` on the vocab-sharded
logits ``[n, V/tp]`` (nothing vocab-sized crosses ranks).

Limits: when the context plus all options would exceed ``seq_length``, the options are split over
several rows that each repeat the context (recomputed once per row, not per option). A context
longer than ``seq_length - longest option`` is truncated from the LEFT (the tokens nearest the
options are kept; few-shot prefixes go first). An option longer than ``seq_length - 1`` tokens is
scored like a rolling window: in chunks of ``seq_length // 2`` tokens, each chunk in its own row
after the last ``seq_length - chunk`` tokens of ``context + option`` before it (every token is
conditioned on at least ``seq_length // 2`` preceding tokens, or all of them when fewer). The
local (non-Transformer-Engine) layer spec is used because it honours an arbitrary attention mask;
its checkpoint keys map to Transformer Engine's, so checkpoints trained with either load.

Batching is deterministic: rows are sorted by length (longest first, ties by request order) and cut
into micro-batches of ``micro_batch_size`` rows; micro-batch m runs on data-parallel replica
``m % dp``; results come back in request order on every rank (one float64 all-reduce per call).
With pp > 1, ``microbatches_per_step`` consecutive micro-batches go through one 1F1B forward-only
schedule, padded to that group's longest row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from parallel.config import ModelArch
from parallel.distributed import ParallelContext

log = logging.getLogger(__name__)

Request = tuple[list[int], list[list[int]]]
"""``(context ids, [continuation ids of each option])``."""

CONTEXT_SEGMENT = -1
"""Segment id of context tokens in a packed row (options are 0, 1, ...)."""
PAD_SEGMENT = -2
"""Segment id of padding tokens."""


@dataclass(frozen=True, kw_only=True)
class PackedRow:
    """One model input row: a (possibly truncated) context followed by some options."""

    request: int
    """Index of the request in the call."""
    tokens: list[int]
    """Token ids, context then options."""
    positions: list[int]
    """Position id of each token (options restart at the context length)."""
    segments: list[int]
    """Per token: :data:`CONTEXT_SEGMENT`, or the index of the option it belongs to."""
    targets: list[tuple[int, int, int]]
    """Scored tokens: ``(index of the predicting position, token id, option index)``."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The packed rows of a call and what truncation did."""

    rows: list[PackedRow]
    """Rows in request order (a request may span several rows)."""
    truncated_requests: int
    """Requests whose context was cut from the left to fit ``seq_length``."""
    dropped_context_tokens: int
    """Context tokens removed by that truncation, over all requests."""
    split_options: int = 0
    """Options longer than ``seq_length - 1`` tokens, scored in chunks."""


def plan_rows(
    requests: Sequence[Request],
    *,
    seq_length: int,
    share_context: bool = True,
    drop_final_token: bool = False,
) -> Plan:
    """Pack ``requests`` into rows of at most ``seq_length`` tokens (see the module docstring).

    ``share_context`` False gives the naive layout: one row ``context + option`` per option.
    Options longer than ``seq_length - 1`` tokens are scored in chunks of ``seq_length // 2``
    tokens, each in its own row after the last ``seq_length - chunk`` tokens of
    ``context + option[:chunk start]``.

    ``drop_final_token`` leaves each option's last token out of the row: it is only ever a target,
    never an input another target needs. A row then holds ``context + option[:-1]``, so an option
    of up to ``seq_length`` tokens fits and a context is cut to ``seq_length + 1 - len(option)``
    tokens, as lm-evaluation-harness's ``hf`` model cuts ``(context + continuation)[-(L + 1):]``
    to an input of ``L`` tokens.
    """
    if seq_length < 2:
        raise ValueError(
            f"seq_length must be >= 2 (one context and one option token), got {seq_length}"
        )
    rows: list[PackedRow] = []
    truncated = dropped = split = 0
    for number, (context, options) in enumerate(requests):
        if not options:
            raise ValueError(f"request {number} has no options")
        if not context:
            raise ValueError(
                f"request {number} has an empty context; the first option token needs one to condition on"
            )
        for index, option in enumerate(options):
            if not option:
                raise ValueError(f"request {number}, option {index} has no tokens")
        context = [int(t) for t in context]
        slack = 1 if drop_final_token else 0  # the option token that the row leaves out
        longest = seq_length - 1 + slack
        fitting = [i for i, option in enumerate(options) if len(option) <= longest]
        if fitting:
            keep = seq_length + slack - max(len(options[i]) for i in fitting)
            kept = context
            if len(context) > keep:
                truncated += 1
                dropped += len(context) - keep
                kept = context[-keep:]
            prefix = _common_prefix([options[i] for i in fitting]) if share_context else 0
            groups: list[list[int]] = []
            used = 0
            for index in fitting:
                length = len(options[index]) - prefix - slack
                if share_context and groups and used + length <= seq_length:
                    groups[-1].append(index)
                    used += length
                else:
                    groups.append([index])
                    used = len(kept) + prefix + length
            for group in groups:
                rows.append(
                    _pack(
                        number,
                        kept,
                        [(index, options[index]) for index in group],
                        prefix=prefix,
                        drop_final_token=drop_final_token,
                    )
                )
        for index, option in enumerate(options):
            if len(option) <= longest:
                continue
            split += 1
            chunk = seq_length // 2
            for begin in range(0, len(option), chunk):
                piece = list(option[begin : begin + chunk])
                window = (context + [int(t) for t in option[:begin]])[-(seq_length - len(piece)) :]
                rows.append(
                    _pack(number, window, [(index, piece)], drop_final_token=drop_final_token)
                )
    return Plan(
        rows=rows, truncated_requests=truncated, dropped_context_tokens=dropped, split_options=split
    )


def _common_prefix(options: Sequence[Sequence[int]]) -> int:
    """Leading tokens shared by all of several options, leaving each at least one of its own."""
    if len(options) < 2:
        return 0
    length = min(len(option) for option in options) - 1
    for j in range(length):
        if any(option[j] != options[0][j] for option in options[1:]):
            return j
    return max(length, 0)


def _pack(
    number: int,
    context: list[int],
    options: Sequence[tuple[int, Sequence[int]]],
    *,
    prefix: int = 0,
    drop_final_token: bool = False,
) -> PackedRow:
    """A row: ``context``, the options' first ``prefix`` tokens (common to all of them, run once
    as part of the shared context), then each ``(option index, tokens)``'s remaining tokens
    (without its last one with ``drop_final_token``: that token is a target only)."""
    shared = list(context) + [int(t) for t in options[0][1][:prefix]]
    length = len(shared)
    tokens = list(shared)
    positions = list(range(length))
    segments = [CONTEXT_SEGMENT] * length
    targets = []
    for index, option in options:
        # The shared leading tokens: predicted inside the shared part, once per option's total.
        for j in range(prefix):
            targets.append((len(context) - 1 + j, int(option[j]), index))
        start = len(tokens)
        rest = option[prefix:]
        for j, token in enumerate(rest):
            # The first own token is predicted by the shared part's last position.
            targets.append((length - 1 if j == 0 else start + j - 1, int(token), index))
        inputs = rest[:-1] if drop_final_token else rest
        tokens.extend(int(t) for t in inputs)
        positions.extend(range(length, length + len(inputs)))
        segments.extend([index] * len(inputs))
    return PackedRow(
        request=number, tokens=tokens, positions=positions, segments=segments, targets=targets
    )


def batch_tensors(
    rows: Sequence[PackedRow], *, seq_length: int, num_rows: int, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Model inputs for ``rows`` padded to ``num_rows`` x ``seq_length``.

    Returns ``input_ids`` and ``position_ids`` ``[b, s]`` int64, ``attention_mask`` ``[b, 1, s, s]``
    bool (True = masked: key j is hidden from query i unless j <= i and j is a context token or in
    i's own segment), and the scored tokens: ``target_rows``, ``target_positions``,
    ``target_ids`` ``[n]`` int64.
    """
    if len(rows) > num_rows or any(len(row.tokens) > seq_length for row in rows):
        raise ValueError("rows do not fit the requested batch shape")
    tokens = torch.full((num_rows, seq_length), pad_id, dtype=torch.long)
    positions = torch.zeros((num_rows, seq_length), dtype=torch.long)
    segments = torch.full((num_rows, seq_length), PAD_SEGMENT, dtype=torch.long)
    target_rows, target_positions, target_ids = [], [], []
    for b, row in enumerate(rows):
        n = len(row.tokens)
        tokens[b, :n] = torch.tensor(row.tokens, dtype=torch.long)
        positions[b, :n] = torch.tensor(row.positions, dtype=torch.long)
        segments[b, :n] = torch.tensor(row.segments, dtype=torch.long)
        for position, token, _ in row.targets:
            target_rows.append(b)
            target_positions.append(position)
            target_ids.append(token)
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    visible = causal & ((key == CONTEXT_SEGMENT) | (key == query))
    return {
        "input_ids": tokens,
        "position_ids": positions,
        "attention_mask": (~visible).unsqueeze(1),
        "target_rows": torch.tensor(target_rows, dtype=torch.long),
        "target_positions": torch.tensor(target_positions, dtype=torch.long),
        "target_ids": torch.tensor(target_ids, dtype=torch.long),
    }


class Scorer:
    """Scores option continuations with this rank's shard of a GPT model (collective: every rank
    of the job calls :meth:`loglikelihood` with the same requests).

    ``Scorer(ctx, arch, checkpoint_folder)`` builds the model at the current TP/PP layout and
    loads a gkd checkpoint saved at any layout; :meth:`for_model` wraps a model already built
    (tests, evaluation during training).
    """

    def __init__(
        self,
        ctx: ParallelContext,
        arch: ModelArch,
        checkpoint_folder: str | Path,
        *,
        micro_batch_size: int = 8,
        seq_length: int | None = None,
        params_dtype: torch.dtype = torch.float32,
        share_context: bool = True,
        excluded_token_ids: Sequence[int] | np.ndarray | None = None,
        microbatches_per_step: int | None = None,
        drop_final_token: bool = False,
    ) -> None:
        from parallel import checkpoint as ckpt
        from parallel.model import build_gpt

        folder = ckpt.resolve(checkpoint_folder)
        meta = ckpt.read_meta(folder)
        self.checkpoint: Path | None = folder
        """The resolved checkpoint folder (None for :meth:`for_model`)."""
        saved = meta.get("arch")
        if saved is not None:
            mismatched = {
                k: (saved[k], v) for k, v in vars(arch).items() if k in saved and saved[k] != v
            }
            if mismatched:
                details = ", ".join(
                    f"{k}: checkpoint {a!r} vs given {b!r}" for k, (a, b) in mismatched.items()
                )
                raise ckpt.CheckpointError(
                    f"checkpoint {folder} has another architecture ({details})"
                )
        arch.check_parallel(ctx.tp, ctx.pp, where="model")
        ckpt.verify_manifest(folder, checksums=False)
        model = build_gpt(arch, params_dtype=params_dtype, use_te=False)
        ckpt.load_model_weights(folder, model)
        self._setup(
            ctx,
            arch,
            model,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            share_context=share_context,
            excluded_token_ids=excluded_token_ids,
            microbatches_per_step=microbatches_per_step,
            drop_final_token=drop_final_token,
        )

    @classmethod
    def for_model(
        cls,
        ctx: ParallelContext,
        arch: ModelArch,
        model: torch.nn.Module,
        *,
        micro_batch_size: int = 8,
        seq_length: int | None = None,
        share_context: bool = True,
        excluded_token_ids: Sequence[int] | np.ndarray | None = None,
        microbatches_per_step: int | None = None,
        drop_final_token: bool = False,
    ) -> Scorer:
        """A scorer over ``model`` (this rank's GPTModel shard of ``arch``, built with the local
        layer spec: Transformer Engine's attention ignores the packed attention mask)."""
        scorer = cls.__new__(cls)
        scorer.checkpoint = None
        scorer._setup(
            ctx,
            arch,
            model,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            share_context=share_context,
            excluded_token_ids=excluded_token_ids,
            microbatches_per_step=microbatches_per_step,
            drop_final_token=drop_final_token,
        )
        return scorer

    def _setup(
        self,
        ctx: ParallelContext,
        arch: ModelArch,
        model: torch.nn.Module,
        *,
        micro_batch_size: int,
        seq_length: int | None,
        share_context: bool,
        excluded_token_ids,
        microbatches_per_step: int | None,
        drop_final_token: bool = False,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        seq_length = arch.max_seq_len if seq_length is None else seq_length
        if not 2 <= seq_length <= arch.max_seq_len:
            raise ValueError(
                f"seq_length={seq_length} must lie in [2, max_seq_len={arch.max_seq_len}] of the model"
            )
        if microbatches_per_step is not None and microbatches_per_step < 1:
            raise ValueError(f"microbatches_per_step must be >= 1, got {microbatches_per_step}")
        self.ctx = ctx
        self.arch = arch
        self.model = model.eval()
        self.micro_batch_size = micro_batch_size
        self.seq_length = seq_length
        self.share_context = share_context
        self.drop_final_token = drop_final_token
        """Leave each option's last token out of its row (:func:`plan_rows`)."""
        self.microbatches_per_step = microbatches_per_step or (1 if ctx.pp == 1 else 2 * ctx.pp)
        self.stats = {
            "rows": 0,
            "tokens": 0,
            "padded_tokens": 0,
            "unshared_tokens": 0,
            "targets": 0,
            "truncated_requests": 0,
            "split_options": 0,
        }
        """Running totals over calls: packed rows, real tokens run, tokens run including padding,
        tokens ``context + option`` per option would have run, scored tokens, requests whose
        context was truncated, options scored in chunks."""
        self._invalid_columns = self._invalid_vocab_columns(excluded_token_ids)
        self._positions: torch.Tensor | None = None
        self._selection: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hooks = []
        rotary = getattr(model, "rotary_pos_emb", None)
        if isinstance(rotary, torch.nn.Module):
            self._hooks.append(rotary.register_forward_hook(self._rotary_at_positions))
        if ctx.is_last_stage:
            output_layer = getattr(model, "output_layer")  # noqa: B009  (a GPTModel's last stage has one)
            self._hooks.append(
                output_layer.register_forward_pre_hook(self._select_scored_hidden, with_kwargs=True)
            )

    # ------------------------------------------------------------------ hooks
    def _rotary_at_positions(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        """RoPE angles ``[s, 1, 1, d]`` for 0..s-1 -> ``[s, b, 1, d]`` at this batch's position
        ids (every position id is < s, so the table covers them)."""
        if self._positions is None:
            return None
        table = output[:, 0, 0, :]
        return table[self._positions.t()].unsqueeze(2)

    def _select_scored_hidden(self, module, args, kwargs):
        """Replace the output layer's input ``[s, b, h]`` by the scored positions ``[n, 1, h]``."""
        if self._selection is None:
            return None
        rows, positions = self._selection
        hidden = args[0][positions, rows].unsqueeze(1)
        return (hidden, *args[1:]), kwargs

    def _invalid_vocab_columns(self, excluded) -> torch.Tensor:
        """``[V_padded / tp]`` bool: this rank's logit columns that must get probability 0 (the
        vocabulary's tensor-parallel padding and ``excluded`` ids)."""
        padded = self.arch.padded_vocab(self.ctx.tp)
        invalid = torch.zeros(padded, dtype=torch.bool)
        invalid[self.arch.vocab_size :] = True
        if excluded is not None:
            ids = torch.as_tensor(np.asarray(excluded, dtype=np.int64))
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.arch.vocab_size):
                raise ValueError(f"excluded_token_ids must lie in [0, {self.arch.vocab_size})")
            invalid[ids] = True
        shard = padded // self.ctx.tp
        local = invalid[self.ctx.tp_rank * shard : (self.ctx.tp_rank + 1) * shard]
        return local.to(self.ctx.device)

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: list[Request]) -> list[list[tuple[float, int]]]:
        """Per request, per option: ``(sum of log-probabilities, number of option tokens)``.

        The count is that of the option's tokens as given (truncation only ever shortens the
        context)."""
        per_token = self.token_logprobs(requests)
        return [[(float(sum(values)), len(values)) for values in options] for options in per_token]

    def token_logprobs(self, requests: list[Request]) -> list[list[list[float]]]:
        """Per request, per option, the log-probability of each option token (natural log)."""
        return [
            [[value for value, _ in option] for option in options]
            for options in self.token_scores(requests)
        ]

    @torch.no_grad()
    def token_scores(self, requests: list[Request]) -> list[list[list[tuple[float, int]]]]:
        """Per request, per option, per option token: ``(log-probability, most likely token id)``
        at the position that predicts it (the argmax over the real vocabulary minus the excluded
        ids; the lowest id among equal maxima). A token is the greedy choice when it equals that
        id; the argmax after an option's last token is not computed (append a token to get it)."""
        plan = plan_rows(
            requests,
            seq_length=self.seq_length,
            share_context=self.share_context,
            drop_final_token=self.drop_final_token,
        )
        if plan.truncated_requests:
            log.warning(
                "%d of %d requests did not fit %d tokens: %d context tokens cut from the left",
                plan.truncated_requests,
                len(requests),
                self.seq_length,
                plan.dropped_context_tokens,
            )
        if plan.split_options:
            log.warning(
                "%d options are longer than the %d-token window: scored in chunks of %d tokens",
                plan.split_options,
                self.seq_length,
                self.seq_length // 2,
            )
        rows = plan.rows
        offsets, total = [], 0
        for row in rows:
            offsets.append(total)
            total += len(row.targets)
        values = torch.zeros((2, total), dtype=torch.float64, device=self.ctx.device)

        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].tokens), i))
        microbatches = [
            order[i : i + self.micro_batch_size]
            for i in range(0, len(order), self.micro_batch_size)
        ]
        mine = microbatches[self.ctx.dp_rank :: self.ctx.dp]
        owner = self.ctx.is_last_stage and self.ctx.tp_rank == 0
        for start in range(0, len(mine), self.microbatches_per_step):
            group = mine[start : start + self.microbatches_per_step]
            outputs = self._run_group([[rows[i] for i in mb] for mb in group])
            if owner:
                for mb, (logprobs, argmax) in zip(group, outputs, strict=True):
                    index = torch.cat(
                        [torch.arange(offsets[i], offsets[i] + len(rows[i].targets)) for i in mb]
                    ).to(self.ctx.device)
                    values[0, index] = logprobs.to(torch.float64)
                    values[1, index] = argmax.to(torch.float64)  # ids < 2**53: exact
        if self.ctx.world_size > 1:
            dist.all_reduce(values)
        logprob_list, argmax_list = values.cpu().tolist()

        answers: list[list[list[tuple[float, int]]]] = [
            [[] for _ in options] for _, options in requests
        ]
        for row, offset in zip(rows, offsets, strict=True):
            for k, (_, _, option) in enumerate(row.targets):
                answers[row.request][option].append(
                    (logprob_list[offset + k], int(argmax_list[offset + k]))
                )
        self.stats["rows"] += len(rows)
        self.stats["tokens"] += sum(len(row.tokens) for row in rows)
        self.stats["unshared_tokens"] += sum(
            len(context) * len(options) + sum(map(len, options)) for context, options in requests
        )
        self.stats["targets"] += total
        self.stats["truncated_requests"] += plan.truncated_requests
        self.stats["split_options"] += plan.split_options
        return answers

    def _run_group(self, group: list[list[PackedRow]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run micro-batches through one forward-only schedule; on the last stage return each
        micro-batch's target log-probabilities ``[n]`` (float32) and argmax ids ``[n]`` (int64),
        elsewhere an empty list."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        length = max(len(row.tokens) for mb in group for row in mb)
        num_rows = self.micro_batch_size if self.ctx.pp > 1 else max(len(mb) for mb in group)
        batches = [batch_tensors(mb, seq_length=length, num_rows=num_rows) for mb in group]
        self.stats["padded_tokens"] += length * num_rows * len(batches)
        results = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(batches),
            model=[self.model],
            num_microbatches=len(batches),
            seq_length=length,
            micro_batch_size=num_rows,
            forward_only=True,
        )
        self._positions = self._selection = None
        if not self.ctx.is_last_stage:
            return []
        return [(result["logprobs"], result["argmax"]) for result in results]

    def _forward_step(self, data_iterator: Iterator[dict], model):
        device = self.ctx.device
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        self._positions = batch["position_ids"]
        self._selection = (batch["target_rows"], batch["target_positions"])
        output = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        )
        return output, lambda logits: self._target_logprobs(logits, batch["target_ids"])

    def _target_logprobs(self, logits: torch.Tensor, target_ids: torch.Tensor):
        """``logits``: ``[1, n, V/tp]``, vocab-sharded over the tp group (the scored positions
        only); ``target_ids``: ``[n]`` global token ids. Returns the schedule's
        ``(dummy loss, {"logprobs": [n] float32, "argmax": [n] int64})``."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = logits.float().masked_fill(self._invalid_columns, float("-inf"))
        argmax = self._vocab_parallel_argmax(logits[0].detach())
        nll = vocab_parallel_cross_entropy(logits, target_ids.unsqueeze(0))
        logprobs = -nll[0]
        return torch.zeros((), device=logits.device), {
            "logprobs": logprobs.detach(),
            "argmax": argmax,
        }

    def _vocab_parallel_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[n, V/tp]`` (this rank's vocabulary shard) -> global argmax ids ``[n]``:
        the largest logit over all shards, the lowest id among equal maxima."""
        best, local = logits.max(dim=-1)
        ids = local + self.ctx.tp_rank * logits.shape[-1]
        if self.ctx.tp == 1:
            return ids
        top = best.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.ctx.tp_group)
        candidate = torch.where(best == top, ids, torch.full_like(ids, torch.iinfo(ids.dtype).max))
        dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=self.ctx.tp_group)
        return candidate

    def close(self) -> None:
        """Remove the hooks this scorer installed on the model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
