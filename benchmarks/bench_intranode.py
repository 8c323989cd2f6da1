"""Intranode dispatch/combine bandwidth: the cuda backend's kernels beside the torch backend (NCCL).

Standard case (DESIGN.md §4): 4096 tokens per rank, hidden 7168, top-8 of 256 experts, random
top-k, on every GPU of this node (2, 4 or 8).  Logical bandwidth = bytes of the rows rank 0
receives in BF16 (FP8: x (1 + 4/128) / 2), local rows included, over the median CUDA-event time
of a cached-handle dispatch or a combine.  Never asserts on time.

    python benchmarks/bench_intranode.py [--tokens 4096] [--iters 30]
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from _common import bandwidth_row, median_us, run_on_gpus, standard_parser

from ep_train import Buffer, Config
from ep_train.fp8 import quantize_fp8

SWEEP = [  # (num_sms, send chunk, ring rows)
    (12, 8, 256),
    (24, 8, 256),
    (24, 16, 256),
    (24, 16, 512),
    (24, 24, 512),
    (24, 32, 512),
    (64, 8, 256),
    (64, 16, 512),
]


def _worker(rank: int, world: int, args) -> None:
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn((T, H), device="cuda", generator=gen).to(torch.bfloat16)
    scores = torch.rand((T, E), device="cuda", generator=gen)
    idx = scores.topk(K, dim=1).indices
    w = torch.rand((T, K), device="cuda", generator=gen)
    x_fp8 = quantize_fp8(x)
    nvl = max(Config(s, c, r).get_nvl_buffer_size_hint(H * 2, world) for s, c, r in SWEEP)
    cuda = Buffer(None, nvl, backend="cuda", timeout_s=60.0)
    ref = Buffer(None, nvl, backend="torch")  # the size is checked on every backend
    lines = []
    want = {}  # the torch backend's outputs: every configuration of ours must give them

    def measure(buf: Buffer, name: str, config: Config | None) -> None:
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, config=config, **layout)
        combined = buf.combine(recv_x, handle, config=config)[0]
        if not want:
            want.update(x=recv_x, w=recv_w, combined=combined)
        elif not (torch.equal(recv_x, want["x"]) and torch.equal(recv_w, want["w"])):
            raise RuntimeError(f"{name}: the dispatch's rows or weights differ from the torch backend's")
        elif (combined.float() - want["combined"].float()).norm() > 1e-2 * want["combined"].float().norm():
            raise RuntimeError(f"{name}: the combine differs from the torch backend's")
        rows = torch.tensor([recv_x.shape[0]], device="cuda")
        dist.broadcast(rows, 0)
        nbytes = int(rows) * H * 2
        t_bf16 = median_us(lambda: buf.dispatch(x, handle=handle, config=config), args.iters)
        t_fp8 = median_us(lambda: buf.dispatch(x_fp8, handle=handle, config=config), args.iters)
        t_comb = median_us(lambda: buf.combine(recv_x, handle, config=config), args.iters)
        lines.append(bandwidth_row(f"{name} dispatch BF16", t_bf16, nbytes))
        lines.append(bandwidth_row(f"{name} dispatch FP8", t_fp8, nbytes * (1 + 4 / 128) / 2))
        lines.append(bandwidth_row(f"{name} combine", t_comb, nbytes))

    measure(ref, "torch backend (NCCL)", None)  # first: the outputs every configuration is checked against
    torch_lines = lines[:]
    lines.clear()
    for sms, chunk, ring in SWEEP:
        measure(cuda, f"cuda sms={sms} chunk={chunk} ring={ring}", Config(sms, chunk, ring))
    lines.extend(torch_lines)
    # Transfer only: NCCL all_to_all_single of the same rows.
    per_rank, _, _, in_rank, _ = ref.get_dispatch_layout(idx, E)
    counts = torch.empty((world, world), dtype=torch.int64, device="cuda")
    dist.all_gather_into_tensor(counts.view(-1), per_rank.long())
    send_splits, recv_splits = counts[rank].tolist(), counts[:, rank].tolist()
    send = torch.randn((sum(send_splits), H), device="cuda").to(torch.bfloat16)
    recv = torch.empty((sum(recv_splits), H), device="cuda", dtype=torch.bfloat16)
    rows0 = torch.tensor([sum(recv_splits)], device="cuda")
    dist.broadcast(rows0, 0)
    t = median_us(lambda: dist.all_to_all_single(recv, send, recv_splits, send_splits), args.iters)
    lines.append(bandwidth_row("NCCL all_to_all_single (rows only)", t, int(rows0) * H * 2))
    if rank == 0:
        name = torch.cuda.get_device_name()
        head = f"{world} x {name}, {datetime.date.today()}, T={T} H={H} top-{K} E={E}"
        print(f"\n{head}, rank 0 receives {int(rows0)} rows")
        print("\n".join(lines), flush=True)
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()


def main() -> None:
    run_on_gpus(_worker, standard_parser(__doc__, tokens=4096, iters=30).parse_args())


if __name__ == "__main__":
    main()
