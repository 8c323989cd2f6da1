"""Backends of the Buffer contract: ``torch`` (reference, any device) and ``cuda`` (our kernels)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from .. import _env, _ext
from .base import Backend
from .torch_backend import TorchBackend

__all__ = ["Backend", "TorchBackend", "available_backends", "create_backend"]

BACKEND_NAMES = ("auto", "torch", "cuda")


def available_backends() -> dict[str, str]:
    """Backend name → one line on its state."""
    report = {"torch": "available (torch.distributed collectives: gloo on CPU, NCCL on CUDA)"}
    reason = _ext.unavailable_reason()
    if reason is None:
        from .. import nvshmem

        why_not = nvshmem.unavailable_reason(load=False)
        peers = "NVSHMEM symmetric memory" if why_not is None else f"CUDA IPC (NVSHMEM: {why_not})"
        puts = "with" if _ext.load().NVSHMEM_DEVICE else "without"
        report["cuda"] = (
            f"available (NVLink kernels for one node; low-latency buffer: {peers}; built {puts} NVSHMEM's "
            "device library)"
        )
    else:
        report["cuda"] = f"unavailable: {reason}"
    return report


def _choose(views: list[tuple[str, str | None, str | None]]) -> tuple[str, bool]:
    """The group's backend from every rank's ``(asked, EP_TRAIN_BACKEND, why the kernels cannot run
    here or None)``, in rank order → ``(name, whether "auto" chose cuda)``; every rank decides
    alike.  Raises ValueError (naming the ranks) where they asked differently or asked for kernels
    that some rank cannot run."""
    asked = [v[0] for v in views]
    if len(set(asked)) != 1:
        raise ValueError(f"every rank must create its Buffer with the same backend, got {asked} (rank order)")
    name = asked[0]
    if name == "auto":
        forced = [v[1] for v in views]
        if len(set(forced)) != 1:
            raise ValueError(f"EP_TRAIN_BACKEND must be the same on every rank, got {forced} (rank order; None: unset)")
        name = forced[0] or "auto"
    if name == "torch":
        return name, False
    missing = {r: v[2] for r, v in enumerate(views) if v[2] is not None}
    if name == "auto":
        return ("torch", False) if missing else ("cuda", True)
    if missing:
        raise ValueError(f"backend='cuda': ranks {sorted(missing)} cannot run the kernels: {missing}; use "
                         "backend='torch' (or 'auto')")  # fmt: skip
    return name, False


def _kernels_unavailable(device: torch.device) -> str | None:
    """Why this rank cannot run the cuda backend (None: it can)."""
    if device.type != "cuda":
        return (
            "backend='cuda' needs a process group on CUDA devices (NCCL, or e.g. 'cpu:gloo,cuda:gloo'), "
            f"got device {device}"
        )
    if not _ext.is_available():
        return _ext.unavailable_reason()
    return None


def create_backend(
    name: str,
    group: dist.ProcessGroup,
    rank: int,
    num_ranks: int,
    device: torch.device,
    num_nvl_bytes: int,
    num_rdma_bytes: int,
    low_latency_mode: bool,
    timeout_s: float,
) -> Backend:
    """The backend of a new Buffer, chosen by every rank of ``group`` together (one gather, after
    the bounded presence check): ranks that ask differently, or where only some can run the
    kernels, never end up with different backends."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    from .cuda import wait_for_group

    forced = _env.forced_backend()
    key = wait_for_group(group, rank, timeout_s)
    views: list[tuple | None] = [None] * num_ranks
    dist.all_gather_object(views, (name, forced, _kernels_unavailable(device)), group=group)
    name, fallback = _choose(views)  # fallback: "auto" chose cuda; a group it cannot serve takes torch
    if name == "torch":
        missing = [r for r, v in enumerate(views) if v[2] is not None]
        chose = views[0][0] == "auto" and views[0][1] is None  # "auto", not EP_TRAIN_BACKEND, chose torch
        if rank == 0 and chose and 0 < len(missing) < num_ranks and not _env.quiet_import():
            print(f"ep_train: backend='auto' takes the torch backend on every rank: ranks {missing} cannot run "
                  f"the kernels ({views[missing[0]][2]})", file=sys.stderr)  # fmt: skip
        return TorchBackend(group, rank, num_ranks, timeout_s)
    _ext.load()
    from .cuda import CudaBackend, GroupNotServed

    try:
        return CudaBackend(group, rank, num_ranks, num_nvl_bytes, num_rdma_bytes, low_latency_mode, timeout_s, key)
    except GroupNotServed as exc:
        if not fallback:
            raise
        # NOTES: raised by every rank alike, before anything was allocated or mapped.
        if rank == 0 and not _env.quiet_import():
            print(f"ep_train: backend='auto' takes the torch backend for this group: {exc}", file=sys.stderr)
        return TorchBackend(group, rank, num_ranks, timeout_s)
