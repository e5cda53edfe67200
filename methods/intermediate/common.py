"""Helpers shared by the intermediate-layer methods: feature lookup, masks, pooling, learned
projections, the tensor-parallel sum, and the prediction-layer (soft/hard) terms.

Conventions every intermediate method follows:

- **Tokens that count.** Intermediate losses need no labels, so they use ``ctx.distill_mask``
  (the runtime's non-padding ``token_mask`` when it gives one, else ``loss_mask``), reshaped to
  ``[s, b]`` (``N = s * b`` tokens, s-major, so it lines up with ``[s, b, h]`` features).
  Soft/hard terms on logits use ``ctx.loss_mask`` like the logit methods.
- **Pooled vectors.** BERT methods use the first token ([CLS]); GPT models are causal decoders
  whose first position has seen one token only. ``pooling: last`` takes each sample's last
  non-padding token (the one position that attended to the whole sequence, the decoder's
  analogue of [CLS]); ``pooling: mean`` averages the non-padding tokens. Each method documents
  its default. Samples are examples when the batch carries ``ctx.example_ids`` (``data.mode:
  padded | packed``: a packed row holds several examples, each pooled alone), rows otherwise
  (``stream``: a window is the sample, as in GKD).
- **Precision.** Losses are computed in fp32 (fp64 when the student's features are fp64, which
  the tests use), whatever the features' dtype.
- **Tensor parallelism.** Hidden states (embedding, hidden, final norm) are replicated over tp:
  every tp rank computes the same loss, and learned projections on them are plain
  ``torch.nn.Linear`` modules, replicated, with identical (seeded) initial weights. Features
  sharded over attention heads (scores ``[b, heads/tp, s, s]``, Q/K/V ``[s, b, heads/tp, d]``)
  give each rank a partial sum over its heads; :func:`tp_sum` adds the partial sums (forward
  all-reduce, backward identity), so the loss value equals the unsharded one on every rank and
  each rank's gradient is that of its own heads. Sequence parallelism (hidden states split along
  ``s``) is not supported: the mask check rejects it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from methods.base import FeatureKind, LossContext, ModelInfo, Role, Tap
from methods.examples import pool_by_example
from methods.logit_common import hard_term, soft_term  # noqa: F401 (re-exported)

Tensor = torch.Tensor
Pooling = Literal["last", "mean"]


# ----------------------------------------------------------------------------------------------
# Taps and features


def t_tap(kind: FeatureKind, layer: int | None = None) -> Tap:
    """A teacher tap."""
    return Tap(Role.TEACHER, kind, layer)


def s_tap(kind: FeatureKind, layer: int | None = None) -> Tap:
    """A student tap."""
    return Tap(Role.STUDENT, kind, layer)


def pair(
    features: Mapping[Tap, Tensor], student: Tap, teacher: Tap, method: str
) -> tuple[Tensor, Tensor] | None:
    """``(student_feature, teacher_feature)`` when both are on this pipeline stage, ``None`` when
    neither is. One without the other means the mapping put the pair on two stages, which the
    config check (:func:`methods.layer_mapping.check_pipeline`) should have refused."""
    s, t = features.get(student), features.get(teacher)
    if s is None and t is None:
        return None
    if s is None or t is None:
        raise RuntimeError(
            f"method {method!r}: {student if s is None else teacher} is not on the pipeline stage "
            f"that holds {teacher if s is None else student}; the layer mapping is not "
            "stage-aligned (methods.layer_mapping.check_pipeline reports this at config time)"
        )
    return s, t


def all_or_nothing(
    features: Mapping[Tap, Tensor], taps: list[Tap], method: str
) -> list[Tensor] | None:
    """All of ``taps``' features, or ``None`` when none is here (methods that combine all layers
    in one loss and so need pipeline parallelism 1)."""
    present = [features.get(tap) for tap in taps]
    if all(v is None for v in present):
        return None
    if any(v is None for v in present):
        missing = [str(tap) for tap, v in zip(taps, present, strict=True) if v is None]
        raise RuntimeError(
            f"method {method!r} needs all its features on one pipeline stage (parallel.pp=1); "
            f"missing here: {', '.join(missing[:4])}"
        )
    return present  # type: ignore[return-value]


def check_equal_heads(
    teacher: ModelInfo, student: ModelInfo, method: str, what: str, *, fix: str = ""
) -> None:
    """Per-head attention losses compare head ``k`` of the teacher with head ``k`` of the
    student: ``ValueError`` unless the head counts match."""
    if teacher.num_attention_heads != student.num_attention_heads:
        raise ValueError(
            f"method {method!r} compares {what} head by head, so it needs "
            f"teacher.num_attention_heads == student.num_attention_heads, got "
            f"{teacher.num_attention_heads} and {student.num_attention_heads}; give the student "
            f"{teacher.num_attention_heads} attention heads{(' ' + fix) if fix else ''}"
        )


def acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype losses are computed in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def acc(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return x.to(dtype or acc_dtype(x))


# ----------------------------------------------------------------------------------------------
# Masks and pooling


def token_mask(ctx: LossContext, hidden_like: Tensor, dtype: torch.dtype) -> Tensor:
    """``[s, b]`` mask of the tokens intermediate losses count (``ctx.distill_mask``), for a
    feature laid out ``[s, b, ...]``."""
    s, b = hidden_like.shape[0], hidden_like.shape[1]
    return mask_sb(ctx, s, b, hidden_like.device, dtype)


def scores_mask(ctx: LossContext, scores: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[s, b]`` token mask for ``[b, heads/tp, s, s]`` attention maps."""
    return mask_sb(ctx, scores.shape[-1], scores.shape[0], scores.device, dtype)


