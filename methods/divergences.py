"""Modern logit divergences used to distill LLMs (not in GKD's collection): forward and reverse KL,
generalized JSD, DistiLLM's skew KL and skew reverse KL, total variation, top-k KD.

A logit divergence is a per-chunk kernel of :mod:`methods.vocab_kernels` plus a declaration here:
:func:`logit_divergence` makes the method class (name, paper, parameters dataclass, the kernel
built from the parameters, the loss term's name); every such method is the same masked mean of its
kernel over ``Tap(role, LOGITS)`` features (``[N, V/tp]``, vocab-sharded over ``ctx.tp_group``)
at the temperature of its parameters. To add one: write the kernel (and its test against a
gathered reference), declare it below with its parameters dataclass, add one registry row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from methods import vocab_kernels as vk
from methods import vocab_parallel as vp
from methods.base import LossContext, ModelInfo
from methods.logit_common import at, logit_method
from methods.schedules import ScheduleLike


def logit_divergence(
    cls_name: str, *, kernel: Callable[[Any], vk.Kernel], term: str, **declaration: Any
) -> type:
    """The method class of one logit divergence: term ``term`` is the masked mean over
    ``ctx.loss_mask`` of the kernel ``kernel(params)`` (which raises ``ValueError`` on bad
    parameters, checked when the method is built) at ``params.temperature``. ``declaration``: the
    rest of :func:`methods.logit_common.logit_method`'s arguments (name, params, paper, doc...)."""

    def terms(
        params: Any, logits: tuple[torch.Tensor, torch.Tensor], ctx: LossContext, name: str
    ) -> dict[str, torch.Tensor]:
        temperature = at(getattr(params, "temperature", 1.0), ctx)
        shard = vp.VocabShard.of(ctx)
        loss = vp.divergence(kernel(params), *logits, ctx.loss_mask, shard, temperature=temperature)
        return {term: loss}

    return logit_method(cls_name, terms=terms, check=kernel, fused_head=True, **declaration)


@dataclass(kw_only=True, frozen=True)
class TemperatureParams:
    """The parameters of a divergence that has none besides the temperature."""

    temperature: ScheduleLike = 1.0
    """Softmax temperature of both models."""


ForwardKL = logit_divergence(
    "ForwardKL",
    name="forward_kl",
    params=TemperatureParams,
    kernel=lambda p: vk.forward_kl_kernel,
    term="kl",
    paper="Kullback and Leibler 1951 (KD: Hinton et al. 2015)",
    doc="""Forward KL ``KL(p_t || p_s) = sum_i p_t,i log(p_t,i / p_s,i)`` per token (mode-covering;
    Hinton et al.'s soft loss up to the teacher's entropy).""",
)


ReverseKL = logit_divergence(
    "ReverseKL",
    name="reverse_kl",
    params=TemperatureParams,
    kernel=lambda p: vk.reverse_kl_kernel,
    term="rkl",
    paper="Gu et al. 2024 (MiniLLM), token level",
    doc="""Reverse KL ``KL(p_s || p_t)`` per token (mode-seeking; MiniLLM, Gu et al. 2024, arXiv
    2306.08543, optimizes it at the sequence level; this is its token-level form).""",
)


@dataclass(kw_only=True, frozen=True)
class JSDParams:
    beta: float = 0.5
    """Interpolation as in TRL's GKD trainer: 0 = forward KL, 1 = reverse KL (TRL's default 0.5)."""
    temperature: ScheduleLike = 1.0
    """Softmax temperature of both models."""


JSD = logit_divergence(
    "JSD",
    name="jsd",
    params=JSDParams,
    kernel=lambda p: vk.jsd_kernel(p.beta),
    term="jsd",
    paper="Agarwal et al. 2024 (GKD, on-policy)",
    doc="""Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy
    Distillation of Language Models", arXiv 2306.13649), with TRL's convention for ``beta``:
    ``m = beta p_t + (1 - beta) p_s``, ``JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)``;
    exactly ``KL(p_t || p_s)`` at ``beta = 0`` and ``KL(p_s || p_t)`` at ``beta = 1``.""",
)


@dataclass(kw_only=True, frozen=True)
class SkewKLParams:
    alpha: float = 0.1
    """Skew: the teacher's share of the mixture (DistiLLM's default 0.1; 0 = forward KL)."""
    temperature: ScheduleLike = 1.0
    """Softmax temperature of both models."""


SkewKL = logit_divergence(
    "SkewKL",
    name="skew_kl",
    params=SkewKLParams,
    kernel=lambda p: vk.skew_kl_kernel(p.alpha),
    term="skl",
    paper="Ko et al. 2024 (DistiLLM)",
    doc="""Skew KL of DistiLLM (Ko et al. 2024, arXiv 2402.03898):
    ``SKL_alpha = KL(p_t || alpha p_t + (1 - alpha) p_s)``, bounded and with stabler gradients
    than the forward KL.""",
)


@dataclass(kw_only=True, frozen=True)
class SkewRKLParams:
    alpha: float = 0.1
    """Skew: the student's share of the mixture (DistiLLM's default 0.1; 0 = reverse KL)."""
    temperature: ScheduleLike = 1.0
    """Softmax temperature of both models."""


SkewRKL = logit_divergence(
    "SkewRKL",
    name="skew_rkl",
    params=SkewRKLParams,
    kernel=lambda p: vk.skew_reverse_kl_kernel(p.alpha),
    term="srkl",
    paper="Ko et al. 2024 (DistiLLM)",
    doc="""Skew reverse KL of DistiLLM (Ko et al. 2024, arXiv 2402.03898):
    ``SRKL_alpha = KL(p_s || alpha p_s + (1 - alpha) p_t)``.""",
)


TVD = logit_divergence(
    "TVD",
    name="tvd",
    params=TemperatureParams,
    kernel=lambda p: vk.tvd_kernel,
    term="tvd",
    paper="Wen et al. 2023 (f-distill)",
    doc="""Total variation distance ``0.5 sum_i |p_s,i - p_t,i|`` per token (used for LLM
    distillation by Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge
    Distillation", arXiv 2307.15190, token-level form).""",
)


@dataclass(kw_only=True, frozen=True)
class TopKKDParams:
    k: int = 64
    """Number of the teacher's most likely tokens kept one by one; the rest share one bucket."""
    temperature: ScheduleLike = 1.0
    """Softmax temperature of both models."""


def _topk_kernel(params: TopKKDParams) -> vk.Kernel:
    if params.k < 1:
        raise ValueError(f"topk_kd.k must be >= 1, got {params.k}")
    return vk.topk_kernel(params.k)


def _topk_fits(params: TopKKDParams, student: ModelInfo) -> None:
    if params.k > student.vocab_size:
        raise ValueError(
            f"topk_kd.k={params.k} exceeds the student's vocabulary ({student.vocab_size}); "
            "use a smaller k"
        )


TopKKD = logit_divergence(
    "TopKKD",
    name="topk_kd",
    params=TopKKDParams,
    kernel=_topk_kernel,
    term="kl",
    paper="top-k KD with a tail bucket",
    signals="logits (teacher top-k)",
    check_student=_topk_fits,
    doc="""Top-k KD: forward KL over ``k + 1`` buckets, the teacher's top-k tokens plus one tail
    bucket holding each model's remaining probability mass,
    ``sum_{b in topk + tail} q_b log(q_b / p_b)`` (what an offline cache of the teacher's top-k
    logits allows; the top-k are not renormalized). Top-k across tp shards: local top-k, then an
    all-gather of k values and indices per token.""",
)
