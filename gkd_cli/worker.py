"""The per-rank entry point that ``gkd distill`` starts under torchrun:

    python -m gkd_cli.worker --config <output.dir>/config.yaml

It reads the resolved config, builds tokenizer, data, method pipeline and the runtime, runs the
training loop (resuming when the output directory holds a checkpoint), and at the end writes
validation losses of teacher and student to ``<output.dir>/eval.json``. Workers log with
``logging``; only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from gkd_cli.config import DistillConfig, dump_config, load_config
from gkd_cli.progress import rank_logging

if TYPE_CHECKING:
    from methods.pipeline import MethodPipeline

log = logging.getLogger("gkd.worker")


def _barrier_build(build, *, rank: int):
    """Build a cache on rank 0 first, then let the other ranks open it."""
    result = build() if rank == 0 else None
    dist.barrier()
    return result if rank == 0 else build()


def build_dataset(
    cfg: DistillConfig,
    tokenizer,
    files: Sequence[str],
    *,
    rank: int,
    name: str,
    shuffle: bool | None = None,
):
    """The rows of ``cfg.data.mode`` over ``files`` (a :class:`gkd_cli.data.batching.RowDataset`),
    tokenized into an example store on rank 0 first. ``shuffle`` defaults to ``data.shuffle``
    (validation: False). In ``stream`` mode the store's tokens are the token stream of
    :func:`gkd_cli.data.corpus.build_token_stream` (same samples, same order)."""
    from gkd_cli.data.batching import make_rows
    from gkd_cli.data.build import build_example_store

    out = Path(cfg.output.dir)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    data = cfg.data
    fmt: str = data.format
    if data.source == "superglue" and name == "train":
        files, fmt = [str(_superglue_texts(cfg, cache, rank=rank))], "jsonl"
    sources = data_sources(cfg, files, fmt)
    examples = data.mode != "stream"
    groups = None
    if examples:  # choice records: one example per option (gkd_cli.data.choices)
        from gkd_cli.data.choices import prepare_sources

        sources, groups = _barrier_build(
            lambda: prepare_sources(sources, cache / f"{name}-choices"), rank=rank
        )
    store = _barrier_build(
        lambda: build_example_store(
            sources,
            tokenizer,
            cache / name,
            # choice records are checked whole by ChoiceRows (data.overlong: truncate leaves a
            # record out, so its options are stored whatever their length)
            max_length=(
                None
                if not examples or (groups is not None and data.overlong == "truncate")
                else data.seq_length
            ),
            overlong=data.overlong if groups is None else "refuse",
            workers=data.workers or _auto_workers(sources),
        ),
        rank=rank,
    )
    if groups is not None:
        from gkd_cli.data.choices import ChoiceRows

        return ChoiceRows(
            store, data.seq_length, groups, mode=data.mode, overlong=data.overlong, seed=cfg.train.seed,
            shuffle=data.shuffle if shuffle is None else shuffle, pad_id=tokenizer.eos_id,
            name=f"data.{name}_files",
        )  # fmt: skip
    return make_rows(
        store,
        data.mode,
        data.seq_length,
        seed=cfg.train.seed,
        shuffle=data.shuffle if shuffle is None else shuffle,
        overlong=data.overlong,
        pad_id=tokenizer.eos_id,
        name=f"data.{name}_files",
    )


def _auto_workers(sources) -> int:
    """``data.workers: 0``: the cores (at most 8) for a corpus of several tokenizing chunks, one
    process for a small one (a pool would cost more than it saves)."""
    from gkd_cli.data.build import CHUNK_CHARS
    from gkd_cli.data.formats import default_workers

    size = sum(os.path.getsize(s.path) for s in sources if os.path.isfile(s.path))
    return default_workers() if size > 4 * CHUNK_CHARS else 1


def data_sources(cfg: DistillConfig, files: Sequence[str], fmt: str) -> list:
    """The :class:`gkd_cli.data.formats.DataSource` of each file pattern (the one place that maps
    the ``data`` section to the builder's sources, :func:`gkd_cli.data.formats.config_sources`):
    the format, the record kind (text, prompt/completion, chat; ``auto``: decided per file from its
    first record), the field names and ``data.train_weights``."""
    import dataclasses
    import glob

    from gkd_cli.data.formats import config_sources

    def expand(pattern: str) -> list[str]:
        return sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]

    data = dataclasses.replace(cfg.data, format=fmt)  # type: ignore[arg-type]
    return config_sources(data, list(files), expand)


def _superglue_texts(cfg: DistillConfig, cache: Path, *, rank: int) -> Path:
    """The task stage's data: prompt-formatted task examples as JSON lines. In ``stream`` mode,
    or when some example has no label, each is a text (the prompt, plus the gold answer when
    labeled); in ``padded``/``packed`` mode with every example labeled, a prompt/completion
    record, so the loss is on the gold answer only (fine-tuning a teacher on the task)."""
    from gkd_cli.superglue import iter_task_records

    tasks, folder = cfg.data.superglue_tasks, cfg.data.superglue_dir
    assert folder is not None  # validation requires it for source: superglue
    split = cfg.data.superglue_split
    kind = ("-choices-labeled" if cfg.data.labels else "-choices") if cfg.data.choices else ""
    path = cache / f"superglue-{split}-{cfg.data.mode}{kind}-{'-'.join(tasks)}.jsonl"
    if rank == 0:
        records = list(iter_task_records(folder, tasks, split))
        examples = cfg.data.mode != "stream" and all(r.answer is not None for r in records)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            for record in records:
                line = (  # h15t: a choice record (methods.choices) with data.choices
                    record.choice_record(labels=cfg.data.labels)
                    if cfg.data.choices
                    else record.record(examples=examples)
                )
                fh.write(json.dumps(line) + "\n")
        os.replace(tmp, path)
    dist.barrier()
    return path


def _resolve_checkpoint(path: str | None) -> Path | None:
    """The checkpoint folder of ``path`` (a step folder, a ``checkpoints`` root or a run
    directory: :func:`parallel.checkpoint.resolve`), or ``None``."""
    from parallel import checkpoint as ckpt

    return None if not path else ckpt.resolve(path)


def _student_layer_map(cfg: DistillConfig) -> list[int] | None:
    """``student.init_layers`` resolved against the checkpoint's layer count (checked before
    launch by the preflight)."""
    from parallel import checkpoint as ckpt

    spec = cfg.student.init_layers
    if spec is None or cfg.student.checkpoint is None:
        return None
    saved = ckpt.read_meta(ckpt.resolve(cfg.student.checkpoint))["arch"]["num_layers"]
    return ckpt.resolve_layer_map(spec, student_layers=cfg.student.num_layers, saved_layers=saved)


def make_batch_fn(dataset, cfg: DistillConfig, ctx):
    """``step -> this rank's microbatches`` (:func:`gkd_cli.data.batching.microbatches`)."""
    from gkd_cli.data.batching import microbatches

    train = cfg.train
    cached = any(t.cache is not None for t in cfg.teachers)

    def batch_fn(step: int) -> list[dict]:
        micro = microbatches(
            dataset,
            step,
            train.global_batch_size,
            ctx.dp_rank,
            ctx.dp,
            train.micro_batch_size,
        )
        if cached:  # a cached teacher reads its records by global sample id
            from gkd_cli.cache_teacher import sample_ids

            ids = sample_ids(
                dataset, step, train.global_batch_size, ctx.dp_rank, ctx.dp, train.micro_batch_size
            )
            for batch, mine in zip(micro, ids, strict=True):
                batch["sample_ids"] = torch.tensor(mine, dtype=torch.long)
        return micro

    return batch_fn


