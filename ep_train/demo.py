"""Dispatch and combine across processes and print what moved.

``python -m ep_train.demo [--ranks 2] [--tokens 8] [--experts 8] [--topk 2] [--hidden 256]``
starts that many CPU processes (gloo) unless it runs under ``torchrun``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import Buffer


def _report(rank: int, line: str) -> None:
    print(f"[rank {rank}] {line}", flush=True)


def _run(rank: int, world_size: int, args: argparse.Namespace) -> None:
    torch.manual_seed(1234 + rank)
    t, e, k, h = args.tokens, args.experts, args.topk, args.hidden
    hint = Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(h * 2, world_size)
    with Buffer(dist.group.WORLD, num_nvl_bytes=hint) as buffer:
        topk_idx = torch.rand(t, e).topk(k).indices
        topk_idx[0, -1] = -1  # a masked slot: goes nowhere
        topk_weights = torch.softmax(torch.randn(t, k), dim=-1)
        # Row i of rank r carries (r, i) in its first two channels.
        x = torch.randn(t, h).bfloat16()
        x[:, 0], x[:, 1] = rank, torch.arange(t)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, e)
        _report(rank, f"sends {per_rank.tolist()} tokens to ranks {list(range(world_size))}")
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
        )
        origins = [(int(r), int(i)) for r, i in recv_x[:, :2].float().tolist()]
        _report(rank, f"received {recv_x.shape[0]} rows (source rank, token): {origins}")
        _report(rank, f"tokens per local expert: {counts}")
        # Experts: multiply every row by 2; combine sums each token's returning rows.
        combined, combined_w, _ = buffer.combine(recv_x * 2, handle, topk_weights=recv_w)
        copies = in_rank.sum(dim=1, keepdim=True)
        exact = torch.equal(combined.float(), (x.float() * 2 * copies).bfloat16().float())
        weights_ok = torch.allclose(combined_w, torch.where(topk_idx >= 0, topk_weights, 0.0))
        _report(rank, f"combine returned every token x2 per copy: {exact}; gate weights restored: {weights_ok}")
        if not (exact and weights_ok):
            raise SystemExit(f"rank {rank}: combine did not restore the tokens")


def _worker(rank: int, world_size: int, store_path: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)
    try:
        _run(rank, world_size, args)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        try:
            _run(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.ranks, os.path.join(tmp, "store"), args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
