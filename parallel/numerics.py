"""Non-finite losses and gradients: find them before the optimizer applies them.

Megatron's fp32 optimizer applies whatever gradient it is given (its inf/NaN check belongs to the
fp16 grad scaler), and a NaN gradient norm disables clipping instead of stopping the update, so a
single NaN would silently poison every weight. The runtime calls :func:`step_problem` after the
backward pass and before ``optimizer.step()``; all ranks get the same answer (the loss terms are
already all-reduced; the gradient check is one all-reduce of one flag per rank).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def nonfinite_terms(terms: dict[str, float]) -> list[str]:
    """Names of the (already reduced, identical on every rank) loss terms that are NaN or inf."""
    return [name for name, value in terms.items() if not math.isfinite(value)]


def _grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    main = getattr(param, "main_grad", None)  # megatron DDP accumulates into main_grad
    return main if main is not None else param.grad


def first_nonfinite_gradient(module: torch.nn.Module) -> str | None:
    """The name of this rank's first parameter whose gradient holds a NaN or inf, else ``None``."""
    named = [(name, g) for name, p in module.named_parameters() if (g := _grad(p)) is not None]
    if not named:
        return None
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for _, g in named])
    finite = torch.isfinite(torch.stack(norms))
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def step_problem(
    step: int, terms: dict[str, float], module: torch.nn.Module, *, rank: int
) -> str | None:
    """Collective over the default group: ``None`` when the step may be applied, else a message
    naming the step, the method term(s) or the parameter, and the rank(s) where it appeared."""
    bad_terms = nonfinite_terms(terms)
    if bad_terms:
        return (
            f"step {step + 1}: non-finite loss term(s) {', '.join(bad_terms)} "
            f"(values {', '.join(repr(terms[t]) for t in bad_terms)}; reduced over all ranks, "
            f"seen on rank {rank})"
        )
    local = first_nonfinite_gradient(module)
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32)
    flags[dist.get_rank()] = int(local is not None)
    if torch.cuda.is_available():
        flags = flags.cuda()
    dist.all_reduce(flags)
    ranks = [r for r, f in enumerate(flags.tolist()) if f]
    if not ranks:
        return None
    where = f"; first on this rank: parameter {local}" if local is not None else ""
    return (
        f"step {step + 1}: non-finite gradient on rank(s) {ranks} although every loss term was "
        f"finite ({', '.join(f'{k}={v:.4g}' for k, v in terms.items())}){where}"
    )