def lm_eval_fn(pipeline_ctx_vocab, *, teacher: bool = True):
    """A compute_fn for :meth:`DistillationRuntime.evaluate`: LM cross entropy of student and
    teacher (``teacher=False``: the student's only)."""
    from methods.base import FeatureKind, Role, Tap
    from methods.vocab_parallel import VocabShard, cross_entropy

    student_tap, teacher_tap = (
        Tap(Role.STUDENT, FeatureKind.LOGITS),
        Tap(Role.TEACHER, FeatureKind.LOGITS),
    )
    teacher_vocab_start, teacher_vocab = pipeline_ctx_vocab

    def compute(features, ctx):
        if student_tap not in features:
            return None, {}
        terms = {
            "student_lm": cross_entropy(
                features[student_tap],
                ctx.labels,
                ctx.loss_mask,
                VocabShard(ctx.vocab_start, ctx.vocab_size, ctx.tp_group),
            ).detach()
        }
        if teacher and teacher_tap in features:
            terms["teacher_lm"] = cross_entropy(
                features[teacher_tap],
                ctx.extras.get("teacher_labels", ctx.labels),
                ctx.loss_mask,
                VocabShard(teacher_vocab_start, teacher_vocab, ctx.tp_group),
            ).detach()
        return terms["student_lm"], terms

    return compute


