"""Per-rank memory estimate of a distillation run, and the smallest layout that fits a GPU.

``estimate(cfg, device)`` itemizes what the most loaded rank holds at its peak: teacher weights,
student weights, gradients, distributed-optimizer states, stored activations, the teacher's
forward workspace, logit buffers and the loss workspace, pipeline buffers, runtime overhead.
``search_layouts`` tries every valid TP x PP for a GPU count and ``suggest_layout`` picks the
smallest that fits. Pure arithmetic: no torch, no megatron-core.

Models and formulas:

* Weights and gradients: parameters per rank from the architecture (``ModelArch.stage_parameters``,
  the one count the model and the methods use too), sharded the way megatron-core
  shards them (column/row-parallel linears and the vocabulary over TP; norms and row-parallel
  biases replicated; layers split evenly over PP; the embedding on the first stage, the output
  layer (or, with tied embeddings and PP > 1, a copy of the embedding) on the last).
* Optimizer: megatron-core's distributed optimizer (ZeRO-1, Rajbhandari et al. 2020) shards the
  fp32 master weights and both Adam moments over DP: 12 bytes per parameter / DP with bf16
  weights, 8 / DP with fp32 weights (the master copy is then the weight itself). Gradients are
  kept in the weights' dtype (megatron-core's default ``grad_reduce_in_fp32=False``).
* Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv 2205.05198), Sec. 4: one layer stores ``s*b*h*(34 + 5*a*s/h)`` bytes with 16-bit
  activations (eq. 1); with tensor parallelism ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` (eq. 2); with
  tensor and sequence parallelism ``s*b*h/t*(34 + 5*a*s/h)`` (eq. 3); selective recomputation
  drops the ``5*a*s/h`` attention term (eq. 6 ``34*s*b*h/t``); full recomputation keeps only each
  layer's input, ``2*s*b*h`` (Sec. 5). The terms are generalized element by element to grouped
  query attention and SwiGLU (see :func:`layer_activation_bytes`); with fp32 activations the
  tensors take 4 bytes per element and dropout masks stay 1 byte. Under 1F1B (Narayanan et al.
  2021) pipeline stage ``k`` holds the activations of ``min(pp - k, microbatches)``
  microbatches, so stage 0 holds ``pp`` microbatches of ``L/pp`` layers: one full model's worth.
* The teacher runs under ``no_grad``: it stores no activations; its transient workspace is
  bounded by one layer's activations.
* Logits: the last stage holds teacher and student logits ``[s, b, V/tp]`` of one microbatch, the
  student logits' gradient (fp32; the vocab-parallel loss computes it in the forward pass) and a
  chunked loss workspace (``LOSS_CHUNK_TOKENS`` tokens x V/tp x 3 fp32 buffers).

The attention-score terms assume the unfused ("local") attention that stores softmax outputs; a
fused/flash attention kernel stores none, so on GPU with Transformer Engine the estimate is
conservative there.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gkd_cli.errors import ConfigError
from parallel.config import ModelArch, ParallelConfig

if TYPE_CHECKING:
    from gkd_cli.config import DistillConfig

GiB = 1024**3
LOSS_CHUNK_TOKENS = 1024
"""Tokens per chunk of the vocab-parallel logit loss assumed for its workspace."""
GPU_RUNTIME_OVERHEAD = 1 * GiB
"""CUDA context, NCCL communicators and allocator slack, per GPU (a rule of thumb)."""

Device = Literal["cpu", "gpu"]
Recompute = Literal["none", "selective", "full"]
RECOMPUTE_MODES: tuple[Recompute, ...] = ("none", "selective", "full")


@dataclass(frozen=True, kw_only=True)
class MemoryItem:
    """One line of the estimate."""

    name: str
    """What it is (``teacher weights``)."""
    bytes: int
    """Bytes on the peak rank."""
    detail: str = ""
    """How it was computed (shapes, counts, alternatives)."""


@dataclass(kw_only=True)
class MemoryPlan:
    """Estimated peak memory of the most loaded rank."""

    tp: int
    pp: int
    dp: int
    device: Device
    dtype: Literal["bf16", "fp32"]
    """Weights and activations dtype."""
    stage: int
    """Pipeline stage of the peak rank (0-based)."""
    num_microbatches: int
    """Microbatches per step and DP rank."""
    items: list[MemoryItem]

    @property
    def total_bytes(self) -> int:
        """Estimated peak bytes of one rank."""
        return sum(item.bytes for item in self.items)

    def item(self, name: str) -> MemoryItem:
        return next(i for i in self.items if i.name == name)

    def fits(self, capacity_bytes: int) -> bool:
        return self.total_bytes <= capacity_bytes


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": GiB,
    "gb": 1000**3,
    "gib": GiB,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """Bytes from ``40GiB``, ``40GB`` (10^9), ``40G`` (binary, like nvidia-smi), ``81920MiB``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"--gpu-mem {text!r}: expected a size such as 40GiB, 80GB or 81920MiB", field="gpu-mem"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:,.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Activations (Korthikanti et al. 2022)
