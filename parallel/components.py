"""The distillation runtime's components, each built by one function (as torchtitan builds its
model, optimizer and scheduler): :class:`parallel.runtime.DistillationRuntime` only assembles what
these return, in this order (each uses only what the ones before it returned)::

    n = microbatches_per_step(train, seq_length, ctx)  # batch and sequence against the layout
    plan = plan_methods(pipeline, ...)                 # ModelInfo, layout checks, taps
    models = build_models(student, teachers, ...)      # frozen teachers, the student
    sources = build_teacher_sources(teachers, ...)     # co-located or cached teachers
    modules = build_method_modules(plan.entries, ...)  # the methods' trainable modules
    stage = DistillationStage(...)                     # parallel/stage.py
    install_forward_modifiers(...)                     # parallel/forward_hooks.py
    install_vocab_restriction(stage, vocab, ...)       # a compressed student vocabulary (GLMD)
    model = wrap_ddp(stage, modules, ...)              # megatron's DDP, gradient finalization
    optimizer = build_optimizer(model, train, ...)
    scheduler = build_scheduler(optimizer, train)
    checkpoint = TrainingCheckpoint(...)               # parallel/checkpoint.py

The order is part of the behaviour: weights are drawn layout-independently from their own seeds,
but megatron's model construction and the methods' lazily built modules run in it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from methods.base import (
    FeatureKind,
    HasModules,
    HasRuntimeState,
    LossContext,
    ModelInfo,
    Role,
    Tap,
)
from parallel import checkpoint as ckpt
from parallel.config import ModelArch, TrainConfig
from parallel.distributed import ParallelContext
from parallel.init_weights import init_layout_independent
from parallel.method_checks import check_method_layout
from parallel.method_modules import METHODS_PREFIX, MethodModules, wrap_finalize
from parallel.model import build_gpt, detect_accelerators, freeze, model_info
from parallel.stage import DistillationStage
from parallel.taps import ATTENTION_KINDS, check_taps_for_recompute
from parallel.teacher_source import CachedTeacher, ColocatedTeacher, TeacherSource

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


class MethodPipelineLike(Protocol):
    """What the runtime needs of a method pipeline (``methods.pipeline.MethodPipeline``).

    ``parallel/`` does not know any method. When the pipeline also has ``entries`` (items with
    ``name`` and ``method``), the runtime honours the methods' optional protocols of
    ``methods.base`` (modules, forward modifiers, layout checks)."""

    def taps(self, teacher: Any, student: ModelInfo) -> Sequence[Tap]:
        """``teacher``: the first teacher's ModelInfo, or ``None`` in a run without a teacher
        (typed ``Any`` here because ``methods.base.Method.taps`` declares a ModelInfo)."""
        ...

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> tuple[torch.Tensor | None, Mapping[str, torch.Tensor]]: ...


# ---------------------------------------------------------------------------- inputs
@dataclass
class TeacherSpec:
    arch: ModelArch
    checkpoint: Path | None = None
    """gkd checkpoint folder (any layout); ``None`` initializes randomly from ``seed`` (tests, demos)."""
    seed: int = 4321
    cache: Any = None
    """A teacher cache instead of a model (:class:`~parallel.teacher_source.CachedTeacher`): an
    object with ``read(sample_ids, seq_length) -> SparseTargets`` (e.g.
    ``gkd_cli.teacher_cache.CacheReader``, opened and checked by the caller). ``arch`` then only
    describes the teacher to the methods (vocabulary size, widths); no module is built."""


@dataclass
class VocabRestriction:
    """A student with a compressed vocabulary (GLMD): this tp rank's view of the mapping.

    Student column ``j`` of this rank's shard corresponds to teacher column ``teacher_index[j]`` of
    this rank's teacher shard (kept ids are partitioned so that no vocabulary-sized tensor crosses
    ranks); ``valid[j]`` is false for padding slots, whose logits are masked out for both models.
    """

    orig_to_comp: torch.Tensor
    """``[V]`` long: original token id -> compressed id (dropped tokens -> their replacement)."""
    teacher_index: torch.Tensor
    """``[V'/tp]`` long: local teacher column of each local student column."""
    valid: torch.Tensor
    """``[V'/tp]`` bool."""
    kept_orig_to_comp: torch.Tensor | None = None
    """``[V]`` long: the compressed id of each kept original id, -1 for a dropped one (a cached
    teacher's targets are restricted to the kept tokens with it, as the co-located teacher's head
    is); needed only with a cached teacher."""

    def to(self, device: torch.device) -> VocabRestriction:
        kept = self.kept_orig_to_comp
        return VocabRestriction(
            orig_to_comp=self.orig_to_comp.to(device),
            teacher_index=self.teacher_index.to(device),
            valid=self.valid.to(device),
            kept_orig_to_comp=kept.to(device) if kept is not None else None,
        )


MASKED_LOGIT = -1.0e4
"""Logit given to padding slots of a compressed vocabulary: exp() underflows to exactly 0 in fp32
and bf16, while log-probabilities stay finite (no 0 x inf in KL terms)."""


@dataclass(frozen=True)
class Precision:
    params_dtype: torch.dtype
    name: str
    """``"bf16"`` or ``"fp32"`` (written to checkpoint metadata)."""


def resolve_precision(setting: str) -> Precision:
    """``train.precision``: ``auto`` is bf16 on GPU, fp32 on CPU."""
    if setting == "auto":
        setting = "bf16" if torch.cuda.is_available() else "fp32"
    if setting == "bf16":
        return Precision(torch.bfloat16, "bf16")
    return Precision(torch.float32, "fp32")


# ---------------------------------------------------------------------------- checks and plan
def microbatches_per_step(train: TrainConfig, seq_length: int, ctx: ParallelContext) -> int:
    """Microbatches per step on each data-parallel rank; ``ValueError`` when the batch sizes do not
    divide over ``dp`` or the sequence does not split over tp under sequence parallelism."""
    if train.global_batch_size % (train.micro_batch_size * ctx.dp):
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size x dp = {train.micro_batch_size} x {ctx.dp}"
        )
    if ctx.sequence_parallel and seq_length % ctx.tp:
        raise ValueError(
            f"parallel.sequence_parallel splits the sequence over tp={ctx.tp} ranks: the sequence "
            f"length {seq_length} must be a multiple of {ctx.tp} (change data.seq_length or turn "
            "sequence_parallel off)"
        )
    return train.global_batch_size // (train.micro_batch_size * ctx.dp)


