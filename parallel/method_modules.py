"""Trainable modules of distillation methods (``methods.base.HasModules``) on the pipeline stages.

A method's modules (TinyBERT's fit-dense projection, RL-KD's policy, ...) train with the student:
:class:`MethodModules` holds this stage's share of them as one ``torch.nn.Module`` that
:class:`~parallel.stage.DistillationStage` registers as its submodule ``method_modules``, so
megatron's DDP, the distributed optimizer and the gradient clipping treat them like student weights.

Placement (which pipeline stage builds a module):

* A method implementing ``methods.base.PlacesModules`` names, per module, the student layer whose
  stage uses it; the module exists on that stage only.
* Any other module is replicated on every stage. Its gradients are summed over the pipeline group
  before the data-parallel reduction (so whichever stage used it, all copies step identically);
  copies on stages after the first are marked ``shared`` so the gradient norm counts them once.

Tensor parallelism: a parameter that touches a tensor-parallel sharded dimension must be sharded
itself and say so with megatron's attributes (``tensor_model_parallel = True``, ``partition_dim``);
its checkpoint key then describes the global tensor. A replicated parameter whose gradient differs
between tp ranks (computed from sharded features) sets ``average_gradients_across_tp_domain =
True`` and megatron averages it over tp. Other parameters are replicated and must receive identical
gradients on every tp rank (true when their inputs are replicated, e.g. hidden states).

Checkpoint keys are ``methods.<method>.<module>.<parameter>``, independent of the layout (each is a
ShardedTensor replicated over dp, over tp unless sharded, and saved by one pipeline stage), so a
run resumes and reshards with its method modules. The student's own weights keep the ``model.``
prefix: loading a checkpoint as a teacher, or exporting it to Hugging Face, reads only those and
ignores the method modules.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from methods.base import HasModules, PlacesModules

log = logging.getLogger(__name__)

METHODS_PREFIX = "methods."
"""Checkpoint key prefix of method modules (the student's weights use ``model.``)."""


def stage_of_layer(layer: int, num_layers: int, pp: int) -> int:
    """Pipeline stage holding global layer ``layer`` (negative: from the end) of a model with
    ``num_layers`` layers split evenly over ``pp`` stages (megatron's split)."""
    if layer < 0:
        layer += num_layers
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside 0..{num_layers - 1}")
    return layer * pp // num_layers


@dataclass
class _Entry:
    method: str
    name: str
    module: torch.nn.Module
    replicated_over_pp: bool

    @property
    def key(self) -> str:
        return f"{self.method}.{self.name}"


class MethodModules(torch.nn.Module):
    """This stage's method modules as ``self.by_method[method][name]``."""

    def __init__(
        self,
        entries: Iterable,
        *,
        student_layers: int,
        pp: int,
        pp_rank: int,
        tp_rank: int,
        dp_rank: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.by_method = torch.nn.ModuleDict()
        self._entries: list[_Entry] = []
        self._pp_rank, self._tp_rank, self._dp_rank = pp_rank, tp_rank, dp_rank
        for entry in entries:
            method = entry.method
            if not isinstance(method, HasModules):
                continue
            # Methods should create their modules lazily in modules(): then the initialization is
            # seeded here, identically on every rank and at every layout.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + zlib.crc32(entry.name.encode()))
                modules = dict(method.modules())
            layers = dict(method.module_layers()) if isinstance(method, PlacesModules) else {}
            unknown = sorted(set(layers) - set(modules))
            if unknown:
                raise ValueError(
                    f"method {entry.name!r}: module_layers() names unknown modules {unknown}"
                )
            mine = torch.nn.ModuleDict()
            for name, module in modules.items():
                if "." in name or not name:
                    raise ValueError(
                        f"method {entry.name!r}: module name {name!r} must be non-empty without dots"
                    )
                if name in layers and stage_of_layer(layers[name], student_layers, pp) != pp_rank:
                    continue  # built and trained on the stage that uses it
                module.to(device=device, dtype=dtype)
                mine[name] = module
                self._entries.append(
                    _Entry(entry.name, name, module, replicated_over_pp=name not in layers)
                )
            if len(mine):
                self.by_method[entry.name] = mine
        for item in self._entries:
            if item.replicated_over_pp and pp_rank > 0:
                for param in item.module.parameters():
                    # Counted once (on stage 0) in the gradient norm: megatron reads this ad-hoc
                    # tensor attribute, which torch's Parameter type does not declare.
                    setattr(param, "shared", True)  # noqa: B010

    def __len__(self) -> int:
        return len(self._entries)

    def replicated_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters replicated over the pipeline stages (gradients summed over pp)."""
        return [
            p
            for e in self._entries
            if e.replicated_over_pp
            for p in e.module.parameters()
            if p.requires_grad
        ]

    # ------------------------------------------------------------------ consistency
    def synchronize(self, *, tp_group, pp_group, dp_group) -> None:
        """Collective: make replicas equal (broadcast from the first rank of each group), in case a
        method initialized its modules from a different random state on some rank."""
        for item in sorted(self._entries, key=lambda e: e.key):
            for _, tensor in sorted(item.module.state_dict(keep_vars=True).items()):
                if not isinstance(tensor, torch.Tensor):
                    continue
                data = tensor.data
                groups = [dp_group]
                if not getattr(tensor, "tensor_model_parallel", False):
                    groups.append(tp_group)
                if item.replicated_over_pp:
                    groups.append(pp_group)
                for group in groups:
                    if group is not None and dist.get_world_size(group) > 1:
                        dist.broadcast(data, dist.get_process_group_ranks(group)[0], group=group)

    # ------------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, prefix: str = METHODS_PREFIX, *, tp: int) -> dict:
        """ShardedTensors of every parameter and persistent buffer, keyed
        ``<prefix><method>.<module>.<name>``; data are the tensors themselves (the optimizer maps
        its states to them by identity)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        out = {}
        for item in self._entries:
            pp_replica = self._pp_rank if item.replicated_over_pp else 0
            for name, tensor in item.module.state_dict(keep_vars=True).items():
                if not isinstance(tensor, torch.Tensor):
                    continue
                key = f"{prefix}{item.key}.{name}"
                if getattr(tensor, "tensor_model_parallel", False):
                    dim = int(getattr(tensor, "partition_dim", 0))
                    out[key] = ShardedTensor.from_rank_offsets(
                        key,
                        tensor,
                        (dim, self._tp_rank, tp),
                        replica_id=(pp_replica, 0, self._dp_rank),
                    )
                else:
                    out[key] = ShardedTensor.from_rank_offsets(
                        key, tensor, replica_id=(pp_replica, self._tp_rank, self._dp_rank)
                    )
        return out

    def load_loaded(self, loaded: dict, prefix: str = METHODS_PREFIX) -> None:
        """Copy tensors from a loaded sharded state dict (keys as :meth:`sharded_state_dict`)."""
        missing = []
        for item in self._entries:
            for name, tensor in item.module.state_dict(keep_vars=True).items():
                key = f"{prefix}{item.key}.{name}"
                if key not in loaded:
                    missing.append(key)
                    continue
                with torch.no_grad():
                    tensor.copy_(loaded[key])
        if missing:
            raise KeyError(f"checkpoint lacks method modules {missing[:5]}")


def wrap_finalize(finalize: Callable, params: list[torch.nn.Parameter], pp_group) -> Callable:
    """A ``finalize_model_grads_func`` that first sums the local gradients of pipeline-replicated
    method parameters over ``pp_group`` (before the data-parallel reduce-scatter, whose shard
    boundaries differ between stages), then runs megatron's ``finalize``."""
    if not params or pp_group is None or dist.get_world_size(pp_group) == 1:
        return finalize

    def finalize_with_pp_sum(*args, **kwargs):
        grads = [
            p.main_grad if getattr(p, "main_grad", None) is not None else p.grad for p in params
        ]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=pp_group)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return finalize(*args, **kwargs)

    return finalize_with_pp_sum
