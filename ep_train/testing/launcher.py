"""Run a function on N ranks in fresh processes and collect results or failures.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes: nothing of the test
process (CUDA state, threads, globals) is inherited.  Each rank sets one intra-op thread, joins a
process group (gloo on CPU; NCCL with GPU ``rank``; ``"cpu:gloo,cuda:gloo"``: every rank on the
current GPU) through a ``FileStore`` in a temporary directory, calls ``fn(rank, world_size, *args,
**kwargs)`` and sends back its return value or its formatted traceback, then waits (bounded) until
every rank has finished before it leaves the group, so a rank done early never closes a connection
a peer is still using.  The parent waits up to ``timeout_s``; ranks still running then are killed
and named.  Any failure raises ``DistributedTestError`` (an ``AssertionError``) holding every
failing rank's traceback, so pytest shows what each rank saw.

``fn`` must be picklable: a module-level function of an importable module (tests define them at
module level).  Return plain Python values or small CPU tensors; they are pickled by value.
Start methods: ``"spawn"`` runs a new interpreter per rank, which costs an ``import torch`` each
(about 3 s of CPU: 20 s for 4 ranks on 2 cores).  ``"forkserver"`` (the default where the platform
has it) starts one clean server process per test session that imports torch once and forks every
rank from it: the same fresh state (the server never touches CUDA), under a second per launch.
Either way, tests still run many sub-cases inside one launch.
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "DistributedTestError"]

#: after one rank fails, how long the others get to finish (they often fail too, with the cause).
FAILURE_GRACE_S = 20.0
#: how long a finished rank waits for the others to finish before it tears down its process group.
EXIT_WAIT_S = 15.0
_EXIT_KEY = "ep_train/launcher/finished"


class DistributedTestError(AssertionError):
    """One or more ranks failed or hung; the message holds each failing rank's traceback."""


def _wait_for_peers(store, world_size: int, bound_s: float) -> None:
    """Wait (at most ``bound_s``) until every rank counts itself finished.

    A rank that returns early must not tear down its sockets while a peer is still connecting to it:
    gloo's ``new_group`` completes on one side before the other, and the late side then fails with
    "Connection closed by peer".
    """
    deadline = time.monotonic() + bound_s
    while store.add(_EXIT_KEY, 0) < world_size and time.monotonic() < deadline:
        time.sleep(0.01)


def _child(rank, world_size, backend, store_path, fn, args, kwargs, results, exit_wait_s) -> None:
    torch.set_num_threads(1)
    # NOTES: a rank ends with os._exit (multiprocessing), so temporary directories that libraries
    # make at import and remove at exit (wandb's, imported by Megatron) would be left behind: the
    # rank's temporary files go under the run's directory, which the parent removes.
    scratch = os.path.join(os.path.dirname(store_path), f"rank{rank}")
    os.makedirs(scratch, exist_ok=True)
    tempfile.tempdir = os.environ["TMPDIR"] = scratch
    store, ok = None, False
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args, **kwargs)
        # NOTES: pickled by value here; torch's queue pickler would share tensor memory, which breaks
        # when this process exits before the parent reads it.
        results.put((rank, True, pickle.dumps(value)))
        ok = True
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if store is not None and exit_wait_s > 0:
            # NOTES: a failed rank counts itself finished but leaves at once: its peers are often
            # blocked on it and fail only once it is gone.
            try:
                store.add(_EXIT_KEY, 1)
                if ok:
                    _wait_for_peers(store, world_size, exit_wait_s)
            except Exception:  # noqa: BLE001 - the result is already sent; leaving is all that is left
                pass
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may already be gone
                pass


def _context(start_method: str | None):
    methods = mp.get_all_start_methods()
    if start_method is None:
        start_method = "forkserver" if "forkserver" in methods else "spawn"
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # NOTES: the server imports torch once; importing torch initialises no CUDA context, so ranks
        # forked from it may still pick their GPU.  Applies to the server this test process starts.
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def _collect(procs, results, world_size: int, timeout_s: float) -> dict[int, tuple[bool, Any]]:
    """Read results until every rank reported, all exited, or the deadline (shortened after a failure)."""
    deadline = time.monotonic() + timeout_s
    outcomes: dict[int, tuple[bool, Any]] = {}
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=0.2)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                try:  # a result sent just before the process ended
                    rank, ok, value = results.get(timeout=1.0)
                except queue.Empty:
                    break
            else:
                continue
        outcomes[rank] = (ok, value)
        if not ok:
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
    return outcomes


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    may_exit: Iterable[int] = (),
    start_method: str | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Return ``[fn(0, world_size, *args, **kwargs), ..., fn(world_size - 1, ...)]``, each from its own process.

    Args:
        fn: module-level function ``(rank, world_size, *args, **kwargs) -> picklable value``.
        world_size: number of ranks (processes).
        backend: ``"gloo"`` (CPU), ``"nccl"`` (one GPU per rank; rank r uses ``cuda:r``) or
            ``"cpu:gloo,cuda:gloo"`` (every rank on the current GPU, CUDA tensors carried by gloo:
            ranks as processes sharing one GPU).
        timeout_s: bound on the whole run; ranks still running then are killed and reported as hung.
        may_exit: ranks allowed to end without a result (fault-injection tests kill them on purpose);
            their entry in the returned list is None.
        start_method: ``"forkserver"`` or ``"spawn"`` (None: forkserver where available, else spawn).

    Raises:
        DistributedTestError: a rank raised (its traceback is in the message), died, or hung.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    may_exit = set(may_exit)
    # NOTES: ranks killed on purpose never count themselves finished; the others then leave at once.
    exit_wait_s = 0.0 if may_exit else EXIT_WAIT_S
    ctx = _context(start_method)
    results = ctx.Queue()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ep_train_store_") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_child,
                args=(r, world_size, backend, store_path, fn, args, kwargs, results, exit_wait_s),
                name=f"ep_train-rank{r}",
            )  # fmt: skip
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outcomes = _collect(procs, results, world_size, timeout_s)
        killed = set()
        for rank, p in enumerate(procs):
            p.join(timeout=5.0 if rank in outcomes else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
                killed.add(rank)
    elapsed = time.monotonic() - start
    failures = []
    for rank in range(world_size):
        if rank in outcomes:
            if not outcomes[rank][0]:
                failures.append(f"rank {rank} raised:\n{outcomes[rank][1]}")
        elif rank not in may_exit:
            state = "still running, killed" if rank in killed else f"ended with exit code {procs[rank].exitcode}"
            failures.append(f"rank {rank}: no result after {elapsed:.1f} s of at most {timeout_s:g} s; {state}")
    if failures:
        raise DistributedTestError(f"{fn.__qualname__} on {world_size} ranks failed:\n" + "\n".join(failures))
    return [pickle.loads(outcomes[r][1]) if r in outcomes else None for r in range(world_size)]