@dataclass
class MethodPlan:
    """What the methods need of the models, decided before any model exists."""

    entries: list
    """The pipeline's entries (``name``, ``method``), or empty for a pipeline without any."""
    student_info: ModelInfo
    teacher_infos: list[ModelInfo]
    taps: list[Tap]
    """Every feature some method captures (a tap added later for evaluation is appended)."""

    @property
    def needs_attention(self) -> bool:
        """A tap inside attention: the models use megatron's local spec (not Transformer Engine's
        fused attention, which never materializes these tensors)."""
        return any(t.kind in ATTENTION_KINDS for t in self.taps)


def plan_methods(
    pipeline: MethodPipelineLike,
    *,
    student: ModelArch,
    teachers: Sequence[ModelArch],
    tp: int,
    pp: int,
    recompute: str,
) -> MethodPlan:
    """Check every method against the layout (``ValueError`` naming the fix) and collect the taps.

    The pipeline arrives built: its methods already know the stage and the teachers."""
    student_info = model_info(student, tp)
    teacher_infos = [model_info(arch, tp) for arch in teachers]
    entries = list(getattr(pipeline, "entries", ()))
    for entry in entries:
        check_method_layout(entry.method, entry.name, teacher_infos, student_info, pp=pp)
    taps = list(pipeline.taps(teacher_infos[0] if teacher_infos else None, student_info))
    check_taps_for_recompute(taps, recompute)
    return MethodPlan(entries, student_info, teacher_infos, taps)


