"""Multi-process launcher for GPU tests: one process per GPU, NCCL process group."""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(_SAFE_ENV)
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        device_id=torch.device("cuda", rank),
    )  # fmt: skip
    try:
        fn(rank, world_size, *args)
    except BaseException:
        # NOTES: print before anything else: tearing NCCL down while a peer is stuck can crash the
        # process and hide the original error.
        traceback.print_exc()
        sys.stderr.flush()
        raise
    dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; re-raises the first failure."""
    os.environ.update(_SAFE_ENV)
    mp.spawn(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
