"""NVSHMEM symmetric memory for the cuda backend's low-latency buffer.

The low-latency kernels reach their peers by loads and stores through peer pointers.  With NVSHMEM
those pointers come from one symmetric allocation (``nvshmem_ptr``), so the buffer needs no CUDA
IPC handles and its memory is the same NVSHMEM heap the network path of a multi-node job uses.  On
one node NVSHMEM uses NVLink (its P2P transport): no RDMA NIC is needed.

NVSHMEM's host library is loaded at run time from the pip wheel (nvidia-nvshmem-cu12 / -cu13) or
``$NVSHMEM_HOME``; ``ep_train._C`` is compiled against the wheel's headers, and with
``EP_TRAIN_NVSHMEM_DEVICE=1`` at build time also linked with its device library (the low-latency
kernels' puts, docs/kernels.md).  NVSHMEM is bootstrapped from a unique id broadcast over the
torch process group, so there is no MPI and no launcher integration.  One process belongs to one
NVSHMEM job: the first group that asks becomes its PEs, in group-rank order; another group gets
CUDA IPC (``auto``) or an error (``nvshmem``).

No wait is unbounded: every NVSHMEM collective (init, malloc) is entered only after the ranks have
agreed over the process group (whose timeout applies) that all of them enter it with the same
arguments.  Blocks are never handed back to NVSHMEM (``nvshmem_free`` is a barrier with no
timeout): a destroyed buffer returns its block to this process's pool, and a later buffer of the
same group reuses a block that is free on every rank.  The process's exit releases the heap.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import torch.distributed as dist

from . import _env, _ext

__all__ = ["Block", "SymmetricHeap", "gather_failures", "heap_for", "library_path", "unavailable_reason"]


def library_path() -> str | None:
    """``libnvshmem_host.so.3`` of ``$NVSHMEM_HOME`` or of the pip wheel, or None."""
    for root in _env.nvshmem_roots():
        found = sorted(glob.glob(os.path.join(root, "lib", "libnvshmem_host.so*")))
        if found:
            versioned = [f for f in found if f.endswith(".so.3")]
            return (versioned or found)[0]
    return None


_NO_HEADERS = "ep_train._C was built without NVSHMEM headers (install nvidia-nvshmem-cu13 and rebuild)"
_NO_LIBRARY = "libnvshmem_host.so.3 not found (pip install nvidia-nvshmem-cu13, or set NVSHMEM_HOME)"


def unavailable_reason(load: bool = True) -> str | None:
    """None when this process can use NVSHMEM, else a sentence saying why not.

    ``load=True`` loads the host library into ``_C`` (once); ``load=False`` only looks (extension
    built with the headers, library present) and loads nothing.
    """
    reason = _ext.unavailable_reason()
    if reason is not None:
        return reason
    nv = _ext.load().nvshmem
    if nv.loaded():
        return None
    if not nv.compiled():
        return _NO_HEADERS
    path = library_path()
    if path is None:
        return _NO_LIBRARY
    return (nv.load(path) or None) if load else None


def gather_failures(group: dist.ProcessGroup, failure: str | None) -> str | None:
    """Collective: None when no rank of ``group`` failed, else every failing rank's sentence."""
    failures: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(failures, failure, group=group)
    return name_failures(group, failures)


def name_failures(group: dist.ProcessGroup, failures: list[str | None]) -> str | None:
    """``failures[r]`` of each group rank r that failed (None: it did not), named by global rank."""
    members = dist.get_process_group_ranks(group)
    failed = [f"rank {members[r]}: {why}" for r, why in enumerate(failures) if why is not None]
    return "; ".join(failed) or None


@dataclass
class Block:
    """One symmetric allocation: this rank's address and every rank's, mapped here (rank order)."""

    index: int
    num_bytes: int
    ptr: int
    peer_ptrs: list[int]
    in_use: bool = True


@dataclass
class SymmetricHeap:
    """This process's NVSHMEM job: its group's global ranks and the blocks allocated so far."""

    global_ranks: tuple[int, ...]
    blocks: list[Block] = field(default_factory=list)

    def alloc(self, group: dist.ProcessGroup, num_bytes: int) -> Block:
        """Collective over ``group``: a block of at least ``num_bytes`` on every rank (its contents are
        unspecified: the low-latency buffer that adopts it zero-fills it).

        Reuses the smallest block that is large enough and free on every rank, else allocates.
        """
        nv = _ext.load().nvshmem
        free = [(b.index, b.num_bytes) for b in self.blocks if not b.in_use and b.num_bytes >= num_bytes]
        views: list[tuple[int, list[tuple[int, int]]] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(views, (int(num_bytes), free), group=group)
        sizes = [v[0] for v in views]
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must ask for the same low-latency buffer size, got {sizes} bytes")
        common = set.intersection(*(set(v[1]) for v in views))
        if common:
            index = min(common, key=lambda entry: (entry[1], entry[0]))[0]
            block = self.blocks[index]
            block.in_use = True
            return block
        ptr = nv.malloc(int(num_bytes))  # every rank enters: they agreed above
        rank = dist.get_rank(group)
        peer_ptrs = [ptr if pe == rank else nv.peer_ptr(ptr, pe) for pe in range(len(self.global_ranks))]
        block = Block(len(self.blocks), int(num_bytes), ptr, peer_ptrs)
        self.blocks.append(block)
        return block

    @staticmethod
    def release(block: Block) -> None:
        """The block's buffer is destroyed; a later ``alloc`` may reuse it (memory stays mapped)."""
        block.in_use = False


_heap: SymmetricHeap | None = None


def heap_for(group: dist.ProcessGroup) -> SymmetricHeap | str:
    """Collective over ``group``: this process's NVSHMEM heap with the group's ranks as its PEs.

    Returns a sentence instead when some rank cannot use NVSHMEM or the process already belongs to
    another group's NVSHMEM job (every rank returns the same kind of answer).
    """
    global _heap
    members = tuple(dist.get_process_group_ranks(group))
    reason = unavailable_reason()
    if reason is None and _heap is not None and _heap.global_ranks != members:
        reason = f"this process's NVSHMEM job already belongs to the group of ranks {list(_heap.global_ranks)}"
    failed = gather_failures(group, reason)
    if failed is not None:
        return failed
    if _heap is not None:
        return _heap
    nv = _ext.load().nvshmem
    rank = dist.get_rank(group)
    uid = [nv.unique_id() if rank == 0 else None]
    dist.broadcast_object_list(uid, src=members[0], group=group)
    nv.init(rank, len(members), uid[0])  # every rank enters: they agreed above
    _heap = SymmetricHeap(members)
    return _heap