# ---------------------------------------------------------------------------- models
@dataclass
class Models:
    """This rank's slices of the models."""

    student: GPTModel
    """Trainable, initialized layout-independently from ``train.seed``."""
    teachers: list[GPTModel] = field(default_factory=list)
    """Frozen (no gradients, eval mode), loaded from their checkpoints or drawn from their seeds:
    one per co-located teacher (a cached teacher has none), in the teachers' order."""


def build_models(
    student: ModelArch,
    teachers: Sequence[TeacherSpec],
    *,
    seed: int,
    precision: Precision,
    recompute: str,
    sequence_parallel: bool,
    needs_attention: bool,
) -> Models:
    """The teachers, then the student, as megatron-core GPTModels on this rank's TP/PP slot.

    Weights are loaded or drawn layout-independently (megatron's own initialization is skipped).
    Transformer Engine's layers are used when installed, unless a tap needs attention internals.
    The teachers share the student's sequence-parallel setting: the stage concatenates the
    activations of all models along the hidden axis."""
    use_te = detect_accelerators().transformer_engine and not needs_attention
    built = []
    for spec in teachers:
        if spec.cache is not None:
            continue  # a cached teacher has no module (parallel.teacher_source.CachedTeacher)
        built.append(
            build_teacher(
                spec, precision=precision, sequence_parallel=sequence_parallel, use_te=use_te
            )
        )
    student_model = build_gpt(
        student,
        params_dtype=precision.params_dtype,
        recompute=recompute,
        sequence_parallel=sequence_parallel,
        use_te=use_te,
        perform_initialization=False,
    )
    init_layout_independent(student_model, seed=seed, num_layers=student.num_layers)
    return Models(student=student_model, teachers=built)


def build_teacher(
    spec: TeacherSpec, *, precision: Precision, sequence_parallel: bool, use_te: bool
) -> GPTModel:
    """One frozen teacher on this rank's TP/PP slot, loaded from its checkpoint or drawn from
    its seed (layout-independently)."""
    teacher = build_gpt(
        spec.arch,
        params_dtype=precision.params_dtype,
        sequence_parallel=sequence_parallel,
        use_te=use_te,
        perform_initialization=False,
    )
    if spec.checkpoint is None:
        init_layout_independent(teacher, seed=spec.seed, num_layers=spec.arch.num_layers)
    else:
        load_teacher(teacher, spec)
    return freeze(teacher)


def build_teacher_sources(
    specs: Sequence[TeacherSpec],
    modules: Sequence[GPTModel],
    *,
    ctx: ParallelContext,
    seq_length: int,
) -> list[TeacherSource]:
    """One :class:`~parallel.teacher_source.TeacherSource` per teacher, in order: the built
    ``modules`` (one per co-located teacher, as :func:`build_models` returns them) or the cache."""
    remaining = iter(modules)
    sources: list[TeacherSource] = []
    for index, spec in enumerate(specs):
        if spec.cache is not None:
            sources.append(
                CachedTeacher(
                    functools.partial(_read_cache, spec.cache, seq_length=seq_length),
                    index=index,
                    is_last_stage=ctx.is_last_stage,
                    device=ctx.device,
                )
            )
        else:
            sources.append(
                ColocatedTeacher(next(remaining), index=index, hidden_size=spec.arch.hidden_size)
            )
    return sources


def _read_cache(reader: Any, sample_ids: Sequence[int], *, seq_length: int) -> Any:
    return reader.read(sample_ids, seq_length)


