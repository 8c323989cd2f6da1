"""ep_train.nvshmem's bookkeeping on CPU ranks (gloo): which ranks agree, which block is reused.

The NVSHMEM library itself needs GPUs (tests/gpu/test_low_latency_gpu.py runs the low-latency
kernels on NVSHMEM memory).  Here a stand-in for ``_C.nvshmem`` records the collective calls, so the
tests check the decisions every rank must make alike: a malloc only when every rank enters it,
reuse of a block only when it is free on every rank, and the errors for disagreeing ranks.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from ep_train import _env, nvshmem
from ep_train.testing import run_distributed


class _RecordingNvshmem:
    """Host API stand-in: symmetric addresses 0x1000 * n, peers at pe * 2**40 + address."""

    def __init__(self):
        self.mallocs: list[int] = []

    def malloc(self, num_bytes: int) -> int:
        self.mallocs.append(num_bytes)
        return 0x1000 * len(self.mallocs)

    def peer_ptr(self, ptr: int, pe: int) -> int:
        return (pe << 40) + ptr


def _heap(monkeypatch_target, world: int) -> tuple[nvshmem.SymmetricHeap, _RecordingNvshmem]:
    fake = _RecordingNvshmem()
    monkeypatch_target.setattr(nvshmem._ext, "load", lambda: type("C", (), {"nvshmem": fake}))
    return nvshmem.SymmetricHeap(tuple(range(world))), fake


def _reuse(rank: int, world: int) -> list:
    mp = pytest.MonkeyPatch()
    heap, fake = _heap(mp, world)
    group = dist.group.WORLD
    a = heap.alloc(group, 1 << 20)
    assert a.peer_ptrs == [(pe << 40) + a.ptr if pe != rank else a.ptr for pe in range(world)]
    heap.release(a)
    b = heap.alloc(group, 1 << 19)  # smaller: reuses a on every rank, no malloc
    assert b is a and b.in_use and len(fake.mallocs) == 1
    c = heap.alloc(group, 1 << 19)  # a is taken: a new block
    assert c is not a and len(fake.mallocs) == 2
    heap.release(c)
    if rank == 0:  # a free on rank 0 only: nobody may reuse it, every rank allocates
        heap.release(a)
    d = heap.alloc(group, 1 << 20)
    assert d is not a and d is not c and len(fake.mallocs) == 3
    e = heap.alloc(group, 1 << 18)  # c is free everywhere; a only on rank 0
    assert e is c
    mp.undo()
    return fake.mallocs


def _mismatched_sizes(rank: int, world: int) -> str:
    mp = pytest.MonkeyPatch()
    heap, fake = _heap(mp, world)
    try:
        heap.alloc(dist.group.WORLD, 4096 * (1 + rank))
    except ValueError as exc:
        assert not fake.mallocs, "no rank may enter nvshmem_malloc when the sizes differ"
        return str(exc)
    finally:
        mp.undo()
    raise AssertionError("no ValueError")


@pytest.mark.parametrize("world", [2, 8])
def test_blocks_are_reused_only_when_free_on_every_rank(world):
    mallocs = run_distributed(_reuse, world)
    assert mallocs == [[1 << 20, 1 << 19, 1 << 20]] * world


def test_different_sizes_are_refused_before_any_malloc():
    for msg in run_distributed(_mismatched_sizes, 2):
        assert "same low-latency buffer size" in msg and "[4096, 8192]" in msg


def test_transport_variable(monkeypatch):
    monkeypatch.delenv("EP_TRAIN_LL_TRANSPORT", raising=False)
    assert _env.low_latency_transport() == "auto"
    monkeypatch.setenv("EP_TRAIN_LL_TRANSPORT", " NVSHMEM ")
    assert _env.low_latency_transport() == "nvshmem"
    monkeypatch.setenv("EP_TRAIN_LL_TRANSPORT", "rdma")
    with pytest.raises(ValueError, match="EP_TRAIN_LL_TRANSPORT.*'rdma'"):
        _env.low_latency_transport()


def test_rma_variable(monkeypatch):
    monkeypatch.delenv("EP_TRAIN_LL_RMA", raising=False)
    assert _env.low_latency_rma() is False
    monkeypatch.setenv("EP_TRAIN_LL_RMA", "1")
    assert _env.low_latency_rma() is True
    monkeypatch.setenv("EP_TRAIN_LL_RMA", "yes")
    with pytest.raises(ValueError, match="EP_TRAIN_LL_RMA.*'yes'"):
        _env.low_latency_rma()


def test_without_the_extension_nvshmem_says_why():
    reason = nvshmem.unavailable_reason(load=False)
    if reason is None:
        pytest.skip("this machine can use NVSHMEM")
    assert "ep_train._C" in reason or "NVSHMEM" in reason or "nvshmem" in reason


def _failures(rank: int, world: int) -> tuple:
    group = dist.group.WORLD
    none = nvshmem.gather_failures(group, None)
    one = nvshmem.gather_failures(group, "heap too small" if rank == world - 1 else None)
    return none, one


def test_one_rank_failing_is_reported_on_every_rank():
    for none, one in run_distributed(_failures, 3):
        assert none is None
        assert one == "rank 2: heap too small"
