"""Run a function on N gloo ranks in separate processes, for tests of collective code.

``run_on_ranks(fn, world_size, *args)`` returns the list of each rank's return value (in rank
order) or raises with the failing rank's traceback. ``fn`` must be importable (a module-level
function of a test module) and its arguments and result picklable.

The ranks are forked from one multiprocessing fork server per test session that has imported
torch, megatron-core and gkd's runtime once (:data:`PRELOAD`): importing them costs about 6
CPU-seconds per process, more than most of these tests' work. Each rank is still its own process
with its own gloo process group; it gets the caller's current environment.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

PRELOAD = ("torch", "torch.distributed", "megatron.core", "parallel.runtime", "gkd_cli.worker")
"""Imported once by the fork server; every rank starts from that state."""

_FORKSERVER: list = []


def forkserver_context():
    """The session's multiprocessing context whose fork server has imported :data:`PRELOAD`."""
    if not _FORKSERVER:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        _FORKSERVER.append(ctx)
    return _FORKSERVER[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue, env: dict
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Plain pickle (by value): torch's queue would share tensors through file descriptors
        # served by this process, which may have exited before the parent reads them.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300
) -> list[Any]:
    ctx = forkserver_context()
    queue = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, env))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