def load_teacher(teacher: GPTModel, spec: TeacherSpec) -> None:
    """Load ``spec.checkpoint`` (a Hugging Face folder or a gkd checkpoint at any layout) into
    ``teacher``; ``CheckpointError`` when its architecture differs from ``spec.arch``."""
    from parallel.hf import is_hf_dir, load_hf_weights

    if spec.checkpoint is None:
        raise ValueError("load_teacher needs a checkpoint (a teacher without one is drawn)")
    if is_hf_dir(spec.checkpoint):
        load_hf_weights(teacher, spec.checkpoint, spec.arch)  # checks the architecture itself
        return
    folder = ckpt.resolve(spec.checkpoint)
    meta = ckpt.read_meta(folder)
    saved = meta.get("arch")
    if saved is not None:
        # Rotary models have no position table: a shorter configured max_seq_len is fine.
        ignored = {"max_seq_len"} if spec.arch.position_embedding == "rope" else set()
        mismatched = {
            k: (saved.get(k), v)
            for k, v in vars(spec.arch).items()
            if k in saved and saved[k] != v and k not in ignored
        }
        if mismatched:
            details = ", ".join(
                f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in mismatched.items()
            )
            raise ckpt.CheckpointError(
                f"teacher checkpoint {folder} has another architecture ({details}); set teacher.* to "
                "the checkpoint's values (see its meta.json)"
            )
    ckpt.verify_manifest(folder, checksums=False)
    ckpt.load_model_weights(folder, teacher)


# ---------------------------------------------------------------------------- method modules
def build_method_modules(
    entries: Sequence,
    *,
    student_layers: int,
    ctx: ParallelContext,
    seed: int,
    dtype: torch.dtype,
) -> MethodModules:
    """Collective: this stage's trainable method modules (:mod:`parallel.method_modules`), made
    equal on every replica."""
    modules = MethodModules(
        entries,
        student_layers=student_layers,
        pp=ctx.pp,
        pp_rank=ctx.pp_rank,
        tp_rank=ctx.tp_rank,
        dp_rank=ctx.dp_rank,
        seed=seed,
        device=ctx.device,
        dtype=dtype,
    )
    modules.synchronize(tp_group=ctx.tp_group, pp_group=ctx.pp_group, dp_group=ctx.dp_group)
    return modules


def method_modules_checkpoint(
    entries: Sequence, modules: MethodModules, *, tp: int
) -> ckpt.ExtraShardedState | None:
    """The method modules as the checkpoint wants them; ``None`` when no method has any (a stage
    without modules of a method that has some still saves its empty share)."""
    if not any(isinstance(e.method, HasModules) for e in entries):
        return None
    return ckpt.ExtraShardedState(
        sharded_state_dict=lambda: modules.sharded_state_dict(METHODS_PREFIX, tp=tp),
        load=lambda loaded: modules.load_loaded(loaded, METHODS_PREFIX),
    )


def method_runtime_state(entries: Sequence) -> ckpt.MethodRuntimeState | None:
    """The methods' state between steps (``methods.base.HasRuntimeState``) as the checkpoint wants
    it, keyed by each entry's name; ``None`` when no method keeps any (the same on every rank: the
    entries come from the config)."""
    keeping = [e for e in entries if isinstance(e.method, HasRuntimeState)]
    if not keeping:
        return None

    def get() -> dict:
        return {e.name: e.method.runtime_state() for e in keeping}

    def load(state: dict) -> None:
        for e in keeping:
            if e.name in state:
                e.method.load_runtime_state(state[e.name])

    return ckpt.MethodRuntimeState(get=get, load=load)


# ---------------------------------------------------------------------------- vocabulary
def install_vocab_restriction(
    stage: DistillationStage, vocab: VocabRestriction, *, shard_size: int, vocab_size: int
) -> None:
    """Distill a compressed student vocabulary: the teachers' heads compute only the kept columns
    in training (:func:`restrict_head`), and padding slots (if any) get :data:`MASKED_LOGIT` in
    both models' logits. ``shard_size`` is the student's padded vocabulary per tp rank,
    ``vocab_size`` the configured ``student.vocab_size`` (for the error message)."""
    if vocab.teacher_index.numel() != shard_size:
        raise ValueError(
            f"the vocabulary mapping gives {vocab.teacher_index.numel()} student columns per tp rank, "
            f"but student.vocab_size={vocab_size} gives {shard_size}; set "
            "student.vocab_size to the mapping's compressed size"
        )
    invalid = ~vocab.valid
    has_padding = bool(invalid.any())

    def student_logits(logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(invalid, MASKED_LOGIT)

    def teacher_logits(logits: torch.Tensor) -> torch.Tensor:
        # The teacher's head already computed only the kept columns (see restrict_head).
        return logits.masked_fill_(invalid, MASKED_LOGIT) if has_padding else logits

    for teacher in stage.teachers:
        restrict_head(teacher, vocab.teacher_index, stage)

    if has_padding:  # without padding slots (balanced selection) the logits need no masked copy
        stage.feature_transforms[Tap(Role.STUDENT, FeatureKind.LOGITS)] = student_logits
    for source in stage.sources:
        if isinstance(source, CachedTeacher):
            # Sparse targets hold original ids: keep the kept tokens', in compressed ids (the
            # restricted head's distribution; a dropped token's mass is not its replacement's).
            kept = vocab.kept_orig_to_comp
            if kept is None:
                raise ValueError(
                    "a cached teacher with a compressed vocabulary needs the mapping's kept ids "
                    "(VocabRestriction.kept_orig_to_comp)"
                )
            source.transform = lambda targets, table=kept: targets.remap(table)
            continue
        tap = Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=source.index)
        stage.training_transforms[tap] = teacher_logits