def mask_sb(ctx: LossContext, s: int, b: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``ctx.distill_mask`` as ``[s, b]``; ``ValueError`` when it does not have ``s * b`` tokens."""
    mask = ctx.distill_mask
    if mask.numel() != s * b:
        raise ValueError(
            f"features have {s} x {b} = {s * b} tokens (seq x batch) but the loss mask has "
            f"{mask.numel()}; intermediate-layer methods need full-sequence hidden states "
            "(turn off sequence parallelism)"
        )
    return mask.detach().to(device=device, dtype=dtype).reshape(s, b)


def check_hidden(x: Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [s, b, h], got shape {tuple(x.shape)}")


def pool(
    hidden: Tensor, mask: Tensor, how: Pooling, ctx: LossContext | None = None
) -> tuple[Tensor, Tensor]:
    """One vector per sample: per example when ``ctx`` carries ``example_ids`` (example-aware
    batches: a packed row holds several examples), else per row of the microbatch.

    Args:
        hidden: ``[s, b, h]``, replicated over tp.
        mask: ``[s, b]`` float, 1.0 for tokens that count.
        how: ``last`` (each sample's last token with mask 1) or ``mean`` (mean over them).
        ctx: the loss context (its ``example_ids``); ``None``: rows.

    Returns:
        ``([E, h] pooled vectors, [E] bool: the sample has at least one token)`` (``E = b``
        without example ids); samples without tokens get a zero vector.
    """
    if ctx is not None and ctx.example_ids is not None:
        return pool_by_example(hidden, ctx.example_ids, how, mask=mask)
    valid = mask > 0
    count = valid.sum(0)
    has_tokens = count > 0
    if how == "mean":
        summed = (hidden * mask.to(hidden.dtype).unsqueeze(-1)).sum(0)
        return summed / count.clamp_min(1).to(hidden.dtype).unsqueeze(-1), has_tokens
    if how == "last":
        positions = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
        last = torch.where(valid, positions, -1).amax(0).clamp_min(0)  # [b]
        pooled = hidden[last, torch.arange(hidden.shape[1], device=hidden.device)]
        return pooled * has_tokens.to(hidden.dtype).unsqueeze(-1), has_tokens
    raise ValueError(f"pooling must be 'last' or 'mean', got {how!r}")


def sample_mean(per_sample: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_sample [b]`` over the samples with ``valid`` (0 when none)."""
    weights = valid.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1)


def masked_token_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``mean`` of ``(student - teacher)^2`` over the tokens of ``mask`` and the features.

    Args:
        student: ``[s, b, h]`` (already at the teacher's width), replicated over tp.
        teacher: ``[s, b, h]``.
        mask: ``[s, b]`` float.
    """
    per_token = (student - teacher).pow(2).sum(-1)
    count = mask.sum() * student.shape[-1]
    return (per_token * mask).sum() / count.clamp_min(1)


def masked_token_cosine_distance(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``mean`` over the tokens of ``mask`` of ``1 - cos(student, teacher)`` (``[s, b, h]`` both,
    ``mask [s, b]``)."""
    cos = F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    return ((1.0 - cos) * mask).sum() / mask.sum().clamp_min(1)


def cosine_distance(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    """Mean over the ``valid [b]`` samples of ``1 - cos(student_b, teacher_b)`` (``[b, h]``)."""
    return sample_mean(1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8), valid)


def progressive_phase(step: int, total_steps: int, num_layers: int) -> int:
    """Phase ``p`` in ``1 .. L + 1`` of layer-by-layer distillation (SID, MobileBERT): training
    is cut into ``L + 1`` equal parts; in part ``p <= L`` student layers ``0 .. p - 1`` are
    distilled, in part ``L + 1`` only the prediction layer (GKD advances the phase after
    ``train_iters / (L + 1)`` steps each)."""
    total = max(total_steps, 1)
    return min(max(step, 0) * (num_layers + 1) // total + 1, num_layers + 1)


# ----------------------------------------------------------------------------------------------
# Tensor parallelism


class _SumOverGroup(torch.autograd.Function):
    """All-reduce SUM in forward, identity in backward.

    Used on partial losses of head-sharded features: the total loss ``L = sum_r L_r`` is then the
    same value on every rank, and since each rank back-propagates that same replicated ``L`` with
    gradient 1, the gradient reaching rank ``r``'s partial is ``dL/dL_r = 1``: the identity. (An
    all-reduce in backward would count every rank's contribution tp times.)"""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


def tp_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tp_sum(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Differentiable sum of ``tensor`` over the ranks of ``group`` (see :class:`_SumOverGroup`);
    ``tensor`` itself when there is no group or it has one rank."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _SumOverGroup.apply(tensor, group)


# ----------------------------------------------------------------------------------------------
# Learned projections


class Projections:
    """A method's learned linear maps, declared in ``taps()`` (when the widths are known) and
    built on first use, so checking a config allocates nothing.

    They act on hidden states, which are replicated over tp: plain ``torch.nn.Linear`` modules
    on full widths, no tensor parallelism. Initial weights are drawn from a generator seeded by
    ``seed`` and the module's name (uniform in ``+-1/sqrt(in_features)``, torch's default range),
    so every rank builds the same modules without communicating.
    """

    def __init__(self, method: str, seed: int) -> None:
        self.method = method
        self.seed = seed
        self.specs: dict[str, tuple[int, int, bool]] = {}
        self.declared = False
        self._built: dict[str, torch.nn.Linear] | None = None

    def declare(self, specs: Mapping[str, tuple[int, int, bool]]) -> None:
        """Set the modules: ``{name: (in_features, out_features, bias)}``. Declaring the same
        specs again is a no-op; different specs after the modules were built are an error."""
        specs = dict(specs)
        if self._built is not None and specs != self.specs:
            raise RuntimeError(
                f"method {self.method!r}: its projections were built for other model sizes; "
                "build a new method object for new models"
            )
        self.specs = specs
        self.declared = True

    def modules(self) -> dict[str, torch.nn.Module]:
        return dict(self._linears())

    def _linears(self) -> dict[str, torch.nn.Linear]:
        if not self.declared:
            raise RuntimeError(
                f"method {self.method!r}: call taps(teacher, student) before modules(): the "
                "projection sizes depend on the models"
            )
        if self._built is None:
            self._built = {name: self._build(name, *spec) for name, spec in self.specs.items()}
        return self._built

    def _build(self, name: str, in_features: int, out_features: int, bias: bool) -> torch.nn.Linear:
        linear = torch.nn.Linear(in_features, out_features, bias=bias, device="meta")
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + zlib.crc32(f"{self.method}/{name}".encode())) % (2**62)
        )
        bound = 1.0 / math.sqrt(in_features)
        weight = torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator)
        linear.weight = torch.nn.Parameter(weight)
        if bias:
            linear.bias = torch.nn.Parameter(
                torch.empty(out_features).uniform_(-bound, bound, generator=generator)
            )
        return linear

    def apply(self, name: str, x: Tensor) -> Tensor:
        """``x @ W^T + b`` of module ``name`` in ``x``'s dtype and device (autograd reaches the
        module's parameters through the casts)."""
        linear = self._linears()[name]
        weight = linear.weight.to(device=x.device, dtype=x.dtype)
        bias = None if linear.bias is None else linear.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, weight, bias)


