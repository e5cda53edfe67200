"""The distillation runtime: frozen teachers and a trainable student on megatron-core, stepped by
megatron-core's own forward-backward schedules (1F1B when pp > 1).

Build it inside a torchrun worker after :func:`parallel.distributed.initialize`::

    runtime = DistillationRuntime(ctx=ctx, student=arch_s, teachers=[TeacherSpec(arch_t, ckpt)],
                                  pipeline=method_pipeline, train=train_cfg, seq_length=512)
    for step in range(start, train_cfg.steps):
        result = runtime.train_step(step, microbatches)   # this dp rank's [b, s+1] token tensors

The method pipeline is any object with ``taps(teacher_info, student_info) -> list[Tap]`` and
``compute(features, ctx) -> (total | None, terms)`` (see ``methods.pipeline``): ``parallel/`` does
not know any method. When it also has ``entries`` (``methods.pipeline.PipelineEntry``: ``name``,
``method``), the runtime honours the methods' optional protocols of ``methods.base``:

* multi-teacher combiners (``methods.multi_teacher``) are built with every teacher's
  ``ModelInfo`` in their ``BuildContext`` before ``taps``.
* ``HasModules`` / ``PlacesModules``: their modules train with the student and are checkpointed
  (:mod:`parallel.method_modules`).
* ``ForwardModifier``: ``install(handles)`` with :class:`parallel.forward_hooks.RuntimeHandles`
  (layer hooks, doubled microbatches, the gradient-perturbation second pass).
* ``requires_single_stage`` / ``PairsLayers``: checked against the layout
  (:func:`parallel.method_checks.check_method_layout`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from methods.base import (
    BuildContext,
    FeatureKind,
    ForwardModifier,
    HasModules,
    LossContext,
    Role,
    Stage,
    Tap,
)
from parallel import checkpoint as ckpt
from parallel.config import ModelArch, TrainConfig
from parallel.distributed import ParallelContext
from parallel.init_weights import init_layout_independent
from parallel.memory import allocated_bytes
from parallel.method_checks import check_method_layout
from parallel.method_modules import METHODS_PREFIX, MethodModules, wrap_finalize
from parallel.model import build_gpt, detect_accelerators, freeze, model_info
from parallel.numerics import step_problem
from parallel.stage import AttachAuxLoss, DistillationStage
from parallel.taps import ATTENTION_KINDS, check_taps_for_recompute

log = logging.getLogger(__name__)


@dataclass
class TeacherSpec:
    arch: ModelArch
    checkpoint: Path | None = None
    """gkd checkpoint folder (any layout); ``None`` initializes randomly from ``seed`` (tests, demos)."""
    seed: int = 4321


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


MASKED_LOGIT = -1.0e4
"""Logit given to padding slots of a compressed vocabulary: exp() underflows to exactly 0 in fp32
and bf16, while log-probabilities stay finite (no 0 x inf in KL terms)."""


@dataclass
class StepResult:
    step: int
    loss: float
    terms: dict[str, float]
    lr: float
    grad_norm: float
    skipped: bool
    seconds: float
    tokens: int


@dataclass
class _Precision:
    params_dtype: torch.dtype
    name: str


def resolve_precision(setting: str) -> _Precision:
    if setting == "auto":
        setting = "bf16" if torch.cuda.is_available() else "fp32"
    if setting == "bf16":
        return _Precision(torch.bfloat16, "bf16")
    return _Precision(torch.float32, "fp32")


class DistillationRuntime:
    """Teachers + student on this rank's TP/PP/DP slot, with optimizer, scheduler and checkpoints."""

    def __init__(
        self,
        *,
        ctx: ParallelContext,
        student: ModelArch,
        teachers: Sequence[TeacherSpec],
        pipeline,
        train: TrainConfig,
        seq_length: int,
        pad_id: int | None = None,
        student_init: Path | None = None,
        vocab: VocabRestriction | None = None,
    ) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.baseline_memory_bytes = allocated_bytes() or 0
        """Bytes allocated before any model was built, so that the step peak minus this baseline
        is what the runtime itself holds (compared with ``gkd plan`` in the tests)."""
        self.ctx = ctx
        self.train_cfg = train
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.vocab = vocab
        if vocab is not None:
            vocab.orig_to_comp = vocab.orig_to_comp.to(ctx.device)
            vocab.teacher_index = vocab.teacher_index.to(ctx.device)
            vocab.valid = vocab.valid.to(ctx.device)
        self.pipeline = pipeline
        self.stage_kind = Stage(train.stage)
        self.precision = resolve_precision(train.precision)
        self.accelerators = detect_accelerators()
        self.student_arch = student
        self.teacher_specs = list(teachers)
        if train.global_batch_size % (train.micro_batch_size * ctx.dp):
            raise ValueError(
                f"train.global_batch_size={train.global_batch_size} is not divisible by "
                f"train.micro_batch_size x dp = {train.micro_batch_size} x {ctx.dp}"
            )
        self.num_microbatches = train.global_batch_size // (train.micro_batch_size * ctx.dp)

        self.student_info = model_info(student, ctx.tp)
        self.teacher_infos = [model_info(t.arch, ctx.tp) for t in self.teacher_specs]
        self.entries = list(getattr(pipeline, "entries", ()))
        for entry in self.entries:
            if getattr(entry.method, "teachers", None) == ():  # a combiner built without them
                from methods.registry import build_method  # issue 12 interim: until one builder

                build = BuildContext(self.stage_kind, tuple(self.teacher_infos), self.student_info)
                entry.method = build_method(entry.name, entry.method.params, build)
            check_method_layout(
                entry.method, entry.name, self.teacher_infos, self.student_info, pp=ctx.pp
            )
        self.taps = list(
            pipeline.taps(self.teacher_infos[0] if self.teacher_infos else None, self.student_info)
        )
        check_taps_for_recompute(self.taps, train.recompute)
        needs_attention = any(t.kind in ATTENTION_KINDS for t in self.taps)
        use_te = self.accelerators.transformer_engine and not needs_attention

        if ctx.sequence_parallel and seq_length % ctx.tp:
            raise ValueError(
                f"parallel.sequence_parallel splits the sequence over tp={ctx.tp} ranks: the sequence "
                f"length {seq_length} must be a multiple of {ctx.tp} (change data.seq_length or turn "
                "sequence_parallel off)"
            )
        # Teachers: frozen, same TP/PP groups, bf16 on GPU.
        self.teachers = []
        for spec in self.teacher_specs:
            # Weights are loaded or drawn layout-independently below: skip megatron's own init.
            teacher = build_gpt(
                spec.arch,
                params_dtype=self.precision.params_dtype,
                sequence_parallel=ctx.sequence_parallel,  # the stage concatenates both along h
                use_te=use_te,
                perform_initialization=False,
            )
            if spec.checkpoint is None:
                init_layout_independent(teacher, seed=spec.seed, num_layers=spec.arch.num_layers)
            else:
                self._load_teacher(teacher, spec)
            self.teachers.append(freeze(teacher))

        student_model = build_gpt(
            student,
            params_dtype=self.precision.params_dtype,
            recompute=train.recompute,
            sequence_parallel=ctx.sequence_parallel,
            use_te=use_te,
            perform_initialization=False,
        )
        init_layout_independent(student_model, seed=train.seed, num_layers=student.num_layers)
        self.method_modules = MethodModules(
            self.entries,
            student_layers=student.num_layers,
            pp=ctx.pp,
            pp_rank=ctx.pp_rank,
            tp_rank=ctx.tp_rank,
            dp_rank=ctx.dp_rank,
            seed=train.seed,
            device=ctx.device,
            dtype=self.precision.params_dtype,
        )
        self.method_modules.synchronize(
            tp_group=ctx.tp_group, pp_group=ctx.pp_group, dp_group=ctx.dp_group
        )
        self.stage = DistillationStage(
            student_model,
            self.teachers,
            taps=self.taps,
            compute_fn=pipeline.compute,
            context_fn=self._loss_context,
            teacher_hidden_sizes=[t.arch.hidden_size for t in self.teacher_specs],
            is_last_stage=ctx.is_last_stage,
            method_modules=self.method_modules if len(self.method_modules) else None,
        )
        from parallel.forward_hooks import RuntimeHandles

        self.handles = RuntimeHandles(self)
        for entry in self.entries:
            if isinstance(entry.method, ForwardModifier):
                if ctx.sequence_parallel:
                    # Their hooks see layer inputs of [s/tp, b, h] (per-sequence norms, token swaps).
                    raise ValueError(
                        f"method {entry.name!r} changes the forward pass, which gkd does not support "
                        "with parallel.sequence_parallel=true; turn sequence_parallel off"
                    )
                entry.method.install(self.handles)
        if vocab is not None:
            self._install_vocab_restriction(vocab)
        config = student_model.config
        self.model = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
            ),
            module=self.stage,
        )
        config.no_sync_func = self.model.no_sync
        config.finalize_model_grads_func = wrap_finalize(
            finalize_model_grads, self.method_modules.replicated_parameters(), ctx.pp_group
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=train.lr,
                min_lr=train.min_lr,
                weight_decay=train.weight_decay,
                adam_beta1=train.adam_beta1,
                adam_beta2=train.adam_beta2,
                clip_grad=train.clip_grad,
                bf16=self.precision.params_dtype == torch.bfloat16,
                params_dtype=self.precision.params_dtype,
                use_distributed_optimizer=True,
            ),
            [self.model],
        )
        decay_steps = max(1, train.steps - train.warmup_steps) + train.warmup_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
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
        if student_init is not None:
            ckpt.load_model_weights(Path(student_init), self.stage.module)
        self._step = 0

    # ------------------------------------------------------------------ building blocks
    def _load_teacher(self, teacher, spec: TeacherSpec) -> None:
        from parallel.hf import is_hf_dir, load_hf_weights

        if spec.checkpoint is not None and is_hf_dir(spec.checkpoint):
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

    def _restrict_head(self, teacher: torch.nn.Module, index: torch.Tensor) -> None:
        """In training, the frozen teacher's output layer computes only the columns the student
        keeps (``hidden @ W[index]^T``): the full ``[s, b, V/tp]`` teacher logits are never
        materialized, which halves the teacher head's time and memory at V' = V/2. Evaluation
        (``stage.eval()``) runs the full head. Column-parallel input needs no communication here:
        the teacher runs without sequence parallelism and under ``no_grad``."""
        layer = getattr(teacher, "output_layer", None)
        if layer is None:  # not the last pipeline stage
            return
        full_forward = layer.forward
        stage = self.stage

        def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
            if not stage.training:
                return full_forward(
                    input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs
                )
            full_weight = layer.weight if weight is None else weight
            return torch.nn.functional.linear(input_, full_weight.index_select(0, index)), None

        layer.forward = forward

    def _install_vocab_restriction(self, vocab: VocabRestriction) -> None:
        shard = self.student_info.padded_vocab_size // self.ctx.tp
        if vocab.teacher_index.numel() != shard:
            raise ValueError(
                f"the vocabulary mapping gives {vocab.teacher_index.numel()} student columns per tp rank, "
                f"but student.vocab_size={self.student_arch.vocab_size} gives {shard}; set "
                "student.vocab_size to the mapping's compressed size"
            )
        invalid = ~vocab.valid
        has_padding = bool(invalid.any())

        def student_logits(logits: torch.Tensor) -> torch.Tensor:
            return logits.masked_fill(invalid, MASKED_LOGIT)

        def teacher_logits(logits: torch.Tensor) -> torch.Tensor:
            # The teacher's head already computed only the kept columns (see _restrict_head).
            return logits.masked_fill_(invalid, MASKED_LOGIT) if has_padding else logits

        for teacher in self.teachers:
            self._restrict_head(teacher, vocab.teacher_index)

        if has_padding:  # without padding slots (balanced selection) the logits need no masked copy
            self.stage.feature_transforms[Tap(Role.STUDENT, FeatureKind.LOGITS)] = student_logits
        for index in range(len(self.teachers)):
            self.stage.training_transforms[
                Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=index)
            ] = teacher_logits

    def _loss_context(self, batch: dict) -> LossContext:
        shard = self.student_info.padded_vocab_size // self.ctx.tp
        # With a compressed vocabulary the padding slots are masked in the logits themselves, so
        # every column of the (already aligned) shards counts.
        vocab_size = (
            self.student_info.padded_vocab_size
            if self.vocab is not None
            else self.student_info.vocab_size
        )
        return LossContext(
            step=self._step,
            total_steps=self.train_cfg.steps,
            stage=self.stage_kind,
            loss_mask=batch["loss_mask"],
            labels=batch["labels"],
            vocab_start=self.ctx.tp_rank * shard,
            vocab_size=vocab_size,
            tp_group=self.ctx.tp_group if self.ctx.tp > 1 else None,
            dp_group=self.ctx.dp_group if self.ctx.dp > 1 else None,
            teacher=self.teacher_infos[0] if self.teacher_infos else None,
            student=self.student_info,
            extras={"teachers": self.teacher_infos, "teacher_labels": batch["teacher_labels"]},
            token_mask=batch["token_mask"],
        )

    def _make_batch(self, tokens: torch.Tensor) -> dict:
        """``tokens [b, s+1]`` -> inputs ``[b, s]``; labels and mask flattened s-major ``[s*b]`` to
        match the ``[s, b, ...]`` layout of features and logits."""
        tokens = tokens.to(self.ctx.device, non_blocking=True)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        b, s = inputs.shape
        if self.pad_id is None:
            mask = torch.ones_like(labels, dtype=torch.float32)
            token_mask = None
        else:
            mask = (labels != self.pad_id).float()
            # GLMD distills at every non-padding position, also the last one (whose label is pad).
            token_mask = (inputs != self.pad_id).float().t().reshape(-1)
        student_tokens = tokens if self.vocab is None else self.vocab.orig_to_comp[tokens]
        return {
            "input_ids": inputs,
            "student_input_ids": student_tokens[:, :-1],
            "position_ids": torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s),
            "labels": student_tokens[:, 1:].t().reshape(-1),
            "teacher_labels": labels.t().reshape(-1),
            "loss_mask": mask.t().reshape(-1),
            "token_mask": token_mask,
        }

    def _forward_step(self, data_iterator, model):
        batch = self._make_batch(next(data_iterator))
        output = model(batch)
        return output, _loss_passthrough

    def _run_schedule(self, microbatches: Sequence[torch.Tensor], *, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if len(microbatches) != self.num_microbatches:
            raise ValueError(
                f"expected {self.num_microbatches} microbatches, got {len(microbatches)}"
            )
        width = sum(t.arch.hidden_size for t in self.teacher_specs) + self.student_arch.hidden_size
        # Doubled microbatches (ForwardHandles.double_batch) in training only.
        b = self.train_cfg.micro_batch_size * (1 if forward_only else self.stage.batch_multiplier)

        # Under sequence parallelism the activations between stages are [s/tp, b, h].
        s = self.seq_length // self.ctx.tp if self.ctx.sequence_parallel else self.seq_length

        def shapes(recv, send):
            shape = (s, b, width)
            return [shape], [shape]

        AttachAuxLoss.scale = 1.0 / self.num_microbatches
        self.stage.microbatch_weight = 1.0 / self.num_microbatches
        self.stage.microbatch_index = 0
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(microbatches),
            model=[self.model],
            num_microbatches=self.num_microbatches,
            seq_length=self.seq_length,
            micro_batch_size=b,
            forward_only=forward_only,
            adjust_tensor_shapes_fn=shapes if self.ctx.pp > 1 else None,
        )

    def _reduce_terms(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum the terms over pipeline stages (each stage computed its own), average over dp."""
        gathered: list = [None] * self.ctx.pp
        if self.ctx.pp > 1:
            dist.all_gather_object(gathered, sums, group=self.ctx.pp_group)
        else:
            gathered = [sums]
        merged: dict[str, float] = {}
        for part in gathered:
            for name, value in part.items():
                merged[name] = merged.get(name, 0.0) + value
        if self.ctx.dp > 1:
            names = sorted(merged)
            values = torch.tensor([merged[n] for n in names], dtype=torch.float64)
            dist.all_reduce(values, group=self.ctx.dp_group)
            merged = {n: float(v) / self.ctx.dp for n, v in zip(names, values, strict=True)}
        return merged

    # ------------------------------------------------------------------ public
    def ensure_tap(self, tap: Tap) -> None:
        """Capture ``tap`` from now on even if no method asked for it (evaluation)."""
        if tap not in self.taps:
            self.taps.append(tap)
            self.stage.add_tap(tap)

    @property
    def student(self) -> torch.nn.Module:
        return self.stage.module

    def train_step(self, step: int, microbatches: Sequence[torch.Tensor]) -> StepResult:
        start = time.perf_counter()
        self._step = step
        self.stage.train()
        for teacher in self.teachers:
            teacher.eval()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.stage.embedding_grads.clear()
        if self.stage.embedding_epsilon:
            # Gradient perturbation (ForwardHandles.perturb_embeddings): a first pass only records
            # the gradient of the embedding output (kept in stage.embedding_grads until the next
            # step); its parameter gradients and terms are dropped.
            self.stage.embedding_mode = "record"
            self._run_schedule(microbatches, forward_only=False)
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            self.stage.tracker.pop()
            self.stage.embedding_mode = "perturb"
        try:
            self._run_schedule(microbatches, forward_only=False)
        finally:
            self.stage.embedding_mode = None
        terms = self._reduce_terms(self.stage.tracker.pop())
        lr = self.optimizer.param_groups[0]["lr"]
        problem = step_problem(step, terms, self.model, rank=self.ctx.rank)
        if problem is not None:  # before optimizer.step(): the weights stay as they were
            skipped = getattr(self, "skipped_steps", 0)
            if skipped >= self.train_cfg.max_skipped_steps:
                raise FloatingPointError(
                    f"{problem}; the optimizer step was not applied (train.max_skipped_steps="
                    f"{self.train_cfg.max_skipped_steps}, {skipped} skipped so far)"
                )
            self.skipped_steps = skipped + 1
            log.warning(
                "%s; skipping this step (%d of train.max_skipped_steps=%d)",
                problem,
                self.skipped_steps,
                self.train_cfg.max_skipped_steps,
            )
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            self.scheduler.step(increment=1)  # the step counts: resumed runs see the same schedule
            return StepResult(
                step=step,
                loss=terms.pop("loss", float("nan")),
                terms=terms,
                lr=lr,
                grad_norm=float("nan"),
                skipped=True,
                seconds=time.perf_counter() - start,
                tokens=self.train_cfg.global_batch_size * self.seq_length,
            )
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        loss = terms.pop("loss", float("nan"))
        tokens = self.train_cfg.global_batch_size * self.seq_length
        return StepResult(
            step=step,
            loss=loss,
            terms=terms,
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            skipped=not ok,
            seconds=time.perf_counter() - start,
            tokens=tokens,
        )

    @torch.no_grad()
    def evaluate(self, microbatches: Sequence[torch.Tensor], compute_fn) -> dict[str, float]:
        """Forward-only pass with another loss (e.g. student/teacher LM loss); returns its terms
        averaged over the microbatches and dp."""
        saved = self.stage.compute_fn
        self.stage.compute_fn = compute_fn
        self.stage.eval()
        try:
            self._run_schedule(microbatches, forward_only=True)
        finally:
            self.stage.compute_fn = saved
            self.stage.train()
        return self._reduce_terms(self.stage.tracker.pop())

    def layout(self) -> ckpt.Layout:
        c = self.ctx
        return ckpt.Layout(
            tp=c.tp, pp=c.pp, dp=c.dp, tp_rank=c.tp_rank, pp_rank=c.pp_rank, dp_rank=c.dp_rank
        )

    def save(
        self,
        root: Path,
        *,
        step: int,
        meta: dict,
        config_yaml: str,
        keep_last: int,
        extra_files: dict | None = None,
    ) -> Path:
        meta = {
            **meta,
            "arch": vars(self.student_arch),
            "precision": self.precision.name,
            "skipped_steps": getattr(self, "skipped_steps", 0),
        }
        return ckpt.save(
            root,
            step=step,
            model=self.stage.module,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            layout=self.layout(),
            method_modules=self._modules_for_checkpoint(),
            meta=meta,
            config_yaml=config_yaml,
            keep_last=keep_last,
            extra_files=extra_files,
        )

    def load(self, folder: Path) -> dict:
        meta = ckpt.load_training_state(
            folder,
            model=self.stage.module,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            layout=self.layout(),
            method_modules=self._modules_for_checkpoint(),
        )
        self.skipped_steps = int(meta.get("skipped_steps", 0))  # the skip budget spans resumes
        return meta

    def _modules_for_checkpoint(self):
        """The method modules as the checkpoint wants them (``None`` when no method has any)."""
        if not any(isinstance(e.method, HasModules) for e in self.entries):
            return None
        return ckpt.ExtraShardedState(
            sharded_state_dict=lambda: self.method_modules.sharded_state_dict(
                METHODS_PREFIX, tp=self.ctx.tp
            ),
            load=lambda loaded: self.method_modules.load_loaded(loaded, METHODS_PREFIX),
        )

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of this rank's teacher and student parameters (for benchmarks and the planner)."""
        teacher = sum(p.numel() * p.element_size() for t in self.teachers for p in t.parameters())
        student = sum(p.numel() * p.element_size() for p in self.stage.module.parameters())
        return {"teacher": teacher, "student": student}


def _loss_passthrough(output: torch.Tensor):
    return output, {}