def restrict_head(teacher: torch.nn.Module, index: torch.Tensor, stage: torch.nn.Module) -> None:
    """In training, the frozen teacher's output layer computes only the columns the student
    keeps (``hidden @ W[index]^T``): the full ``[s, b, V/tp]`` teacher logits are never
    materialized, which halves the teacher head's time and memory at V' = V/2. Evaluation
    (``stage.eval()``) runs the full head. Column-parallel input needs no communication here:
    the teacher runs without sequence parallelism and under ``no_grad``."""
    layer = getattr(teacher, "output_layer", None)
    if layer is None:  # not the last pipeline stage
        return
    full_forward = layer.forward
    layer.gkd_restricted_rows = index  # read by the fused head (parallel.taps.head_input)

    def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
        if not stage.training:
            return full_forward(
                input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs
            )
        full_weight = layer.weight if weight is None else weight
        return torch.nn.functional.linear(input_, full_weight.index_select(0, index)), None

    layer.forward = forward


# ---------------------------------------------------------------------------- training
def wrap_ddp(
    stage: DistillationStage, method_modules: MethodModules, *, pp_group
) -> DistributedDataParallel:
    """megatron-core's DDP around the stage (distributed optimizer, gradients reduced in fp32);
    the schedule's ``no_sync`` and gradient finalization (with the pipeline sum of replicated
    method parameters) go into the student's config, where megatron's schedules read them."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    config = stage.module.config
    model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
        ),
        module=stage,
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = wrap_finalize(
        finalize_model_grads, method_modules.replicated_parameters(), pp_group
    )
    return model


def build_optimizer(
    model: DistributedDataParallel, train: TrainConfig, precision: Precision
) -> MegatronOptimizer:
    """megatron-core's distributed Adam over the student and the method modules."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=train.lr,
            min_lr=train.min_lr,
            weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1,
            adam_beta2=train.adam_beta2,
            clip_grad=train.clip_grad,
            bf16=precision.params_dtype == torch.bfloat16,
            params_dtype=precision.params_dtype,
            use_distributed_optimizer=True,
        ),
        [model],
    )


def build_scheduler(optimizer: MegatronOptimizer, train: TrainConfig) -> OptimizerParamScheduler:
    """Linear warm-up over ``train.warmup_steps``, then ``train.decay`` to ``train.min_lr`` at the
    last step (``constant``: the learning rate stays ``train.lr``); constant weight decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = max(1, train.steps - train.warmup_steps) + train.warmup_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train.warmup_steps else train.lr,
        max_lr=train.lr,
        min_lr=train.min_lr if train.decay != "constant" else train.lr,
        lr_warmup_steps=train.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=train.decay,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


def checkpoint_layout(ctx: ParallelContext) -> ckpt.Layout:
    """This rank's place, as checkpoints record it."""
    return ckpt.Layout(
        tp=ctx.tp,
        pp=ctx.pp,
        dp=ctx.dp,
        tp_rank=ctx.tp_rank,
        pp_rank=ctx.pp_rank,
        dp_rank=ctx.dp_rank,
    )