# ---------------------------------------------------------------------------------------------


def layer_activation_bytes(
    arch: ModelArch,
    *,
    seq_length: int,
    micro_batch_size: int,
    tp: int,
    sequence_parallel: bool,
    recompute: Recompute,
    bytes_per_element: int,
    dropout: bool = True,
) -> int:
    """Bytes one transformer layer stores for the backward pass, per microbatch and TP rank.

    Korthikanti et al. 2022, Sec. 4.1, term by term (16-bit: 2 bytes per element, masks 1 byte):
    outside the TP region the two norm inputs, the QKV input and the first MLP linear's input
    (4 ``sbh`` elements) and two dropout masks (``2 sbh`` bytes), i.e. eq. 2's ``10 sbh``; inside
    it Q and K, V, the output projection's input, the activation's input and the second MLP
    linear's input (``12 sbh`` elements for MHA and a 4h GeLU MLP: eq. 2's ``24 sbh / t``); the
    softmax output and its dropout output (``2 a s^2 b`` elements) and the attention dropout mask
    (``a s^2 b`` bytes): eq. 2's ``5 a s^2 b / t``. Sequence parallelism divides the outside terms
    by ``t`` too (eq. 3); selective recompute drops the attention terms (eq. 6); full recompute
    keeps only the layer input (``s b h`` elements, divided by ``t`` with sequence parallelism).
    """
    s, b, t = seq_length, micro_batch_size, tp
    h, f, d = arch.hidden_size, arch.ffn_size, arch.head_dim
    a = arch.num_attention_heads
    q, kv = a * d, arch.query_groups * d
    e = bytes_per_element
    outside_split = t if sequence_parallel else 1
    if recompute == "full":
        return s * b * h * e // outside_split
    outside = 4 * s * b * h * e + (2 * s * b * h if dropout else 0)
    act_in = f * (2 if arch.activation == "swiglu" else 1)
    inside = s * b * ((q + kv) + kv + q + act_in + f) * e
    attention = 0
    if recompute == "none":
        attention = 2 * a * s * s * b * e + (a * s * s * b if dropout else 0)
    return outside // outside_split + (inside + attention) // t


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


def _with_parallel(cfg: DistillConfig, tp: int, pp: int, dp: int):
    parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, dp=dp)
    return dataclasses.replace(cfg, parallel=parallel)


def estimate(cfg: DistillConfig, device: Device = "gpu", *, dropout: bool = True) -> MemoryPlan:
    """Peak memory of the most loaded rank of ``cfg`` (a ``DistillConfig``) on ``device``.

    bf16 weights and activations on GPU (fp32 when ``train.precision`` is ``fp32``), fp32 on
    CPU. ``dropout`` counts dropout masks as the paper does (set ``False`` for runs without
    dropout).
    """
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"--device {device!r}: expected cpu or gpu", field="device")
    plans = [_estimate_stage(cfg, device, stage, dropout) for stage in {0, cfg.parallel.pp - 1}]
    return max(plans, key=lambda p: p.total_bytes)


def _cache_slots(cache: str) -> int:
    """Entries per token of a teacher cache (its ``meta.json`` spec; 64 when not written yet)."""
    import json
    from pathlib import Path

    meta = Path(cache) / "meta.json"
    if not meta.is_file():
        return 64
    spec = json.loads(meta.read_text()).get("spec", {})
    return int(spec.get("k") or spec.get("samples") or 64)