def width_projection(
    projections: Projections, teacher: ModelInfo, student: ModelInfo, name: str = "to_teacher"
) -> None:
    """Declare a learned ``student -> teacher`` width linear when the widths differ, none when
    they are equal (the methods that use this compare vectors of equal width by definition)."""
    if student.hidden_size == teacher.hidden_size:
        projections.declare({})
    else:
        projections.declare({name: (student.hidden_size, teacher.hidden_size, True)})


def to_teacher_width(projections: Projections, x: Tensor, name: str = "to_teacher"):
    """``x`` through the width projection when one was declared, else unchanged."""
    return projections.apply(name, x) if name in projections.specs else x


# ----------------------------------------------------------------------------------------------
# Prediction-layer terms


# soft_term and hard_term are the prediction-layer terms every logit method shares (one place:
# methods.logit_common); imported above and re-exported for the intermediate methods.


def logit_taps(*, soft: bool, hard: bool) -> list[Tap]:
    """The logit taps the soft and/or hard terms need."""
    taps = []
    if soft or hard:
        taps.append(s_tap(FeatureKind.LOGITS))
    if soft:
        taps.append(t_tap(FeatureKind.LOGITS))
    return taps


def is_off(weight: object) -> bool:
    """A weight that is the constant 0 (schedules never count as off)."""
    return isinstance(weight, int | float) and weight == 0
