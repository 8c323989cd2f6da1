"""Run a function on N ranks in fresh processes and collect results or failures.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes; each initialises a
process group (gloo on CPU, NCCL with one GPU per rank) through a file store, calls
``fn(rank, world_size, *args, **kwargs)`` and sends back its return value or its traceback.  The
parent waits up to ``timeout_s``; ranks that are still running then are killed and reported.
``fn`` must be importable (defined at module level).
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "DistributedTestError"]


class DistributedTestError(AssertionError):
    """One or more ranks failed or hung; the message holds each failing rank's traceback."""


def _child(rank, world_size, backend, store_path, fn, args, kwargs, results) -> None:
    os.environ.setdefault("EP_TRAIN_QUIET", "1")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may already be gone
                pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 180.0,
    **kwargs: Any,
) -> list[Any]:
    """Return ``[fn(0, ...), ..., fn(world_size-1, ...)]`` computed on separate ranks."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="ep_train_store_") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_child, args=(r, world_size, backend, store_path, fn, args, kwargs, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        outcomes: dict[int, tuple[bool, Any]] = {}
        while len(outcomes) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.5)
                outcomes[rank] = (ok, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
    failures = []
    for rank in range(world_size):
        if rank not in outcomes:
            code = procs[rank].exitcode
            failures.append(f"rank {rank}: no result (hung past {timeout_s:g} s or died, exit code {code})")
        elif not outcomes[rank][0]:
            failures.append(f"rank {rank} raised:\n{outcomes[rank][1]}")
    if failures:
        raise DistributedTestError("\n".join(failures))
    return [outcomes[r][1] for r in range(world_size)]
