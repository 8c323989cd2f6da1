"""The multi-process launcher: results come back in rank order; failures and hangs name the rank."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from ep_train.testing import DistributedTestError, run_distributed


def _sum_ranks(rank, world_size, offset, scale=1):
    t = torch.tensor([rank + offset], dtype=torch.float64)
    dist.all_reduce(t)
    return {"rank": rank, "sum": t.item() * scale, "threads": torch.get_num_threads(), "tensor": t}


@pytest.mark.parametrize("world_size, start_method", [(1, None), (3, "forkserver"), (2, "spawn")])
def test_results_in_rank_order(world_size, start_method):
    out = run_distributed(_sum_ranks, world_size, 10, scale=2, timeout_s=60, start_method=start_method)
    want = 2 * sum(r + 10 for r in range(world_size))
    assert [o["rank"] for o in out] == list(range(world_size))
    assert all(o["sum"] == want and o["threads"] == 1 for o in out)
    assert all(torch.equal(o["tensor"], torch.tensor([want / 2], dtype=torch.float64)) for o in out)


def _fail_hang_or_exit(rank, world_size):
    dist.barrier()  # every rank has joined: a rank dying later cannot break the others' start-up
    if rank == 0:
        raise KeyError("rank zero's own failure")
    if rank == 1:
        time.sleep(600)  # hangs
    os._exit(3)  # rank 2 dies


def test_failures_name_each_rank_and_its_cause():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_hang_or_exit, 3, timeout_s=4)
    msg = str(info.value)
    assert time.monotonic() - start < 20, "the launcher must not wait much past its timeout"
    assert "rank 0 raised" in msg and "rank zero's own failure" in msg and "KeyError" in msg, msg
    assert "rank 1: no result" in msg and "killed" in msg, msg
    assert "rank 2: no result" in msg and "exit code 3" in msg, msg


def _exit_on_rank_one(rank, world_size):
    dist.barrier()
    if rank == 1:
        os._exit(0)
    return "alive"


def test_may_exit_allows_ranks_to_die():
    assert run_distributed(_exit_on_rank_one, 2, may_exit=[1], timeout_s=60) == ["alive", None]


_PENDING = []


def _leave_before_the_peer_reads(rank, world_size):
    if rank == 0:
        # NOTES: the send is kept (not waited for) and rank 0 returns while rank 1 has not yet received;
        # a rank that tore down its process group now would break rank 1's receive.
        _PENDING.append(dist.isend(torch.arange(4, dtype=torch.float32), dst=1))
        return "sent"
    time.sleep(1.0)
    got = torch.zeros(4)
    dist.recv(got, src=0)
    return got.tolist()


def test_a_finished_rank_stays_until_its_peers_finish():
    """A rank that is done keeps its process group until every rank is done (bounded by EXIT_WAIT_S)."""
    assert run_distributed(_leave_before_the_peer_reads, 2, timeout_s=60) == ["sent", [0.0, 1.0, 2.0, 3.0]]


def _fail_while_peer_waits(rank, world_size):
    if rank == 0:
        raise RuntimeError("rank zero fails at once")
    dist.all_reduce(torch.zeros(1))  # blocked on rank 0 until it is gone
    return "unreachable"


def test_a_failed_rank_leaves_at_once():
    """A failing rank does not wait for peers that are blocked on it."""
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="rank zero fails at once"):
        run_distributed(_fail_while_peer_waits, 2, timeout_s=60)
    assert time.monotonic() - start < 10, "the failing rank waited for its blocked peer"


def _devices(rank, world_size):
    from ep_train.buffer import group_device

    torch.cuda.is_available = lambda: False
    try:
        group_device()
    except ValueError as exc:
        refused = str(exc)
    torch.cuda.is_available, torch.cuda.current_device = (lambda: True), (lambda: 0)  # a machine with a GPU
    t = torch.tensor([rank], dtype=torch.int64)
    dist.all_reduce(t)  # CPU tensors still go through gloo
    gloo_only = dist.new_group(list(range(world_size)), backend="gloo")
    return refused, str(group_device()), str(group_device(gloo_only)), t.item()


def test_a_group_that_carries_cuda_tensors_puts_buffers_on_the_gpu():
    """``"cpu:gloo,cuda:gloo"`` (ranks sharing a GPU): the default group's device is CUDA, and a process
    without one is told so; a plain gloo group's stays the CPU."""
    out = run_distributed(_devices, 2, backend="cpu:gloo,cuda:gloo", timeout_s=60)
    no_cuda = "the process group's backend 'cpu:gloo,cuda:gloo' moves CUDA tensors, but this process has no CUDA device"
    assert out == [(no_cuda, "cuda:0", "cpu", 1)] * 2


def _leave_a_temporary_directory(rank, world_size):
    """What a library does at import (wandb does): a temporary directory removed only at exit, which
    a rank never runs (it ends with os._exit)."""
    import tempfile

    kept = tempfile.TemporaryDirectory(suffix="-left-by-a-rank")
    _leave_a_temporary_directory.kept = kept  # alive until the process ends
    return kept.name


def test_ranks_leave_no_temporary_files_behind():
    paths = run_distributed(_leave_a_temporary_directory, 2)
    assert len(set(paths)) == 2
    for path in paths:
        assert not os.path.exists(path), f"{path} outlived its rank"
