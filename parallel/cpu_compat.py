"""Run megatron-core's real code on CPU with gloo.

megatron-core (0.16.1 to 0.19.x) assumes CUDA in a handful of places, listed here. Without a GPU,
:func:`activate` patches exactly those places, and nothing else:

* ``torch.cuda.current_device()`` is used as a ``device=`` argument (tensor-parallel buffers, the
  pipeline's p2p shape exchange, attention's global memory buffer): it returns the CPU device.
* ``torch.cuda`` RNG state get/set/seed, which megatron's RNG tracker forks around dropout: routed to
  the CPU generator, so the tracker's named states are real CPU generator states.
* literal ``device="cuda"`` tensor factories (``total_num_tokens`` in the 1F1B schedule): a
  ``TorchFunctionMode`` rewrites CUDA ``device=`` arguments to CPU.
* ``torch.cuda.synchronize`` and ``Tensor.cuda()``: no-ops returning the tensor;
  ``torch.cuda.current_stream()`` (megatron-core 0.17+): a stream whose waits are no-ops.
* ``Tensor.type()`` without arguments: megatron's optimizers check parameter dtypes by legacy CUDA
  type names (``'torch.cuda.FloatTensor'``); CPU tensors report those names.

It is a no-op when CUDA is available, and idempotent. Activate it before megatron-core builds
anything (before ``initialize_model_parallel``).
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_active: _CudaToCpuMode | None = None


def _to_cpu(device):
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str):
        return _CPU if device.startswith("cuda") else device
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=`` keyword arguments that name CUDA to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        return func(*args, **kwargs)


def _cpu_current_device() -> torch.device:
    return _CPU


def _cpu_get_rng_state(device=None):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=None, graph_safe=False):
    torch.set_rng_state(new_state)


_tensor_type = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs:
        name = _tensor_type(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    return _tensor_type(self, dtype, non_blocking, **kwargs)


class _CpuStream:
    """``torch.cuda.current_stream()`` on CPU (megatron-core 0.17+ asks for it in every gradient
    sync): CPU work is synchronous, so waiting on and recording into it are no-ops."""

    def wait_event(self, event=None) -> None:
        pass

    def wait_stream(self, stream=None) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _cpu_current_stream(device=None) -> _CpuStream:
    return _CPU_STREAM


def is_active() -> bool:
    return _active is not None


def activate() -> bool:
    """Patch torch.cuda and megatron-core's CUDA RNG helpers for CPU. Returns True when active."""
    global _active
    if torch.cuda.is_available():
        return False
    if _active is not None:
        return True

    # torch types current_device() as returning an int; megatron passes it as ``device=``, so a
    # device (the CPU) is what it must return here.
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.current_stream = _cpu_current_stream  # type: ignore[assignment]
    torch.cuda.get_rng_state = _cpu_get_rng_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = _cpu_set_rng_state  # type: ignore[assignment]
    # On CPU the CPU generator plays the device generator's part: megatron's RNG tracker seeds a
    # named state with torch.cuda.manual_seed and reads it back (then restores the original).
    torch.cuda.manual_seed = torch.manual_seed  # type: ignore[assignment]
    torch.cuda.random.get_rng_state = _cpu_get_rng_state  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.Tensor.type = _cuda_type_name  # type: ignore[method-assign]

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = (  # type: ignore[assignment]
        lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state  # type: ignore[assignment]

    _active = _CudaToCpuMode()
    _active.__enter__()
    log.info("megatron-core CPU compatibility layer active (gloo, fp32)")
    return True
