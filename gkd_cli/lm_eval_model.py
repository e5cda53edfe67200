"""gkd's runtime as an lm-evaluation-harness model (``lm_eval`` 0.4.x), registered as ``gkd``.

:class:`GkdLM` answers lm-eval's three request types with a :class:`parallel.scoring.Scorer`:

* ``loglikelihood`` (context, continuation) -> ``(sum of log p, is_greedy)``: tokenized as
  lm-eval's ``hf`` model does (lm-eval's ``TemplateLM``: trailing spaces of the context move to
  the continuation, ``context + continuation`` is encoded whole and split after the context's
  tokens; an empty context is the prefix token). Texts are encoded with the tokenizer's own
  special-token convention (:func:`gkd_cli.eval_worker.prompt_prefix`: BOS when the tokenizer
  adds one, as ``AutoTokenizer(...).encode`` does), unless the text already starts with it;
  ``add_bos`` overrides that as ``gkd eval superglue --add-bos/--no-add-bos`` does. A context is
  cut from the left so that ``context + continuation`` holds at most ``max_length + 1`` tokens
  (the model runs ``max_length``: the last continuation token is only a target), as ``hf`` does.
* ``loglikelihood_rolling`` (text) -> sum of log p over the whole text, in lm-eval's own rolling
  windows (``lm_eval.utils.get_rolling_token_windows`` with the model's ``max_length``, one token of
  context, the prefix token first).
* ``generate_until`` (context, {until, max_gen_toks}) -> greedy continuation: the context is cut
  from the left to ``max_length - max_gen_toks`` tokens, then each step runs the whole sequence
  (no key/value cache: simple, not fast) and appends the argmax token, until the end-of-document
  token, a stop string or ``max_gen_toks`` tokens; the text is cut before the first stop string.
  Sampling (``do_sample``, a temperature above 0) is refused.

Requests with the same context go to the scorer as one request with several options (one row
runs the context once; see :mod:`parallel.scoring`) when no truncation is involved.

Any TP/PP/DP layout: :class:`ScoringService` makes the scoring collective. Rank 0 runs lm-eval and
broadcasts every batch of token requests to all ranks before scoring it; the other ranks wait in
:meth:`ScoringService.serve` and score what they receive, until rank 0 sends stop
(:mod:`gkd_cli.lm_eval_worker` runs this under torchrun; ``gkd eval lm-eval`` starts it).

``lm_eval.simple_evaluate(model="gkd", model_args="checkpoint=DIR[,tokenizer=PATH]")`` in one
process (TP=PP=DP=1) works after ``import gkd_cli.lm_eval_model``; it initializes a one-rank
process group when none exists (:meth:`GkdLM.create_from_arg_string`).

Importing this module imports ``lm_eval``; it raises :class:`gkd_cli.errors.ConfigError` naming
``pip install 'gkd[lm-eval]'`` when that is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gkd_cli.errors import ConfigError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as _error:  # pragma: no cover - exercised by a test that hides lm_eval
    raise ConfigError(
        f"lm-evaluation-harness is not installed ({_error}); install it with "
        "pip install 'gkd[lm-eval]'",
        field="lm_eval",
    ) from None

log = logging.getLogger("gkd.lm_eval")

TokenRequest = tuple[list[int], list[list[int]]]
"""``(context ids, [continuation ids, ...])`` in the model's id space."""
TokenScores = list[list[list[tuple[float, int]]]]
"""Per request, per continuation, per token: ``(log-probability, argmax id)``."""

DEFAULT_MAX_GEN_TOKS = 256
"""Tokens generated when a task does not say (lm-eval's ``hf`` default)."""


