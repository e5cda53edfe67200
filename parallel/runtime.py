"""The distillation runtime: frozen teachers and a trainable student on megatron-core, stepped by
megatron-core's own forward-backward schedules (1F1B when pp > 1).

Build it inside a torchrun worker after :func:`parallel.distributed.initialize`::

    runtime = DistillationRuntime(ctx=ctx, student=arch_s, teachers=[TeacherSpec(arch_t, ckpt)],
                                  pipeline=method_pipeline, train=train_cfg, seq_length=512)
    for step in range(start, train_cfg.steps):
        result = runtime.train_step(step, microbatches)   # this dp rank's [b, s+1] token tensors

The method pipeline is any object with ``taps(teacher_info, student_info) -> list[Tap]`` and
``compute(features, ctx) -> (total | None, terms)`` (see ``methods.pipeline``), built before the
runtime: its methods already know the stage and the teachers, and the runtime never changes them.
``parallel/`` does not know any method. When the pipeline also has ``entries``
(``methods.pipeline.PipelineEntry``: ``name``, ``method``), the runtime honours the methods'
optional protocols of ``methods.base``:

* ``HasModules`` / ``PlacesModules``: their modules train with the student and are checkpointed
  (:mod:`parallel.method_modules`).
* ``ForwardModifier``: ``install(handles)`` with :class:`parallel.forward_hooks.RuntimeHandles`
  (layer hooks, doubled microbatches, the gradient-perturbation second pass).
* ``requires_single_stage`` / ``PairsLayers``: checked against the layout
  (:func:`parallel.method_checks.check_method_layout`).

The constructor only assembles components built by the functions of :mod:`parallel.components`
(models, method modules, optimizer, scheduler, checkpoint); this module steps them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from methods.base import LossContext, Stage, Tap
from methods.vocab_parallel import CHUNK_SIZE_EXTRA
from parallel import checkpoint as ckpt
from parallel.components import (
    MASKED_LOGIT,
    MethodPipelineLike,
    Precision,
    TeacherSpec,
    VocabRestriction,
    build_method_modules,
    build_models,
    build_optimizer,
    build_scheduler,
    build_teacher_sources,
    checkpoint_layout,
    install_vocab_restriction,
    method_modules_checkpoint,
    method_runtime_state,
    microbatches_per_step,
    plan_methods,
    resolve_precision,
    wrap_ddp,
)
from parallel.config import ModelArch, TrainConfig
from parallel.distributed import ParallelContext
from parallel.forward_hooks import RuntimeHandles, install_forward_modifiers
from parallel.memory import allocated_bytes
from parallel.numerics import step_problem
from parallel.stage import AttachAuxLoss, DistillationStage, StepState, configure_head_path

__all__ = [
    "MASKED_LOGIT",
    "DistillationRuntime",
    "Precision",
    "StepResult",
    "TeacherSpec",
    "VocabRestriction",
    "resolve_precision",
]

log = logging.getLogger(__name__)


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


class DistillationRuntime:
    """Teachers + student on this rank's TP/PP/DP slot, with optimizer, scheduler and checkpoints."""

    def __init__(
        self,
        *,
        ctx: ParallelContext,
        student: ModelArch,
        teachers: Sequence[TeacherSpec],
        pipeline: MethodPipelineLike,
        train: TrainConfig,
        seq_length: int,
        pad_id: int | None = None,
        student_init: Path | None = None,
        student_init_layers: list[int] | None = None,
        vocab: VocabRestriction | None = None,
        attention_masks: bool = False,
    ) -> None:
        self.baseline_memory_bytes = allocated_bytes() or 0
        """Bytes allocated before any model was built, so that the step peak minus this baseline
        is what the runtime itself holds (compared with ``gkd plan`` in the tests)."""
        self.ctx = ctx
        self.train_cfg = train
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.vocab = vocab.to(ctx.device) if vocab is not None else None
        self.pipeline = pipeline
        self.stage_kind = Stage(train.stage)
        self.precision = resolve_precision(train.precision)
        self.student_arch = student
        self.teacher_specs = list(teachers)
        self.step_state = StepState(total_steps=train.steps)
        self.skipped_steps = 0
        """Steps skipped for a non-finite loss or gradient (``train.max_skipped_steps``); saved in
        checkpoints, so the budget spans resumes."""
        self.num_microbatches = microbatches_per_step(train, seq_length, ctx)

        plan = plan_methods(
            pipeline,
            student=student,
            teachers=[t.arch for t in self.teacher_specs],
            tp=ctx.tp,
            pp=ctx.pp,
            recompute=train.recompute,
        )
        self.entries, self.taps = plan.entries, plan.taps
        self.student_info, self.teacher_infos = plan.student_info, plan.teacher_infos
        models = build_models(
            student,
            self.teacher_specs,
            seed=train.seed,
            precision=self.precision,
            recompute=train.recompute,
            sequence_parallel=ctx.sequence_parallel,
            # Packed rows (data.mode: packed) carry a block-diagonal attention mask, which only
            # megatron-core's local attention honours (Transformer Engine's causal attention
            # ignores an explicit mask; its packed-sequence path needs thd inputs).
            needs_attention=plan.needs_attention or attention_masks,
        )
        self.teachers = models.teachers  # the co-located teachers' megatron modules
        self.sources = build_teacher_sources(
            self.teacher_specs, models.teachers, ctx=ctx, seq_length=seq_length
        )
        self.method_modules = build_method_modules(
            self.entries,
            student_layers=student.num_layers,
            ctx=ctx,
            seed=train.seed,
            dtype=self.precision.params_dtype,
        )
        self.stage = DistillationStage(
            models.student,
            self.sources,
            taps=self.taps,
            compute_fn=pipeline.compute,
            context_fn=self._loss_context,
            is_last_stage=ctx.is_last_stage,
            method_modules=self.method_modules if len(self.method_modules) else None,
        )
        self.head_path, _ = configure_head_path(  # fused output layer + loss (issue 18)
            self.stage,
            pipeline,
            self.teacher_infos[0] if self.teacher_infos else None,
            self.student_info,
        )
        self.handles = RuntimeHandles(self.stage, self.step_state, seed=train.seed)
        install_forward_modifiers(
            self.entries, self.handles, sequence_parallel=ctx.sequence_parallel
        )
        if self.vocab is not None:
            install_vocab_restriction(
                self.stage,
                self.vocab,
                shard_size=self.student_info.padded_vocab_size // ctx.tp,
                vocab_size=student.vocab_size,
            )
        self.model = wrap_ddp(self.stage, self.method_modules, pp_group=ctx.pp_group)
        self.optimizer = build_optimizer(self.model, train, self.precision)
        self.scheduler = build_scheduler(self.optimizer, train)
        self.checkpoint = ckpt.TrainingCheckpoint(
            model=self.stage.module,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            layout=checkpoint_layout(ctx),
            method_modules=method_modules_checkpoint(self.entries, self.method_modules, tp=ctx.tp),
            method_state=method_runtime_state(self.entries),
        )
        if student_init is not None:
            ckpt.load_model_weights(
                Path(student_init), self.stage.module, layer_map=student_init_layers
            )

    # ------------------------------------------------------------------ one step
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
            step=self.step_state.step,
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
            extras={
                "teachers": self.teacher_infos,
                "teacher_labels": batch["teacher_labels"],
                CHUNK_SIZE_EXTRA: self.train_cfg.logit_chunk_tokens,
            },
            token_mask=batch["token_mask"],
            example_ids=batch.get("example_ids"),
            batch_size=batch["input_ids"].shape[0],
            choices=batch.get("choices"),  # h15t: choice data (methods.choices)
        )

    def _make_batch(self, micro: torch.Tensor | dict) -> dict:
        """A microbatch -> the stage's batch. ``micro`` is ``tokens [b, s+1]`` (a token window
        per row, every label counts) or a mapping from :func:`gkd_cli.data.batching.collate`
        with ``tokens``, ``loss_mask [b, s]``, ``token_mask [b, s]`` (or ``None``),
        ``example_ids [b, s]`` (``-1`` padding), ``position_ids [b, s]`` and ``packed`` (rows
        hold several examples: attention is masked block-diagonally, no token sees another
        example). Inputs stay ``[b, s]``; labels, masks and example ids are flattened s-major
        ``[s*b]`` to match the ``[s, b, ...]`` layout of features and logits."""
        if isinstance(micro, dict):
            return self._make_example_batch(micro)
        tokens = micro.to(self.ctx.device, non_blocking=True)
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

    def _make_example_batch(self, micro: dict) -> dict:
        device = self.ctx.device
        tokens = micro["tokens"].to(device, non_blocking=True)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        ids = micro["example_ids"].to(device, non_blocking=True)
        student_tokens = tokens if self.vocab is None else self.vocab.orig_to_comp[tokens]
        token_mask = micro.get("token_mask")
        attention_mask = None
        if micro.get("packed"):
            attention_mask = block_causal_mask(ids)
        return {
            "input_ids": inputs,
            "student_input_ids": student_tokens[:, :-1],
            "position_ids": micro["position_ids"].to(device, non_blocking=True),
            "attention_mask": attention_mask,
            "labels": student_tokens[:, 1:].t().reshape(-1),
            "teacher_labels": labels.t().reshape(-1),
            "loss_mask": micro["loss_mask"].to(device).float().t().reshape(-1),
            "token_mask": (
                None if token_mask is None else token_mask.to(device).float().t().reshape(-1)
            ),
            "example_ids": ids.t().reshape(-1),
            # [b] global sample ids (gkd_cli.worker.make_batch_fn): what a cached teacher reads
            "sample_ids": micro.get("sample_ids"),
            "choices": None if micro.get("choices") is None else micro["choices"].to(device),
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
        width = self.stage.send_width + self.student_arch.hidden_size
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
        self.step_state.step = step
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
            skipped = self.skipped_steps
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
        return self.checkpoint.layout

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
        """Collective: a checkpoint of step ``step`` under ``root`` (see :mod:`parallel.checkpoint`);
        ``meta`` gains the student's architecture, the precision and the skipped steps."""
        meta = {
            **meta,
            "arch": vars(self.student_arch),
            "precision": self.precision.name,
            "skipped_steps": self.skipped_steps,
        }
        return self.checkpoint.save(
            root,
            step=step,
            meta=meta,
            config_yaml=config_yaml,
            keep_last=keep_last,
            extra_files=extra_files,
        )

    def load(self, folder: Path) -> dict:
        """Collective: resume from ``folder`` (any layout); returns its meta."""
        meta = self.checkpoint.load(folder)
        self.skipped_steps = int(meta.get("skipped_steps", 0))  # the skip budget spans resumes
        return meta

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of this rank's teacher and student parameters (for benchmarks and the planner)."""
        teacher = sum(p.numel() * p.element_size() for t in self.teachers for p in t.parameters())
        student = sum(p.numel() * p.element_size() for p in self.stage.module.parameters())
        return {"teacher": teacher, "student": student}


def block_causal_mask(example_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` bool attention mask, True = hidden (megatron-core's convention): query
    ``i`` sees key ``j`` when ``j <= i`` and both belong to the same example (padding, id -1, sees
    padding only). Packed rows thus attend within each example, as if each ran alone."""
    s = example_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=example_ids.device).tril()
    same = example_ids[:, :, None] == example_ids[:, None, :]
    return (~(causal & same)).unsqueeze(1)


def _loss_passthrough(output: torch.Tensor):
    return output, {}
