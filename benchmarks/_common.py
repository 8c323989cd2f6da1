"""What the multi-GPU benchmarks share: the standard-case arguments and the launch on this node's GPUs."""

from __future__ import annotations

import argparse
import os

import torch

from ep_train.testing import run_distributed


def standard_parser(doc: str, *, tokens: int | list[int], iters: int) -> argparse.ArgumentParser:
    """``--tokens --hidden --topk --experts --iters --world`` with the standard case as defaults."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if isinstance(tokens, list):
        parser.add_argument("--tokens", type=int, nargs="+", default=tokens)
    else:
        parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--world", type=int, default=0, help="GPUs to use (default: all, 2/4/8)")
    return parser


def launch(worker, world: int, args: argparse.Namespace) -> None:
    """``worker(rank, world, args)`` on GPUs 0..world-1, one process each (NCCL)."""
    # The ranks inherit this: no NVLink multicast objects (NCCL, torch symmetric memory, NVSHMEM).
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    run_distributed(worker, world, args, backend="nccl", timeout_s=900)


def run_on_gpus(worker, args: argparse.Namespace) -> None:
    """``worker(rank, world, args)`` on ``args.world`` GPUs (default: the largest of 2/4/8 present)."""
    launch(worker, args.world or max(n for n in (2, 4, 8) if n <= torch.cuda.device_count()), args)