class ScoringService:
    """A :class:`parallel.scoring.Scorer` that rank 0 drives for every rank of the job.

    On rank 0, :meth:`token_scores` broadcasts the requests to all ranks, then scores them
    collectively; every other rank calls :meth:`serve`, which scores each broadcast batch until
    rank 0 calls :meth:`stop`. With one rank nothing is broadcast."""

    def __init__(self, scorer, ctx) -> None:
        self.scorer = scorer
        self.ctx = ctx
        self.calls = 0
        """Scoring calls made (every rank counts the same)."""

    def _broadcast(self, message: Any) -> Any:
        import torch.distributed as dist

        if self.ctx.world_size == 1:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def token_scores(self, requests: list[TokenRequest]) -> TokenScores:
        """Rank 0: score ``requests`` on all ranks (see :meth:`parallel.scoring.Scorer.token_scores`)."""
        if self.ctx.rank != 0:
            raise RuntimeError("only rank 0 sends requests; the other ranks serve()")
        self._broadcast(("score", requests))
        self.calls += 1
        return self.scorer.token_scores(requests)

    def serve(self) -> int:
        """Ranks other than 0: score broadcast requests until told to stop; returns the calls."""
        while True:
            kind, payload = self._broadcast(None)
            if kind == "stop":
                return self.calls
            self.calls += 1
            self.scorer.token_scores(payload)

    def stop(self) -> None:
        """Rank 0: release the serving ranks (call once, also after an error)."""
        if self.ctx.rank == 0:
            self._broadcast(("stop", None))