def evaluate(
    runtime, dataset, cfg: DistillConfig, ctx, *, max_batches: int = 8, teacher: bool = True
) -> dict[str, float]:
    """Mean LM loss and perplexity of student and teacher (``teacher=False``: the student only)
    over (up to) ``max_batches`` global batches of the validation set, in order."""
    from gkd_cli.data.batching import collate
    from methods.base import FeatureKind, Role, Tap

    train = cfg.train
    per_step = train.global_batch_size
    rows = dataset.rows_in_epoch(0)
    num_batches = max(1, min(max_batches, rows // per_step))
    if rows < per_step:
        raise ValueError(
            f"data.valid_files hold {rows} sequences of {cfg.data.seq_length} tokens, fewer than "
            f"one global batch ({per_step}); add validation text or lower train.global_batch_size"
        )
    info = runtime.teacher_infos[0] if runtime.teacher_infos else runtime.student_info
    shard = info.padded_vocab_size // ctx.tp
    compute = lm_eval_fn((ctx.tp_rank * shard, info.vocab_size), teacher=teacher)
    # Both models' logits are needed; make sure the taps exist even if no method asked for them.
    roles = (Role.STUDENT, Role.TEACHER) if teacher else (Role.STUDENT,)
    for role in roles:
        runtime.ensure_tap(Tap(role, FeatureKind.LOGITS))
    sums: dict[str, float] = {}
    per_rank = per_step // ctx.dp
    for batch in range(num_batches):
        start = batch * per_step + ctx.dp_rank * per_rank
        mine = [dataset.row(0, i) for i in range(start, start + per_rank)]
        micro = [
            collate(mine[i : i + train.micro_batch_size], packed=dataset.packed)
            for i in range(0, per_rank, train.micro_batch_size)
        ]
        for name, value in runtime.evaluate(micro, compute).items():
            sums[name] = sums.get(name, 0.0) + value / num_batches
    result: dict[str, float] = {
        "sequences": num_batches * per_step,
        "seq_length": cfg.data.seq_length,
    }
    for who in ("student", "teacher"):
        if f"{who}_lm" in sums:
            result[f"{who}_loss"] = sums[f"{who}_lm"]
            result[f"{who}_ppl"] = math.exp(min(sums[f"{who}_lm"], 50.0))
    return result


def vocab_restriction(path: str, tp_rank: int, tp: int):
    """This rank's view of a compressed-vocabulary mapping (GLMD) for the runtime."""
    from gkd_cli.vocab import read_mapping
    from parallel.runtime import VocabRestriction

    mapping = read_mapping(path)
    if tp == 1:  # one shard: the teacher's columns are the original ids themselves
        comp_to_orig = np.asarray(mapping.comp_to_orig, dtype=np.int64)
        local_index, valid = np.where(comp_to_orig >= 0, comp_to_orig, 0), comp_to_orig >= 0
    elif mapping.tp != tp:
        raise ValueError(
            f"data.vocab_mapping {path} partitions the vocabulary for tp={mapping.tp}, but "
            f"parallel.tp={tp}; run gkd compress-vocab with --tp {tp} (kept ids are grouped per "
            "tensor-parallel shard)"
        )
    else:
        local_index, valid = mapping.shard_local_index(tp_rank)
    return VocabRestriction(
        orig_to_comp=torch.from_numpy(np.asarray(mapping.orig_to_comp, dtype=np.int64)),
        teacher_index=torch.from_numpy(np.asarray(local_index, dtype=np.int64)),
        valid=torch.from_numpy(np.asarray(valid, dtype=bool)),
        kept_orig_to_comp=torch.from_numpy(
            np.where(mapping.kept_mask, mapping.orig_to_comp, -1).astype(np.int64)
        ),
    )


def run(cfg: DistillConfig, pipeline: MethodPipeline) -> str:
    """Train ``cfg``'s run with its ``pipeline`` (built by :func:`gkd_cli.build.build_methods`)."""
    from gkd_cli import observe
    from gkd_cli.data import load_tokenizer
    from parallel.distributed import initialize, shutdown
    from parallel.loop import LoopSettings, train_loop
    from parallel.runtime import DistillationRuntime, TeacherSpec

    ctx = initialize(cfg.parallel, seed=cfg.train.seed)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        train_set = build_dataset(cfg, tokenizer, cfg.data.train_files, rank=ctx.rank, name="train")
        valid_set = (
            build_dataset(
                cfg, tokenizer, cfg.data.valid_files, rank=ctx.rank, name="valid", shuffle=False
            )
            if cfg.data.valid_files
            else None
        )
        vocab, extra_files = None, {}
        if cfg.data.vocab_mapping:
            vocab = vocab_restriction(cfg.data.vocab_mapping, ctx.tp_rank, ctx.tp)
            extra_files["vocab_mapping.safetensors"] = Path(cfg.data.vocab_mapping)
        teachers = []
        for index, teacher in enumerate(cfg.teachers):
            checkpoint = (
                Path(teacher.checkpoint)
                if teacher.init != "random" and teacher.checkpoint
                else None
            )
            cache = None
            if teacher.cache is not None:  # checked (key, checksums, methods) before launch
                from gkd_cli.cache_teacher import open_cache

                cache = open_cache(cfg, index, verify=False)
            # Teacher 0 keeps the single-teacher seed, so a one-item 'teachers:' equals 'teacher:'.
            teachers.append(
                TeacherSpec(
                    teacher.arch(),
                    checkpoint,
                    seed=cfg.train.seed + 1 + 1000 * index,
                    cache=cache,
                )
            )
        runtime = DistillationRuntime(
            ctx=ctx,
            student=cfg.student.arch(),
            teachers=teachers,
            pipeline=pipeline,
            train=cfg.train,
            seq_length=cfg.data.seq_length,
            # a step folder, a checkpoints/ root or a run directory, as for teachers (h15t)
            student_init=_resolve_checkpoint(cfg.student.checkpoint),
            student_init_layers=_student_layer_map(cfg),
            vocab=vocab,
            attention_masks=train_set.packed,
        )
        if ctx.rank == 0:
            from gkd_cli.data.batching import epochs_covered

            log.info(
                "data.mode=%s: %d sequences in the first epoch; train.steps=%d read %.2f epochs",
                cfg.data.mode,
                train_set.rows_in_epoch(0),
                cfg.train.steps,
                epochs_covered(train_set, cfg.train.steps, cfg.train.global_batch_size),
            )
        out = Path(cfg.output.dir)
        settings = LoopSettings(
            steps=cfg.train.steps,
            save_every=cfg.output.save_every,
            keep_last=cfg.output.keep_last,
            log_every=cfg.train.log_every,
            out_dir=out,
            config_yaml=dump_config(cfg),
            meta={
                "tokenizer": str(cfg.data.tokenizer),
                "teacher_arch": vars(cfg.teacher.arch()) if cfg.teacher else None,
                "teacher_archs": [vars(t.arch()) for t in cfg.teachers],
                "head_path": runtime.head_path,  # fused or materialized output layer + losses
            },
            resume=True,
            extra_files=extra_files,
            **observe.loop_options(cfg),
        )
        validate = None
        if valid_set is not None and cfg.train.eval_every:
            validate = observe.make_validator(runtime, valid_set, cfg, ctx)
        outcome = train_loop(
            runtime, make_batch_fn(train_set, cfg, ctx), settings, validate=validate
        )
        if outcome.status == "finished" and valid_set is not None:
            result = outcome.validation or evaluate(
                runtime, valid_set, cfg, ctx, max_batches=cfg.train.eval_batches
            )
            if ctx.rank == 0:
                (out / "eval.json").write_text(json.dumps(result, indent=2))
                log.info("validation: %s", result)
        return outcome.status
    except BaseException:
        _note_failure_time()
        raise
    finally:
        shutdown()


def _note_failure_time() -> None:
    """Write when this rank failed, before ``shutdown()`` tears down the process group (which is
    what makes the other ranks fail too): the launcher blames the rank that failed first."""
    import time

    path = os.environ.get("GKD_FAILED_AT_FILE")  # gkd_cli.launch.FAILED_AT_ENV
    if path:
        try:
            Path(path).write_text(repr(time.time()))
        except OSError:
            pass


@record
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gkd_cli.worker")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    rank_logging()
    from gkd_cli.build import build_methods

    cfg = load_config(args.config, environ=os.environ, build_methods=False)
    status = run(cfg, build_methods(cfg))  # the methods are built once, as validation built them
    log.info("run %s", status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
