"""What the multi-GPU benchmarks share: the standard-case arguments and the launch on this node's GPUs
(or, started by ``torchrun``, on the ranks it started, e.g. across nodes)."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ep_train.testing import run_distributed

# No NVLink multicast objects (NCCL, torch symmetric memory, NVSHMEM).
_NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


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
    os.environ.update(_NO_MULTICAST)  # the ranks inherit it
    run_distributed(worker, world, args, backend="nccl", timeout_s=900)


def run_on_gpus(worker, args: argparse.Namespace) -> None:
    """``worker(rank, world, args)`` on ``args.world`` GPUs (default: the largest of 2/4/8 present);
    under ``torchrun`` on its ranks instead (``--world`` is then ignored)."""
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.update(_NO_MULTICAST)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        try:
            worker(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    launch(worker, args.world or max(n for n in (2, 4, 8) if n <= torch.cuda.device_count()), args)


def median_us(fn, iters: int) -> float:
    """Median CUDA-event time of ``fn()`` in µs over ``iters`` calls, after one warm-up call and a
    barrier; every launch is queued behind a sleep kernel before the first one starts."""
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda._sleep(int(2e8))
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in events)
    return times[len(times) // 2]


def bandwidth_row(name: str, us: float, nbytes: float) -> str:
    """One result line: name, µs, and logical GB/s of ``nbytes``."""
    return f"{name:<44} {us:9.1f} us {nbytes / us / 1e3:8.1f} GB/s"