@register_model("gkd")
class GkdLM(TemplateLM):
    """lm-eval model over a :class:`ScoringService` (or anything with its ``token_scores``).

    ``encode(text)`` gives the tokenizer's ids without special tokens; ``prefix`` the ids the
    tokenizer's convention puts in front of a text; ``map_ids`` turns tokenizer ids into model ids
    (a compressed vocabulary; None: the same) and ``to_tokenizer_id`` back (for generation)."""

    def __init__(
        self,
        service,
        tokenizer,
        *,
        prefix: Sequence[int],
        prefix_token_id: int,
        max_length: int,
        map_ids: Callable[[list[int]], list[int]] | None = None,
        to_tokenizer_id: Callable[[int], int] | None = None,
        batch_size: int = 64,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.service = service
        self.gkd_tokenizer = tokenizer
        self.prefix = [int(t) for t in prefix]
        self._prefix_token_id = int(prefix_token_id)
        self._max_length = int(max_length)
        self.map_ids = map_ids
        self.to_tokenizer_id = to_tokenizer_id
        self.batch_size = batch_size
        self._max_gen_toks = max_gen_toks
        self._prefix_text = tokenizer.decode([self._prefix_token_id], skip_special_tokens=False)

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return int(self.gkd_tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window start with: the BOS token, else the
        end-of-document token (lm-eval's ``hf`` convention)."""
        return self._prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """The tokenizer's ids of ``string``, after the prefix when ``add_special_tokens`` is True,
        or None and ``string`` does not already start with the prefix token's text."""
        ids = list(self.gkd_tokenizer.encode(string))
        if add_special_tokens is None:
            add_special_tokens = not (self._prefix_text and string.startswith(self._prefix_text))
        return [*self.prefix, *ids] if add_special_tokens else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.gkd_tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    def _model_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in ids]
        return self.map_ids(ids) if self.map_ids is not None else ids

    def _score_pairs(
        self, pairs: Sequence[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool]]:
        """``(context ids, continuation ids)`` (tokenizer ids) -> ``(sum log p, is_greedy)``.

        Contexts are cut so that ``context + continuation`` holds at most ``max_length + 1``
        tokens; pairs with the same (uncut) context share one scorer request."""
        answers: list[tuple[float, bool] | None] = [None] * len(pairs)
        for start in range(0, len(pairs), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(pairs)))
            requests: list[TokenRequest] = []
            owners: list[list[int]] = []
            shared: dict[tuple[int, ...], int] = {}
            for i in chunk:
                context, continuation = pairs[i]
                if not continuation:
                    answers[i] = (0.0, True)
                    continue
                keep = max(1, self._max_length + 1 - len(continuation))
                cut = context[-keep:]
                key = tuple(context)
                if len(cut) == len(context) and key in shared:
                    slot = shared[key]
                    fits = len(context) + max(
                        len(continuation), *(len(pairs[j][1]) for j in owners[slot])
                    )
                    if fits <= self._max_length + 1:
                        requests[slot][1].append(self._model_ids(continuation))
                        owners[slot].append(i)
                        continue
                if len(cut) == len(context):
                    shared[key] = len(requests)
                requests.append((self._model_ids(cut), [self._model_ids(continuation)]))
                owners.append([i])
            if not requests:
                continue
            scores = self.service.token_scores(requests)
            for request, options, indices in zip(requests, scores, owners, strict=True):
                for option_ids, tokens, i in zip(request[1], options, indices, strict=True):
                    total = sum(value for value, _ in tokens)
                    greedy = all(
                        best == token for (_, best), token in zip(tokens, option_ids, strict=True)
                    )
                    answers[i] = (float(total), bool(greedy))
        return [answer if answer is not None else (0.0, True) for answer in answers]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``[((context, continuation), context ids, continuation ids), ...]`` ->
        ``[(log-likelihood, is_greedy), ...]`` (lm-eval's ``TemplateLM`` contract)."""
        results = self._score_pairs([(list(c), list(k)) for _, c, k in requests])
        for (strings, _, _), result in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Per text, the log-likelihood of all its tokens in lm-eval's rolling windows."""
        windows: list[tuple[list[int], list[int]]] = []
        counts = []
        for (text,) in [request.args for request in requests]:
            pieces = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            windows.extend(pieces)
            counts.append(len(pieces))
        scores = self._score_pairs(windows)
        results, at = [], 0
        for (text,), count in zip([request.args for request in requests], counts, strict=True):
            value = float(sum(score for score, _ in scores[at : at + count]))
            at += count
            results.append(value)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
        return results

    # ------------------------------------------------------------------ generation
    def _tokenizer_id(self, model_id: int) -> int:
        return self.to_tokenizer_id(model_id) if self.to_tokenizer_id is not None else model_id

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (see the module docstring); requests with the same settings run
        together, one token each per scoring call."""
        groups: dict[str, list[int]] = {}
        settings = []
        for index, request in enumerate(requests):
            context, kwargs = request.args
            until, max_gen = self._generation_settings(dict(kwargs or {}))
            settings.append((context, until, max_gen))
            groups.setdefault(repr((until, max_gen)), []).append(index)
        outputs: list[str] = [""] * len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts = self._generate([settings[i] for i in batch])
                for i, text in zip(batch, texts, strict=True):
                    outputs[i] = text
                    context, kwargs = requests[i].args
                    self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return outputs

    def _generation_settings(self, kwargs: dict) -> tuple[tuple[str, ...], int]:
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise NotImplementedError(
                "the gkd lm-eval model generates greedily only; this task asks for sampling "
                "(do_sample / temperature > 0)"
            )
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        stops = tuple(dict.fromkeys([*until, *([eos] if eos else [])]))
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if not 1 <= max_gen < self.max_length:
            raise ValueError(
                f"max_gen_toks={max_gen} must lie in [1, {self.max_length - 1}] (the model's "
                f"max_length {self.max_length} minus at least one context token)"
            )
        return stops, max_gen

    def _generate(self, items: list[tuple[str, tuple[str, ...], int]]) -> list[str]:
        """Greedy continuations of ``(context, stop strings, max tokens)`` items (same settings)."""
        max_gen = items[0][2]
        sequences = [
            self.tok_encode(context)[-(self.max_length - max_gen) :] for context, _, _ in items
        ]
        generated: list[list[int]] = [[] for _ in items]
        active = [i for i, seq in enumerate(sequences) if seq]
        dummy = self._model_ids([self.eot_token_id])
        for _ in range(max_gen):
            if not active:
                break
            # One placeholder continuation token: its row leaves it out, so the argmax read at
            # the context's last position is the next token (Scorer.drop_final_token).
            scores = self.service.token_scores(
                [(self._model_ids(sequences[i] + generated[i]), [dummy]) for i in active]
            )
            still = []
            for i, options in zip(active, scores, strict=True):
                token = self._tokenizer_id(options[0][0][1])
                generated[i].append(token)
                if token == self.eot_token_id:
                    continue
                text = self.tok_decode(generated[i])
                if any(stop and stop in text for stop in items[i][1]):
                    continue
                still.append(i)
            active = still
        results = []
        for (_, stops, _), tokens in zip(items, generated, strict=True):
            text = self.tok_decode(tokens)
            for stop in stops:
                if stop:
                    text = text.split(stop)[0]
            results.append(text)
        return results

    # ------------------------------------------------------------------ lm_eval --model gkd
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``checkpoint=DIR[,tokenizer=PATH,max_length=N,batch_size=N,add_bos=true|false,
        precision=auto|bf16|fp32]`` in one process (TP=PP=DP=1)."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in extra and str(extra["batch_size"]).isdigit():
            args.setdefault("batch_size", int(extra["batch_size"]))
        if "checkpoint" not in args:
            raise ConfigError(
                "model_args needs checkpoint=DIR (a gkd checkpoint)", field="model_args"
            )
        known = {"checkpoint", "tokenizer", "max_length", "batch_size", "add_bos", "precision"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(
                f"unknown model_args {unknown}; known: {', '.join(sorted(known))}",
                field="model_args",
            )
        return single_process_model(
            Path(str(args["checkpoint"])),
            tokenizer=Path(str(args["tokenizer"])) if args.get("tokenizer") else None,
            max_length=int(args["max_length"]) if args.get("max_length") else None,
            batch_size=int(args.get("batch_size", 64)),
            add_bos=_optional_bool(args.get("add_bos")),
            precision=str(args.get("precision", "auto")),
        )


def _optional_bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"add_bos={value!r} is not true or false", field="add_bos")


def build_model(
    ctx,
    checkpoint: Path,
    tokenizer_path: Path,
    *,
    max_length: int | None = None,
    batch_size: int = 64,
    micro_batch_size: int = 8,
    add_bos: bool | None = None,
    precision: str = "auto",
    vocab_mapping: Path | None = None,
) -> tuple[GkdLM | None, ScoringService]:
    """The scoring service of this rank of an initialized job, and (rank 0) the lm-eval model."""
    from gkd_cli.data import load_tokenizer
    from gkd_cli.eval_worker import find_vocab_mapping, prompt_prefix, vocabulary_hook
    from parallel import checkpoint as ckpt
    from parallel.config import ModelArch
    from parallel.runtime import resolve_precision
    from parallel.scoring import Scorer

    folder = ckpt.resolve(checkpoint)
    meta = ckpt.read_meta(folder)
    if "arch" not in meta:
        raise ckpt.CheckpointError(f"{folder}/meta.json has no 'arch'; not a gkd model checkpoint")
    arch = ModelArch(**meta["arch"])
    tokenizer = load_tokenizer(tokenizer_path)
    mapping_path = vocab_mapping or find_vocab_mapping(folder)
    map_ids, excluded = vocabulary_hook(tokenizer, arch.vocab_size, mapping_path)
    to_tokenizer_id = None
    if map_ids is not None and mapping_path is not None:
        from gkd_cli.vocab import read_mapping

        comp_to_orig = read_mapping(mapping_path).comp_to_orig

        def to_tokenizer_id(model_id: int) -> int:
            return int(comp_to_orig[model_id])

    prefix = prompt_prefix(tokenizer, add_bos)
    prefix_token = prompt_prefix(tokenizer, True).ids[0]
    log.info("%s", prefix.describe())
    scorer = Scorer(
        ctx,
        arch,
        folder,
        micro_batch_size=micro_batch_size,
        seq_length=max_length,
        params_dtype=resolve_precision(precision).params_dtype,
        excluded_token_ids=excluded,
        drop_final_token=True,
    )
    service = ScoringService(scorer, ctx)
    if ctx.rank != 0:
        return None, service
    model = GkdLM(
        service,
        tokenizer,
        prefix=prefix.ids,
        prefix_token_id=prefix_token,
        max_length=scorer.seq_length,
        map_ids=map_ids,
        to_tokenizer_id=to_tokenizer_id,
        batch_size=batch_size,
    )
    return model, service


def single_process_model(
    checkpoint: Path,
    *,
    tokenizer: Path | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
    add_bos: bool | None = None,
    precision: str = "auto",
) -> GkdLM:
    """A :class:`GkdLM` at TP=PP=DP=1 in this process (a one-rank process group is started when
    none exists)."""
    import os

    import torch.distributed as dist

    from gkd_cli.eval import checkpoint_info, default_tokenizer
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize

    folder, meta = checkpoint_info(checkpoint, 1, 1)
    tokenizer = tokenizer or default_tokenizer(folder, meta)
    if not dist.is_initialized():
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in (
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(port)),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
        ):
            os.environ.setdefault(key, value)
    model, _ = build_model(
        initialize(ParallelConfig(), seed=1234),
        folder,
        tokenizer,
        max_length=max_length,
        batch_size=batch_size,
        add_bos=add_bos,
        precision=precision,
    )
    assert model is not None
    return model
