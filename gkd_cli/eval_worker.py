"""The per-rank entry point that ``gkd eval superglue`` starts under torchrun::

    python -m gkd_cli.eval_worker --spec JOB.json

It reads an :class:`EvalJob`, initializes tensor/pipeline/data parallelism, loads the checkpoint
into a :class:`parallel.scoring.Scorer` (any saved layout), scores the SuperGLUE tasks with
:func:`gkd_cli.superglue.evaluate_tasks`, and rank 0 writes the results document
(:mod:`gkd_cli.superglue.results`). Every rank reads and tokenizes the same examples (scoring is
collective). Workers log with ``logging``; only rank 0 logs at INFO.

Prompts are tokenized as the tokenizer itself tokenizes a text, as lm-evaluation-harness does
(its ``hf`` model encodes with the tokenizer's default special tokens): a Hugging Face
``tokenizer.json`` whose post-processor puts a BOS token in front (Llama-2/3, Mistral, Gemma, ...)
gets it; one that adds nothing (GPT-2, SmolLM, Qwen, gkd's own BPE) gets none. For a SentencePiece
``.model`` the convention is ``add_bos_token`` of a ``tokenizer_config.json`` beside it, else BOS
when the model defines a BOS piece (Hugging Face's ``LlamaTokenizer`` default).
``EvalJob.add_bos`` overrides the convention: True prepends the tokenizer's BOS token (its
end-of-document token when it has no BOS, as lm-evaluation-harness's ``prefix_token_id``; this is
what gkd did before 2026-12 for every tokenizer), False prepends nothing.
:func:`prompt_prefix` decides and says why.

Compressed vocabulary (GLMD): when the checkpoint folder or its run directory holds
``vocab_mapping.safetensors`` and the tokenizer is the original one, token ids are remapped to the
student's compressed ids (:func:`gkd_cli.vocab.remap_tokens`) before scoring, and the mapping's
padding slots get probability 0. A compressed tokenizer (one that already emits compressed ids) is
used as is. Log-likelihood scoring needs no mapping back (``to_original``): options are given, not
generated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Self

import numpy as np
from torch.distributed.elastic.multiprocessing.errors import record

from gkd_cli.progress import rank_logging

log = logging.getLogger("gkd.eval_worker")

MAPPING_FILE = "vocab_mapping.safetensors"
"""File name of a compressed-vocabulary mapping next to a checkpoint (or in its run directory)."""


@dataclass(kw_only=True)
class JsonJob:
    """A job dataclass the CLI writes as JSON and every worker reads (unknown fields refused)."""

    KIND: ClassVar[str] = "job"
    """How errors name it."""

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Self:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown {cls.KIND} fields {unknown}")
        return cls(**data)


@dataclass(kw_only=True)
class EvalJob(JsonJob):
    """What one evaluation run does (written by the CLI as JSON, read by every worker)."""

    KIND: ClassVar[str] = "evaluation job"

    checkpoint: str
    """gkd checkpoint folder, ``checkpoints/`` root or run directory (the newest complete one)."""
    tokenizer: str
    """Tokenizer file or folder (the model's)."""
    data_dir: str
    """SuperGLUE data directory (``{data_dir}/{Task}/{split}.jsonl``)."""
    tasks: list[str]
    """Official task names, in order."""
    out: str
    """Path of the results JSON that rank 0 writes."""
    split: str | None = None
    """Split to score; None: each task's default (``val``; ReCoRD ``dev32``)."""
    shots: int = 0
    """Few-shot examples per prompt, drawn from ``train``."""
    normalize: bool | None = None
    """Rank options by per-token log-likelihood; None: each task's default."""
    seed: int = 1234
    """Seed of the few-shot draws."""
    limit: int | None = None
    """Score only the first N examples of each task (MultiRC: N questions with all their options)."""
    predictions: bool = False
    """Also write per-example predictions, scores and prompts."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel replicas (rows are spread over them)."""
    micro_batch_size: int = 8
    """Packed rows per forward pass."""
    seq_length: int | None = None
    """Scoring window in tokens; None: the model's max_seq_len. Longer contexts are cut from the left."""
    precision: str = "auto"
    """Parameter dtype: auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."""
    add_bos: bool | None = None
    """Prepend the tokenizer's BOS token to every prompt; None: when the tokenizer itself adds one
    (see :func:`prompt_prefix`)."""
    request_batch_size: int = 64
    """Examples handed to the scorer per call (rows are sorted by length within a call)."""
    model_name: str | None = None
    """Name stored in the results file (``model``)."""
    vocab_mapping: str | None = None
    """Compressed-vocabulary mapping; None: look next to the checkpoint and in its run directory."""
    extra: dict = field(default_factory=dict)
    """Free-form notes carried along (ignored by the worker)."""


def find_vocab_mapping(checkpoint_folder: Path) -> Path | None:
    """``vocab_mapping.safetensors`` in the checkpoint folder, else in its run directory
    (``<run>/checkpoints/step_N`` -> ``<run>``), else None."""
    for folder in (checkpoint_folder, checkpoint_folder.parent, checkpoint_folder.parent.parent):
        if (folder / MAPPING_FILE).is_file():
            return folder / MAPPING_FILE
    return None


def vocabulary_hook(
    tokenizer, vocab_size: int, mapping_path: Path | None
) -> tuple[Callable[[list[int]], list[int]] | None, np.ndarray | None]:
    """``(map_ids, excluded_ids)`` for a model whose vocabulary has ``vocab_size`` ids.

    ``map_ids`` turns the tokenizer's ids into the model's (None: identity); ``excluded_ids`` are
    model ids that must never be predicted (the compressed vocabulary's padding slots)."""
    map_ids = None
    excluded = None
    model_ids = tokenizer.vocab_size
    if mapping_path is not None:
        from gkd_cli.vocab import read_mapping, remap_tokens

        mapping = read_mapping(mapping_path)
        if tokenizer.is_compressed:
            if tokenizer.vocab_size != mapping.compressed_vocab_size:
                raise ValueError(
                    f"the tokenizer is compressed to {tokenizer.vocab_size} ids but {mapping_path} "
                    f"has {mapping.compressed_vocab_size}; use the checkpoint's tokenizer"
                )
        else:
            if tokenizer.vocab_size != mapping.vocab_size:
                raise ValueError(
                    f"{mapping_path} maps {mapping.vocab_size} original ids but the tokenizer has "
                    f"{tokenizer.vocab_size}; use the tokenizer the mapping was made for"
                )
            table = mapping.orig_to_comp

            def map_ids(ids: list[int]) -> list[int]:
                return remap_tokens(list(ids), table)

        excluded = np.flatnonzero(mapping.comp_to_orig < 0)
        model_ids = mapping.compressed_vocab_size
    if model_ids > vocab_size:
        raise ValueError(
            f"the tokenizer yields ids up to {model_ids - 1} but the model has vocab_size={vocab_size}; "
            "evaluate with the tokenizer the model was trained with (--tokenizer)"
        )
    return map_ids, excluded


@dataclass(frozen=True)
class PromptPrefix:
    """The special tokens put in front of every prompt, and why."""

    tokens: tuple[str, ...]
    """Token strings (empty: none)."""
    ids: tuple[int, ...]
    """Their ids in the tokenizer's id space (compressed ids for a compressed tokenizer)."""
    reason: str
    """Why (the tokenizer's convention, or the explicit option)."""

    def describe(self) -> str:
        """One line for the console and the log."""
        if not self.tokens:
            return f"prompts start with no special token ({self.reason})"
        shown = " ".join(f"{t!r} (id {i})" for t, i in zip(self.tokens, self.ids, strict=True))
        return f"prompts start with {shown} ({self.reason})"


_PROBE = "a"
"""A text that every tokenizer encodes to at least one token (to see what it adds around it)."""


def _hf_config(tokenizer) -> dict:
    """The ``tokenizer_config.json`` beside the tokenizer file, or {}."""
    source = Path(tokenizer.source)
    folder = source if source.is_dir() else source.parent
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _convention(tokenizer) -> tuple[list[int], int | None, str]:
    """``(ids the tokenizer puts before a text by default, its BOS id or None, where that was
    read)``, in the backend's original id space."""
    # gkd's Tokenizer encodes without special tokens; its backend holds the tokenizer's own rules.
    backend = tokenizer._backend
    config = _hf_config(tokenizer)
    bos_name = _config_token(config, "bos_token")
    if backend.kind == "huggingface":
        hf = backend.tokenizer
        plain = hf.encode(_PROBE, add_special_tokens=False).ids
        full = hf.encode(_PROBE, add_special_tokens=True).ids
        start = next(
            (k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain), 0
        )
        prefix = list(full[:start])
        bos = prefix[0] if prefix else (hf.token_to_id(bos_name) if bos_name else None)
        return (
            prefix,
            bos,
            "the tokenizer.json post-processor " + ("adds it" if prefix else "adds none"),
        )
    bos = backend.role_id("bos")
    if bos_name and backend.token_to_id(bos_name) is not None:
        bos = backend.token_to_id(bos_name)
    configured = config.get("add_bos_token")
    if isinstance(configured, bool):
        where = "add_bos_token in tokenizer_config.json"
        adds = configured
    else:
        where = (
            "the SentencePiece model defines a BOS piece"
            if bos is not None
            else "the SentencePiece model has no BOS piece"
        )
        adds = bos is not None
    return ([bos] if adds and bos is not None else []), bos, where


def prompt_prefix(tokenizer, add_bos: bool | None) -> PromptPrefix:
    """The tokens put in front of every prompt.

    ``add_bos`` None follows the tokenizer (see the module docstring); True prepends its BOS token
    (the end-of-document token when it has none); False nothing. Raises ``ValueError`` when the
    token is not in the tokenizer's (compressed) vocabulary."""
    default, bos, where = _convention(tokenizer)
    backend = tokenizer._backend
    if add_bos is None:
        original, reason = default, f"the tokenizer's convention: {where}"
    elif not add_bos:
        original, reason = [], "--no-add-bos"
    elif bos is not None:
        original, reason = [bos], "--add-bos"
    else:
        original = [tokenizer._eos_id]
        reason = "--add-bos; the tokenizer has no BOS token, so its end-of-document token"
    tokens = tuple(backend.id_to_token(i) for i in original)
    ids = []
    for token in tokens:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"the prompt prefix token {token!r} is not in the compressed vocabulary; "
                "evaluate with --no-add-bos"
            )
        ids.append(token_id)
    return PromptPrefix(tokens=tokens, ids=tuple(ids), reason=reason)


