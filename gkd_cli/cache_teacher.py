"""The teacher cache on the run side (issue 17): ``gkd cache-teacher`` and ``teacher: {cache: DIR}``.

``gkd cache-teacher CONFIG`` runs the config's teacher alone, forward only, over the training data
once (the same launcher as ``gkd distill``: torchrun, or Slurm when configured; any tp/pp/dp), and
writes per token the sparse form of its next-token distribution
(:mod:`methods.sparse_targets`, format :mod:`gkd_cli.teacher_cache`). ``gkd distill`` with
``teacher: {cache: DIR}`` then reads it instead of running the teacher
(:class:`parallel.teacher_source.CachedTeacher`).

Samples. A cache record is one training row, identified by its *sample id*: the window index
(``data.mode: stream``) or the example index (``padded``), which is what ``order(epoch)[row]`` of
:mod:`gkd_cli.data.batching` permutes. It does not depend on the epoch, the shuffle, the
data-parallel size or resuming, so a cache written once serves every epoch of any layout.
``packed`` rows are packed anew each epoch and are not cached (refused before launch).

Key. A cache is keyed (:class:`gkd_cli.teacher_cache.CacheKey`) to the tokenizer file's sha256,
the training data's fingerprint (:func:`data_fingerprint`: the data settings that decide the
rows, and each training file's size and sha256), ``data.seq_length``, the teacher's vocabulary
size and the teacher's identity (checkpoint path and its ``meta.json`` hash, or the random seed).
A distillation from a cache whose config names no teacher checkpoint takes the identity recorded
in the cache. ``teacher.json`` in the cache directory records the teacher's architecture, so the
distillation config may leave it out.

Temperature. The cache holds ``q = softmax(z / T)`` at ``--temperature T`` (default: the
temperature of the config's logit methods, else 1); a method must distill at the same temperature
(refused otherwise, before launch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from gkd_cli import slurm_cli as sc
from gkd_cli.errors import ConfigError
from gkd_cli.progress import rank_logging

if TYPE_CHECKING:
    from gkd_cli.config import DistillConfig, ModelConfig
    from gkd_cli.teacher_cache import CacheKey, CacheSpec

ARCH_FILE = "teacher.json"
"""The teacher's architecture, written by ``gkd cache-teacher`` next to the cache's files."""
SAMPLE_MB = 1 << 20
log = logging.getLogger("gkd.cache_teacher")


# ---------------------------------------------------------------------------- config
def with_cached_arch(raw: Any, role: str) -> Any:
    """A raw teacher section with ``cache`` gets the architecture fields it leaves out from the
    cache's ``teacher.json`` (the section's own values win; a differing vocabulary is refused by
    the key check)."""
    if not isinstance(raw, Mapping) or raw.get("cache") is None:
        return raw
    path = Path(os.path.expanduser(str(raw["cache"]))) / ARCH_FILE
    if not path.is_file():
        if "num_layers" in raw:
            return raw  # architecture given: the preflight names the missing cache
        raise ConfigError(
            f"{role}.cache: no teacher cache at {raw['cache']} ({ARCH_FILE} missing); write it with "
            "gkd cache-teacher first, or give the teacher's architecture fields",
            field=f"{role}.cache",
        )
    recorded = json.loads(path.read_text())["arch"]
    return {**recorded, **raw}


def check_cache_fields(cfg: DistillConfig) -> None:
    """Config-only checks of ``cache`` fields (no files opened)."""
    if cfg.student.cache is not None:
        raise ConfigError(
            "student.cache: only a teacher can be read from a cache; remove it",
            field="student.cache",
        )
    for index, teacher in enumerate(cfg.teachers):
        if teacher.cache is None:
            continue
        role = cfg.teacher_role(index)
        if cfg.data.mode == "packed":
            raise ConfigError(
                f"{role}.cache: data.mode=packed packs the rows anew each epoch, so they cannot be "
                "cached; use data.mode=padded or stream, or a co-located teacher",
                field=f"{role}.cache",
            )
        if cfg.data.source != "corpus":
            raise ConfigError(
                f"{role}.cache: a teacher cache covers corpus data (data.source=corpus) only",
                field=f"{role}.cache",
            )


def cached_teachers(cfg: DistillConfig) -> list[int]:
    return [i for i, t in enumerate(cfg.teachers) if t.cache is not None]


# ---------------------------------------------------------------------------- key
def _sha256_file(path: Path, *, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if limit is None or path.stat().st_size <= 2 * limit:
            for block in iter(lambda: fh.read(SAMPLE_MB), b""):
                digest.update(block)
        else:  # first and last `limit` bytes (with the size in the fingerprint)
            digest.update(fh.read(limit))
            fh.seek(-limit, os.SEEK_END)
            digest.update(fh.read(limit))
    return digest.hexdigest()


def tokenizer_hash(path: str) -> str:
    """sha256 of the tokenizer file (``tokenizer.json`` inside a directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    return _sha256_file(p)


def data_fingerprint(cfg: DistillConfig) -> str:
    """The rows' identity: what decides the token sequence of each sample id (mode, format,
    record fields, mixture weights, overlong handling; the sequence length is a key field of its
    own) and every training file (name, size, sha256 of its first and last 64 MiB)."""
    import glob

    d = cfg.data
    files = []
    for pattern in d.train_files:
        for path in sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]:
            p = Path(path)
            files.append([p.name, p.stat().st_size, _sha256_file(p, limit=64 * SAMPLE_MB)])
    settings = {
        "mode": d.mode,
        "format": d.format,
        "kind": d.kind,
        "fields": [d.text_field, d.prompt_field, d.completion_field, d.messages_field],
        "train_weights": list(d.train_weights),
        "overlong": d.overlong,
        "files": files,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def teacher_identity(teacher: ModelConfig, seed: int) -> str | None:
    """The teacher's checkpoint path and ``meta.json`` hash; ``random:<seed>`` for a random
    teacher; ``None`` when the config names neither (a cache-only teacher)."""
    if teacher.checkpoint is not None and teacher.init != "random":
        folder = Path(teacher.checkpoint)
        meta = folder / "meta.json"
        if not meta.exists():  # a checkpoints root: its newest step
            from parallel import checkpoint as ckpt

            try:
                folder = ckpt.resolve(folder)
            except Exception:  # noqa: BLE001 (the key then names the folder only)
                return f"{os.path.abspath(teacher.checkpoint)}"
            meta = folder / "meta.json"
        return f"{os.path.abspath(folder)}:{_sha256_file(meta)[:16]}"
    if teacher.init == "random":
        return f"random:{seed}"
    return None


def teacher_seed(cfg: DistillConfig, index: int) -> int:
    """The seed of a random teacher ``index`` (as gkd_cli.worker draws it)."""
    return cfg.train.seed + 1 + 1000 * index


def cache_key(cfg: DistillConfig, index: int, *, recorded_teacher: str | None = None) -> CacheKey:
    """The key a cache of teacher ``index`` over ``cfg``'s training data has."""
    from gkd_cli.teacher_cache import CacheKey

    teacher = cfg.teachers[index]
    identity = teacher_identity(teacher, teacher_seed(cfg, index))
    if identity is None:
        identity = recorded_teacher or ""
    return CacheKey(
        tokenizer_hash=tokenizer_hash(cfg.data.tokenizer),
        data_fingerprint=data_fingerprint(cfg),
        seq_length=cfg.data.seq_length,
        vocab_size=teacher.vocab_size,
        teacher=identity,
    )


def recorded_key(root: Path) -> dict | None:
    """The key in a cache's ``meta.json`` (``None`` when absent)."""
    meta = Path(root) / "meta.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("key")


def open_cache(cfg: DistillConfig, index: int, *, verify: bool = True):
    """The checked :class:`~gkd_cli.teacher_cache.CacheReader` of teacher ``index``; a
    ``ConfigError`` naming the field when it is missing, unfinished, damaged or keyed to other
    data, tokenizer, sequence length, vocabulary or teacher."""
    from gkd_cli.teacher_cache import CacheError, CacheReader

    teacher = cfg.teachers[index]
    assert teacher.cache is not None
    role = f"{cfg.teacher_role(index)}.cache"
    recorded = recorded_key(Path(teacher.cache)) or {}
    try:
        key = cache_key(cfg, index, recorded_teacher=recorded.get("teacher"))
        return CacheReader(Path(teacher.cache), key, verify=verify)
    except (CacheError, OSError) as err:
        raise ConfigError(f"{role}: {err}", field=role) from None


# ---------------------------------------------------------------------------- methods
def check_methods_for_cache(cfg: DistillConfig, pipeline: Any, spec: CacheSpec, index: int) -> None:
    """Refuse, before launch, a method that cannot run against cached teacher ``index``: one that
    taps the teacher's intermediate features (hidden states, attention, ...) or whose logit loss
    has no sparse form for this cache (dense logits, or a nonlinear divergence against samples),
    or that distills at another temperature than the cache's. Each method is tried once on a
    two-token stand-in batch (CPU, no model) against stand-in targets of the cache's kind."""
    import torch

    from methods.base import FeatureKind, LossContext, Role, Stage, Tap
    from methods.sparse_targets import SparseTargetsUnsupported
    from parallel.model import model_info
    from parallel.teacher_source import describe_need

    role = cfg.teacher_role(index)
    tp = cfg.parallel.tp
    student = model_info(cfg.student.arch(), tp)
    teachers = [model_info(t.arch(), tp) for t in cfg.teachers]
    stage = Stage(cfg.train.stage)
    for entry in getattr(pipeline, "entries", ()):
        method = entry.method
        if stage not in method.stages:
            continue
        taps = list(method.taps(teachers[0], student))
        needs = [
            t
            for t in taps
            if t.role is Role.TEACHER
            and t.teacher_index == index
            and t.kind is not FeatureKind.LOGITS
        ]
        if needs:
            raise ConfigError(
                f"method {entry.name!r} needs the teacher's {describe_need(needs[0])} "
                f"(intermediate features), which a cached teacher ({role}.cache) does not offer: "
                "a cache holds only its next-token distribution; distill this method from a "
                "co-located teacher (teacher.checkpoint)",
                field=f"{role}.cache",
            )
        t_tap = Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=index)
        if t_tap not in taps:
            continue
        features: dict[Tap, Any] = {}
        n, v = 2, student.padded_vocab_size // tp
        generator = torch.Generator().manual_seed(0)
        for tap in taps:
            if tap.kind is not FeatureKind.LOGITS:
                continue  # methods with other features are refused above (teacher) or need them
            if tap.role is Role.STUDENT:
                features[tap] = torch.randn(n, v, generator=generator, requires_grad=True)
            elif tap == t_tap:
                features[tap] = _stand_in_targets(spec, n, min(v, cfg.teachers[index].vocab_size))
            else:
                features[tap] = torch.randn(n, teachers[tap.teacher_index].padded_vocab_size // tp)
        if any(t.role is Role.STUDENT and t.kind is not FeatureKind.LOGITS for t in taps):
            continue  # cannot stand in for student features here; the runtime reports it
        ctx = LossContext(
            step=0,
            total_steps=cfg.train.steps,
            stage=stage,
            loss_mask=torch.ones(n),
            labels=torch.zeros(n, dtype=torch.long),
            vocab_start=0,
            vocab_size=min(v, cfg.student.vocab_size),
            teacher=teachers[index],
            student=student,
            extras={"teachers": teachers, "teacher_labels": torch.zeros(n, dtype=torch.long)},
            batch_size=1,
        )
        try:
            method.compute(features, ctx)
        except SparseTargetsUnsupported as err:
            raise ConfigError(
                f"method {entry.name!r} cannot use the cached teacher ({role}.cache): {err}",
                field=f"{role}.cache",
            ) from None
        except ValueError as err:
            if "temperature" in str(err):
                raise ConfigError(
                    f"method {entry.name!r} with the cached teacher ({role}.cache): {err}",
                    field=f"{role}.cache",
                ) from None
        except Exception:  # noqa: BLE001 (the stand-in is not a real batch; the run decides)
            continue


def _stand_in_targets(spec: CacheSpec, n: int, vocab: int):
    import torch

    from methods.sparse_targets import SparseTargets

    k = max(1, min(spec.slots, vocab))
    ids = torch.arange(k).repeat(n, 1)
    weights = torch.full((n, k), 1.0 / (k + 1))
    tail = None if spec.kind == "sampled" else torch.full((n,), 1.0 / (k + 1))
    return SparseTargets(
        kind=spec.kind,  # type: ignore[arg-type]
        ids=ids,
        weights=weights,
        tail=tail,
        entropy=torch.ones(n),
        temperature=spec.temperature,
    )


def preflight(cfg: DistillConfig, pipeline: Any) -> None:
    """``gkd distill``'s checks of its cached teachers: each cache opens against the run's key
    (checksums verified), and every method can run against it."""
    for index in cached_teachers(cfg):
        reader = open_cache(cfg, index)
        try:
            check_methods_for_cache(cfg, pipeline, reader.spec, index)
        finally:
            reader.close()


# ---------------------------------------------------------------------------- samples
def sample_ids(dataset: Any, step: int, global_batch_size: int, dp_rank: int, dp: int, mbs: int):
    """The sample ids of this rank's microbatches at ``step`` (see the module docstring)."""
    from gkd_cli.data.batching import step_microbatches

    return [
        [int(dataset.order(epoch)[row]) for epoch, row in micro]
        for micro in step_microbatches(dataset, step, global_batch_size, dp_rank, dp, mbs)
    ]


def spec_to_json(spec: CacheSpec) -> dict:
    return dataclasses.asdict(spec)


def arch_record(teacher: ModelConfig) -> dict:
    return {"arch": vars(teacher.arch())}


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- writing (workers)
SETTINGS_FILE = "cache_teacher.json"
"""``--out``, the spec and the schedule chunk, next to the resolved config the workers read."""
CHUNK_MICROBATCHES = 8
"""Microbatches per forward-only schedule call (the pipeline fills once per call)."""


def my_samples(num_samples: int, mbs: int, dp_rank: int, dp: int, done: set[int]) -> list[int]:
    """The sample ids data-parallel rank ``dp_rank`` writes: blocks of ``mbs`` consecutive ids
    dealt round-robin over the ranks, without those already written (resume)."""
    return [i for i in range(num_samples) if (i // mbs) % dp == dp_rank and i not in done]


def extract_targets(logits: Any, spec: CacheSpec, shard: Any, *, seed: int, sample_ids: list[int]):
    """One microbatch's sparse targets as ``gkd cache-teacher`` writes them: top-k with the tail,
    or ``spec.samples`` importance-sampled draws seeded by the run's seed and the microbatch's
    first sample id (the same draws after a resume). ``logits``: vocab-parallel ``[N, V/tp]``."""
    import torch

    from methods import sparse_targets as st

    if spec.kind == st.TOPK:
        return st.from_logits_topk(logits.float(), spec.k, shard, temperature=spec.temperature)
    generator = torch.Generator(device=logits.device)
    generator.manual_seed(seed * 1_000_003 + sample_ids[0])
    return st.from_logits_sampled(
        logits.float(), spec.samples, shard, temperature=spec.temperature, generator=generator
    )


def write_cache(cfg: DistillConfig, out: Path, spec: CacheSpec) -> None:
    """Collective (every rank of the layout): the teacher's sparse targets for every training
    sample, written by tp rank 0 of the last stage of each dp rank; resumes a killed run (the
    samples already written are skipped); rank 0 finalizes (``meta.json``) after all closed."""
    import torch
    import torch.distributed as dist

    from gkd_cli.data import load_tokenizer
    from gkd_cli.teacher_cache import CacheWriter, finalize
    from gkd_cli.worker import build_dataset
    from methods.vocab_parallel import VocabShard
    from parallel.components import TeacherSpec, resolve_precision
    from parallel.distributed import initialize, shutdown
    from parallel.loop import _StopFlag  # the training loop's preemption flag
    from parallel.model import model_info
    from parallel.teacher_source import TeacherForward

    ctx = initialize(cfg.parallel, seed=cfg.train.seed)
    try:
        teacher = cfg.teachers[0]
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        dataset = build_dataset(
            cfg, tokenizer, cfg.data.train_files, rank=ctx.rank, name="train", shuffle=False
        )
        num_samples = dataset.rows_in_epoch(0)
        key = cache_key(cfg, 0)
        writes = ctx.tp_rank == 0 and ctx.is_last_stage
        if ctx.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / ARCH_FILE, arch_record(teacher))
        dist.barrier()
        writer = CacheWriter(out, spec, key, ctx.dp_rank, ctx.dp) if writes else None
        gathered: list = [None] * dist.get_world_size()
        mine = (ctx.dp_rank, sorted(writer.completed_samples()) if writer else None)
        dist.all_gather_object(gathered, mine)
        done = {i for dp_rank, ids in gathered if dp_rank == ctx.dp_rank and ids for i in ids}
        checkpoint = (
            Path(teacher.checkpoint) if teacher.checkpoint and teacher.init != "random" else None
        )
        info = model_info(teacher.arch(), ctx.tp)
        shard_size = info.padded_vocab_size // ctx.tp
        shard = VocabShard(
            ctx.tp_rank * shard_size, teacher.vocab_size, ctx.tp_group if ctx.tp > 1 else None
        )
        seq = cfg.data.seq_length

        def on_logits(logits: torch.Tensor, batch: dict) -> None:
            ids = [int(i) for i in batch["sample_ids"]]
            targets = extract_targets(logits, spec, shard, seed=cfg.train.seed, sample_ids=ids)
            if writer is not None:
                writer.write(ids, targets.to("cpu"), seq)

        engine = TeacherForward(
            ctx=ctx,
            spec=TeacherSpec(teacher.arch(), checkpoint, seed=teacher_seed(cfg, 0)),
            seq_length=seq,
            precision=resolve_precision(cfg.train.precision),
            on_logits=on_logits,
        )
        mbs = cfg.train.micro_batch_size
        todo = my_samples(num_samples, mbs, ctx.dp_rank, ctx.dp, done)
        micro = []
        for start in range(0, len(todo), mbs):
            ids = todo[start : start + mbs]
            rows = [dataset.row(0, i) for i in ids]
            micro.append(
                {
                    "tokens": torch.from_numpy(np.stack([r.tokens for r in rows]).astype(np.int64)),
                    "sample_ids": torch.tensor(ids, dtype=torch.long),
                }
            )
        full = [m for m in micro if len(m["sample_ids"]) == mbs]
        rest = [m for m in micro if len(m["sample_ids"]) != mbs]
        chunks = [full[i : i + CHUNK_MICROBATCHES] for i in range(0, len(full), CHUNK_MICROBATCHES)]
        chunks += [[m] for m in rest]  # one smaller microbatch at the end (its own shape)
        # Every rank runs as many rounds (ranks of different dp ranks may have fewer chunks);
        # a preemption signal (SIGTERM/SIGUSR1, or the launcher's death) stops all of them
        # between rounds with the written samples kept (.part files) and nothing finalized.
        rounds = torch.tensor([len(chunks)], dtype=torch.long, device=ctx.device)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        stop = _StopFlag()
        stop.install()
        stopped = False
        for index in range(int(rounds)):
            flag = torch.tensor(
                [1 if stop.signum is not None else 0], dtype=torch.long, device=ctx.device
            )
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag):
                stopped = True
                break
            if index < len(chunks):
                engine.run(chunks[index])
        stop.restore()
        if stopped:
            if ctx.rank == 0:
                log.warning(
                    "stopped by a signal: the written samples are kept; run gkd "
                    "cache-teacher again to resume"
                )
            return
        if writer is not None:
            writer.close()
        dist.barrier()
        if ctx.rank == 0:
            meta = finalize(out)
            log.info("teacher cache %s: %d samples", out, meta["samples"])
    finally:
        shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Per-rank entry point of ``gkd cache-teacher`` (``python -m gkd_cli.cache_teacher``)."""
    import argparse

    from gkd_cli.config import load_config
    from gkd_cli.teacher_cache import CacheSpec

    parser = argparse.ArgumentParser(prog="gkd_cli.cache_teacher")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    rank_logging()
    cfg = load_config(args.config, environ=os.environ, build_methods=False)
    settings = json.loads((Path(args.config).parent / SETTINGS_FILE).read_text())
    write_cache(cfg, Path(settings["out"]), CacheSpec(**settings["spec"]))
    return 0


# ---------------------------------------------------------------------------- the command
def _default_temperature(cfg: DistillConfig) -> float:
    """The temperature of the config's first logit method that has one, else 1."""
    for entry in cfg.methods:
        value = getattr(entry.params, "temperature", None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return 1.0


def cache_teacher_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="Distillation config (YAML): its teacher, data and layout.",
            show_default=False,
            dir_okay=False,
            metavar="CONFIG",
        ),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Overrides as section.key=value (parallel.dp=2).",
            show_default=False,
            metavar="SECTION.KEY=VALUE",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Cache directory (default: the config's teacher.cache).",
            show_default=False,
        ),
    ] = None,
    kind: Annotated[
        str, typer.Option("--kind", help="topk (top-k with the tail mass) or sampled.")
    ] = "topk",
    k: Annotated[int, typer.Option("--k", help="Entries per token (topk).")] = 64,
    samples: Annotated[
        int, typer.Option("--samples", help="Importance-sampled draws per token (sampled).")
    ] = 12,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            help="Temperature of the cached distribution; a distillation from the cache must "
            "use the same (default: the config's first method temperature, else 1).",
            show_default=False,
        ),
    ] = None,
    quantization: Annotated[
        str, typer.Option("--quantization", help="Top-k weights: u16log, u8log or fp16.")
    ] = "u16log",
    slurm: sc.Slurm = False,
    nodes: sc.Nodes = None,
    gpus_per_node: sc.GpusPerNode = None,
    cpus_per_task: sc.CpusPerTask = None,
    python: sc.Python = None,
    signal_seconds: sc.SignalSeconds = 300,
    requeue: sc.Requeue = True,
    time: sc.Time = None,
    partition: sc.Partition = None,
    account: sc.Account = None,
    job_name: sc.JobName = "gkd-cache",
    sbatch_lines: sc.SbatchLines = None,
    setup_lines: sc.SetupLines = None,
    submit: sc.Submit = False,
) -> None:
    """Run the teacher alone over the training data once and write its sparse targets.

    Runs forward only at the config's layout (torchrun here, or with --slurm a batch script
    like gkd distill's), each data-parallel rank writing its own shard; a rerun after a kill
    resumes (written samples are skipped). Distill from it with teacher: {cache: DIR}.
    """
    from gkd_cli import launch
    from gkd_cli.config import load_config, write_config
    from gkd_cli.preflight import check_checkpoint, check_corpus
    from gkd_cli.teacher_cache import CacheError, CacheSpec

    overrides = list(overrides or [])
    if submit and not slurm:
        raise ConfigError("--submit needs --slurm")
    if nodes is not None:
        if not slurm:
            raise ConfigError("--nodes needs --slurm (or set parallel.nnodes=N)")
        overrides.append(f"parallel.nnodes={nodes}")
    environ = None if slurm else os.environ  # the job's layout is the config's, not this shell's
    cfg = load_config(config, overrides, environ=environ, check_paths=True)
    teacher = cfg.teacher
    if teacher is None:
        raise ConfigError("gkd cache-teacher needs a teacher section", field="teacher")
    root = out if out is not None else (Path(teacher.cache) if teacher.cache else None)
    if root is None:
        raise ConfigError(
            "gkd cache-teacher: give --out DIR or teacher.cache (where the cache goes)",
            field="teacher.cache",
        )
    root = root.expanduser().resolve()
    if teacher.checkpoint is None and teacher.init != "random":
        raise ConfigError(
            "gkd cache-teacher runs the teacher: teacher.checkpoint is required",
            field="teacher.checkpoint",
        )
    cfg = dataclasses.replace(
        cfg,
        teachers=[dataclasses.replace(teacher, cache=None)],
        output=dataclasses.replace(cfg.output, dir=str(root / ".gkd")),
    )
    check_cache_fields(dataclasses.replace(cfg, teachers=[dataclasses.replace(teacher)]))
    if kind not in ("topk", "sampled"):
        raise ConfigError(f"--kind must be topk or sampled, got {kind!r}")
    try:
        spec = CacheSpec(
            kind=kind,
            k=k if kind == "topk" else 0,
            samples=samples if kind == "sampled" else 0,
            temperature=temperature if temperature is not None else _default_temperature(cfg),
            quantization=quantization,
        )
    except CacheError as err:
        raise ConfigError(str(err)) from None
    if kind == "topk" and k > teacher.vocab_size:
        raise ConfigError(f"--k {k} exceeds the teacher's vocabulary ({teacher.vocab_size})")
    check_corpus(cfg, cfg.data.train_files, "data.train_files")
    if teacher.checkpoint and os.path.isdir(teacher.checkpoint) and teacher.init != "random":
        check_checkpoint(cfg, "teacher", cfg.teachers[0])
    header = root / "header.json"
    if header.is_file():  # resuming: the same key and spec, or refuse before launching
        found = json.loads(header.read_text())
        key = dataclasses.asdict(cache_key(cfg, 0))
        for what, expected in (("key", key), ("spec", dataclasses.asdict(spec))):
            if found.get(what) != expected:
                diff = sorted(k for k in expected if found.get(what, {}).get(k) != expected[k])
                raise ConfigError(
                    f"--out {root} holds a teacher cache with another {what} ({', '.join(diff)}); "
                    "choose another --out or delete it"
                )
    config_path = root / ".gkd" / "config.yaml"
    options = None
    if slurm:  # checked before anything is written
        options = launch.slurm_options(
            cfg,
            gpus_per_node=gpus_per_node,
            cpus_per_task=cpus_per_task,
            time=time,
            partition=partition,
            account=account,
            job_name=job_name,
            extra_sbatch=list(sbatch_lines or []),
            setup=list(setup_lines or []),
            python=python,
            signal_seconds=signal_seconds,
            requeue=requeue,
            submit=submit,
        )
        launch.render_sbatch(cfg, options, config_path)  # layout vs nodes and GPUs
    write_config(cfg, config_path)
    write_json_atomic(
        config_path.parent / SETTINGS_FILE, {"out": str(root), "spec": dataclasses.asdict(spec)}
    )
    if options is not None:
        # Every node runs this command on the resolved config (the same key, spec and layout).
        command = ["cache-teacher", str(config_path), "--out", str(root), "--kind", kind]
        command += ["--k", str(k), "--samples", str(samples)]
        command += ["--temperature", repr(spec.temperature), "--quantization", quantization]
        for line in launch.write_batch_script(
            cfg,
            options,
            root / ".gkd" / "gkd.sbatch",
            config_path=config_path,
            and_submit=submit,
            command=command,
            finished_dir=root,
        ):
            typer.echo(line)
        return
    plan = launch.plan_workers(
        cfg, os.environ, entry_module="gkd_cli.cache_teacher", args=["--config", str(config_path)]
    )
    signal_name = launch.run_local(plan)
    if signal_name is not None:
        typer.echo(
            f"preempted ({signal_name}): the samples written so far are kept in {root}; run the "
            "same command again to resume"
        )
        return
    typer.echo(f"teacher cache written to {root}")


__all__: Sequence[str] = [
    "ARCH_FILE",
    "cache_key",
    "check_cache_fields",
    "check_methods_for_cache",
    "open_cache",
    "preflight",
    "sample_ids",
    "with_cached_arch",
]


if __name__ == "__main__":
    import sys

    sys.exit(main())
