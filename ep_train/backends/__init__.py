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
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    fallback = False  # "auto" chose cuda: a group it cannot serve takes the torch backend
    if name == "auto":
        forced = _env.forced_backend()
        if forced is not None:
            name = forced
        else:
            name = "cuda" if device.type == "cuda" and _ext.is_available() else "torch"
            fallback = name == "cuda"
    if name == "torch":
        return TorchBackend(group, rank, num_ranks, timeout_s)
    if device.type != "cuda":
        raise ValueError(
            "backend='cuda' needs a process group on CUDA devices (NCCL, or e.g. 'cpu:gloo,cuda:gloo'), "
            f"got device {device}"
        )
    _ext.load()
    if not _ext.is_available():
        raise ValueError(f"backend='cuda': {_ext.unavailable_reason()}; use backend='torch' (or 'auto')")
    from .cuda import CudaBackend, GroupNotServed

    try:
        return CudaBackend(group, rank, num_ranks, num_nvl_bytes, num_rdma_bytes, low_latency_mode, timeout_s)
    except GroupNotServed as exc:
        if not fallback:
            raise
        # NOTES: raised by every rank alike, before anything was allocated or mapped.
        if rank == 0 and not _env.quiet_import():
            print(f"ep_train: backend='auto' takes the torch backend for this group: {exc}", file=sys.stderr)
        return TorchBackend(group, rank, num_ranks, timeout_s)
