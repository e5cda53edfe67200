"""Memory in use by this process's tensors, for metrics and the planner's accuracy check.

GPU: ``torch.cuda.memory_allocated`` (exact, allocator-level). CPU: glibc's ``mallinfo2``
(bytes handed out by malloc, including large mmap-ed blocks), which, unlike the resident set size,
does not count memory the allocator keeps after frees (fragmentation makes RSS grow to ~2x the
live bytes on these runs). :class:`PeakTracker` samples it at the points where a step's memory
peaks (end of each microbatch's forward, after the loss) because CPU allocators keep no high-water
mark of their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2():
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    libc = ctypes.CDLL(path)
    fn = getattr(libc, "mallinfo2", None)
    if fn is None:
        return None
    fn.restype = _MallInfo2
    return fn


def allocated_bytes() -> int | None:
    """Bytes currently allocated (GPU: by torch's caching allocator; CPU: by malloc), or ``None``
    when the platform cannot tell."""
    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return int(info.uordblks + info.hblkhd)


class PeakTracker:
    """Highest :func:`allocated_bytes` seen at the sampled points since :meth:`reset`."""

    def __init__(self) -> None:
        self.peak = 0

    def sample(self) -> None:
        value = allocated_bytes()
        if value is not None and value > self.peak:
            self.peak = value

    def reset(self) -> int:
        peak, self.peak = self.peak, 0
        return peak