def make_tokenize(
    tokenizer, map_ids: Callable[[list[int]], list[int]] | None, prefix: Sequence[int] = ()
) -> Callable[[str], list[int]]:
    """Text -> model ids: ``prefix + encode(text)`` (``prefix``: :attr:`PromptPrefix.ids`),
    remapped when the vocabulary is compressed."""
    prefix = list(prefix)

    def tokenize(text: str) -> list[int]:
        ids = [*prefix, *tokenizer.encode(text)]
        return map_ids(ids) if map_ids is not None else ids

    return tokenize


def evaluate_job(job: EvalJob, ctx) -> list:
    """Score ``job`` on this rank of an initialized job (``ctx``: its
    :class:`parallel.distributed.ParallelContext`, of ``job``'s layout); rank 0 writes the
    results file. Returns the task results (the same on every rank)."""
    from gkd_cli.data import load_tokenizer
    from gkd_cli.superglue import evaluate_tasks, save_results
    from parallel import checkpoint as ckpt
    from parallel.config import ModelArch
    from parallel.runtime import resolve_precision
    from parallel.scoring import Scorer

    folder = ckpt.resolve(job.checkpoint)
    meta = ckpt.read_meta(folder)
    if "arch" not in meta:
        raise ckpt.CheckpointError(
            f"{folder}/meta.json has no 'arch'; it is not a gkd model checkpoint"
        )
    arch = ModelArch(**meta["arch"])
    tokenizer = load_tokenizer(job.tokenizer)
    mapping = Path(job.vocab_mapping) if job.vocab_mapping else find_vocab_mapping(folder)
    map_ids, excluded = vocabulary_hook(tokenizer, arch.vocab_size, mapping)
    prefix = prompt_prefix(tokenizer, job.add_bos)
    log.info("%s", prefix.describe())
    precision = resolve_precision(job.precision)
    scorer = Scorer(
        ctx,
        arch,
        folder,
        micro_batch_size=job.micro_batch_size,
        seq_length=job.seq_length,
        params_dtype=precision.params_dtype,
        excluded_token_ids=excluded,
    )
    log.info(
        "scoring %s (%s, tp=%d pp=%d dp=%d) on %s",
        folder,
        precision.name,
        ctx.tp,
        ctx.pp,
        ctx.dp,
        ", ".join(job.tasks),
    )
    try:
        results = evaluate_tasks(
            job.data_dir,
            job.tasks,
            scorer,
            make_tokenize(tokenizer, map_ids, prefix.ids),
            split=job.split,
            shots=job.shots,
            normalize=job.normalize,
            seed=job.seed,
            limit=job.limit,
            batch_size=job.request_batch_size,
        )
    finally:
        scorer.close()
    stats = scorer.stats
    log.info(
        "ran %d tokens in %d rows (%d with padding) for %d scored tokens; scoring each option "
        "with its own copy of the context would have run %d; %d contexts truncated, %d options "
        "longer than the window",
        stats["tokens"],
        stats["rows"],
        stats["padded_tokens"],
        stats["targets"],
        stats["unshared_tokens"],
        stats["truncated_requests"],
        stats["split_options"],
    )
    if ctx.rank == 0:
        save_results(
            job.out,
            results,
            model=job.model_name,
            include_predictions=job.predictions,
            include_prompts=job.predictions,
            settings={"prompt_prefix": list(prefix.tokens), "prompt_prefix_reason": prefix.reason},
        )
        log.info("wrote %s", job.out)
    return results


def run(job: EvalJob) -> list:
    """Initialize the job's layout (inside torchrun), evaluate, shut down."""
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize, shutdown

    ctx = initialize(ParallelConfig(tp=job.tp, pp=job.pp, dp=job.dp), seed=job.seed)
    try:
        return evaluate_job(job, ctx)
    finally:
        shutdown()


@record
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gkd_cli.eval_worker")
    parser.add_argument("--spec", required=True, help="Evaluation job (JSON, see EvalJob).")
    args = parser.parse_args(argv)
    rank_logging()
    run(EvalJob.load(args.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