def _estimate_stage(cfg: DistillConfig, device: Device, stage: int, dropout: bool) -> MemoryPlan:
    p: ParallelConfig = cfg.parallel
    tp, pp, dp = p.tp, p.pp, p.dp
    teacher, student = cfg.teacher, cfg.student
    fp32 = device == "cpu" or cfg.train.precision == "fp32"
    e = 4 if fp32 else 2
    dtype: Literal["bf16", "fp32"] = "fp32" if fp32 else "bf16"
    s, b = cfg.data.seq_length, cfg.train.micro_batch_size
    microbatches = max(1, cfg.train.global_batch_size // (b * dp))
    last = stage == pp - 1
    items: list[MemoryItem] = []
    # A cached teacher (teacher.cache) has no weights, no forward and sends nothing between
    # stages: only its sparse targets on the last stage (parallel/teacher_source.py).
    cache_slots = _cache_slots(teacher.cache) if teacher is not None and teacher.cache else None
    if cache_slots is not None:
        teacher = None

    if teacher is not None:
        t_params = teacher.stage_parameters(tp, pp, stage)
        items.append(
            MemoryItem(
                name="teacher weights",
                bytes=t_params * e,
                detail=f"{t_params / 1e9:.3f}B params x {e} B ({dtype}); "
                f"{teacher.num_parameters(tp) / 1e9:.2f}B total / (tp {tp} x pp {pp})",
            )
        )
    s_params = student.stage_parameters(tp, pp, stage)
    items.append(
        MemoryItem(
            name="student weights",
            bytes=s_params * e,
            detail=f"{s_params / 1e9:.3f}B params x {e} B ({dtype}); "
            f"{student.num_parameters(tp) / 1e9:.2f}B total",
        )
    )
    items.append(
        MemoryItem(
            name="student gradients",
            bytes=s_params * e,
            detail=f"{dtype} gradient buffer, one per parameter",
        )
    )
    per_param = 8 if fp32 else 12
    items.append(
        MemoryItem(
            name="optimizer states",
            bytes=s_params * per_param // dp,
            detail=("2 fp32 Adam moments" if fp32 else "fp32 master + 2 fp32 Adam moments")
            + f" = {per_param} B/param, sharded over dp {dp} (distributed optimizer)",
        )
    )

    in_flight = min(pp - stage, microbatches)
    layers = student.num_layers // pp

    def stored(recompute: Recompute) -> int:
        per_layer = layer_activation_bytes(
            student,
            seq_length=s,
            micro_batch_size=b,
            tp=tp,
            sequence_parallel=p.sequence_parallel,
            recompute=recompute,
            bytes_per_element=e,
            dropout=dropout,
        )
        total = in_flight * layers * per_layer
        if last:  # final norm input and output-layer input of the microbatch in flight
            total += 2 * s * b * student.hidden_size * e // (tp if p.sequence_parallel else 1)
        if recompute == "full":  # one layer's activations rebuilt during its backward
            total += layer_activation_bytes(
                student,
                seq_length=s,
                micro_batch_size=b,
                tp=tp,
                sequence_parallel=p.sequence_parallel,
                recompute="none",
                bytes_per_element=e,
                dropout=dropout,
            )
        return total

    mode = cfg.train.recompute
    others = ", ".join(f"{m}: {format_bytes(stored(m))}" for m in RECOMPUTE_MODES if m != mode)
    items.append(
        MemoryItem(
            name="student activations",
            bytes=stored(mode),
            detail=f"recompute={mode}; {in_flight} microbatch(es) in flight x {layers} layers "
            f"(1F1B); {others}",
        )
    )
    if teacher is not None:
        teacher_workspace = layer_activation_bytes(
            teacher,
            seq_length=s,
            micro_batch_size=b,
            tp=tp,
            sequence_parallel=p.sequence_parallel,
            recompute="none",
            bytes_per_element=e,
            dropout=False,
        )
        items.append(
            MemoryItem(
                name="teacher forward workspace",
                bytes=teacher_workspace,
                detail="no_grad: at most one layer's activations alive",
            )
        )
    if last:
        tokens = s * b
        vt = teacher.padded_vocab(tp) // tp if teacher is not None else 0
        vs = student.padded_vocab(tp) // tp
        logits = tokens * (vt + vs) * e + tokens * vs * 4
        items.append(
            MemoryItem(
                name="logit buffers",
                bytes=logits,
                detail=f"teacher [{s}, {b}, {vt}] + student [{s}, {b}, {vs}] {dtype} "
                "+ student logit gradient fp32",
            )
        )
        if cache_slots is not None:
            items.append(
                MemoryItem(
                    name="cached teacher targets",
                    bytes=tokens * cache_slots * (8 + 4) + tokens * 8,
                    detail=f"[{tokens}, {cache_slots}] int64 ids + fp32 weights, per-token tail "
                    "and entropy (read from teacher.cache)",
                )
            )
        chunk = min(tokens, LOSS_CHUNK_TOKENS)
        items.append(
            MemoryItem(
                name="loss workspace",
                bytes=chunk * max(vt, vs) * 4 * 3,
                detail=f"{chunk} tokens x {max(vt, vs)} x 3 fp32 buffers (chunked loss)",
            )
        )
    if pp > 1:
        teacher_width = teacher.hidden_size if teacher is not None else 0
        width = (teacher_width + student.hidden_size) * 2 + student.hidden_size * 2
        items.append(
            MemoryItem(
                name="pipeline buffers",
                bytes=s * b * width * e // (tp if p.sequence_parallel else 1),
                detail="send/receive of teacher+student activations and student gradients",
            )
        )
    if device == "gpu":
        items.append(
            MemoryItem(
                name="runtime overhead",
                bytes=GPU_RUNTIME_OVERHEAD,
                detail="CUDA context, NCCL, allocator slack (rule of thumb)",
            )
        )
    return MemoryPlan(
        tp=tp,
        pp=pp,
        dp=dp,
        device=device,
        dtype=dtype,
        stage=stage,
        num_microbatches=microbatches,
        items=items,
    )


# ---------------------------------------------------------------------------------------------
# Searching layouts
# ---------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problem(cfg: DistillConfig, tp: int, pp: int, dp: int) -> str | None:
    """Why ``tp x pp x dp`` is not a valid layout for ``cfg``, or ``None``."""
    for role, model in cfg.model_roles():
        try:
            model.check_parallel(tp, pp, where=role)
        except ValueError as err:
            return str(err)
    step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % step:
        return f"train.global_batch_size is not divisible by micro_batch_size x dp = {step}"
    return None


def search_layouts(
    cfg: DistillConfig,
    *,
    gpus: int | None = None,
    gpus_per_node: int | None = None,
    device: Device = "gpu",
) -> list[MemoryPlan]:
    """Estimates for every valid ``tp x pp x dp = gpus`` (default: the config's world size),
    smallest ``tp x pp`` first, then smallest memory. TP stays within a node (``gpus_per_node``,
    default ``min(gpus, 8)``)."""
    gpus = gpus or cfg.parallel.world_size
    per_node = gpus_per_node or min(gpus, 8)
    plans = []
    for tp in _divisors(gpus):
        if tp > per_node:
            continue
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if layout_problem(cfg, tp, pp, dp) is None:
                plans.append(estimate(_with_parallel(cfg, tp, pp, dp), device))
    plans.sort(key=lambda p: (p.tp * p.pp, p.total_bytes))
    return plans


def suggest_layout(
    cfg: DistillConfig,
    capacity_bytes: int,
    *,
    gpus: int | None = None,
    gpus_per_node: int | None = None,
    device: Device = "gpu",
) -> MemoryPlan | None:
    """The smallest ``tp x pp`` (then the least memory) that fits ``capacity_bytes``, if any."""
    for plan in search_layouts(cfg, gpus=gpus, gpus_per_node=gpus_per_node, device=device):
        if plan.fits(capacity_bytes):
            return plan
    return None


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def plan_table(plan: MemoryPlan, capacity_bytes: int | None = None):
    """A Rich table of the estimate (imported lazily: the estimate itself needs no Rich)."""
    from rich.table import Table
    from rich.text import Text

    title = (
        f"Memory per rank: tp {plan.tp} x pp {plan.pp} x dp {plan.dp}, {plan.device} "
        f"({plan.dtype}), peak on pipeline stage {plan.stage}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("item")
    table.add_column("memory", justify="right")
    table.add_column("how", overflow="fold")
    for item in plan.items:
        table.add_row(item.name, format_bytes(item.bytes), Text(item.detail))
    total = format_bytes(plan.total_bytes)
    if capacity_bytes is not None:
        ok = plan.fits(capacity_bytes)
        verdict = "[green]fits[/]" if ok else "[bold red]does not fit[/]"
        table.add_row(
            "[bold]total[/]",
            f"[bold]{total}[/]",
            f"{verdict} in {format_bytes(capacity_bytes)} "
            f"({plan.total_bytes / capacity_bytes:.0%})",
        )
    else:
        table.add_row("[bold]total[/]", f"[bold]{total}[/]", "")
    return table


def layouts_table(plans: list[MemoryPlan], capacity_bytes: int | None):
    from rich.table import Table

    table = Table(title="Layouts for this GPU count", title_justify="left")
    for column in ("tp", "pp", "dp", "peak per rank", "fits"):
        table.add_column(column, justify="right")
    for plan in plans:
        fits = "" if capacity_bytes is None else ("yes" if plan.fits(capacity_bytes) else "no")
        table.add_row(
            str(plan.tp), str(plan.pp), str(plan.dp), format_bytes(plan.total_bytes), fits
        )
    return table


def check_layout(models: Sequence[tuple[str, ModelArch]], parallel: ParallelConfig) -> None:
    """``ConfigError`` when layout ``parallel`` cannot shard the ``(role, model)`` pairs (heads,
    query groups or layers not divisible) or split its processes evenly over its nodes."""
    tp, pp = parallel.tp, parallel.pp
    for role, model in models:
        try:
            model.check_parallel(tp, pp, where=role)
        except ValueError as err:
            raise ConfigError(str(err), field=role) from None
    world, nnodes = parallel.world_size, parallel.nnodes
    if world % nnodes:
        raise ConfigError(
            f"parallel.tp x pp x dp = {world} processes cannot be split evenly over "
            f"parallel.nnodes={nnodes}; use a node count that divides {world}",
            field="parallel.nnodes",
        )
