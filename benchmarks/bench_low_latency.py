"""Low-latency dispatch/combine latency: the cuda backend's kernels beside the torch backend (NCCL).

Low-latency case (DESIGN.md §4): hidden 7168, top-8 of 256 experts, random top-k, 128 tokens per
rank (also 1, 32 and 256), num_max_dispatch_tokens_per_rank = tokens, on every GPU of this node
(2, 4 or 8).  Ours: median CUDA-event time of one call replayed as a CUDA graph (dispatch BF16,
dispatch FP8, combine, combine with sums per rank), and of the send and the receive (hook) halves
of an eager hook-mode call.  Before timing, every size checks a dispatch + combine round trip.
The torch backend syncs with the host, so it cannot be captured: it is timed eagerly.  Logical
bandwidth = bytes of the rows rank 0 receives, in BF16 (FP8: x (1 + 4/128) / 2).  Never asserts.
The header names the low-latency buffer's memory (NVSHMEM or CUDA IPC; ``EP_TRAIN_LL_TRANSPORT``)
and whether every rank is reached by NVSHMEM puts (``EP_TRAIN_LL_RMA=1``, the path to other nodes).

``--trace`` adds, per size, the median time between the phase boundaries inside the fused
kernels (global timer written by block 0).

    python benchmarks/bench_low_latency.py [--tokens 1 32 128 256] [--iters 50] [--trace]

Across nodes (a build with ``EP_TRAIN_NVSHMEM_DEVICE=1``; the other nodes' ranks are reached by NVSHMEM
puts), one process per GPU started by torchrun on every node:

    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        benchmarks/bench_low_latency.py
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from _common import bandwidth_row, median_us, run_on_gpus, standard_parser

from ep_train import Buffer, _env
from ep_train.fp8 import dequantize_fp8


def _graph_of(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _hook_us(buf: Buffer, call, iters: int) -> tuple[float, float]:
    """Median (send, receive) times of hook-mode calls: events around the call and around its hook."""
    call()[-1]()
    torch.cuda.synchronize()
    dist.barrier()
    marks = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(iters)]
    torch.cuda._sleep(int(2e8))
    for a, b, c in marks:
        a.record()
        hook = call()[-1]
        b.record()
        hook()
        c.record()
    torch.cuda.synchronize()
    send = sorted(a.elapsed_time(b) * 1e3 for a, b, _ in marks)
    recv = sorted(b.elapsed_time(c) * 1e3 for _, b, c in marks)
    return send[iters // 2], recv[iters // 2]


def _check_round_trip(cuda: Buffer, x, idx, w, M: int, E: int) -> None:
    """Dispatch, then combine the received rows unchanged: every token must come back as
    ``x * sum_k w[t, k]`` (BF16 and FP8 dispatch, plain combine and sums per rank); a kernel that
    moves the wrong rows is not timed."""
    want = x.float() * w.sum(dim=1, keepdim=True)
    for fp8 in (False, True):
        recv, _, handle, _, _ = cuda.low_latency_dispatch(x, idx, M, E, use_fp8=fp8, topk_weights=w)
        y = dequantize_fp8(*recv) if fp8 else recv
        for per_rank in (False, True):
            out = cuda.low_latency_combine(y, idx, w, handle, sum_per_rank=per_rank)[0]
            error = float((out.float() - want).norm() / want.norm())
            if error > (0.08 if fp8 else 1e-2):  # e4m3 keeps 3 mantissa bits
                what = f"dispatch ({'FP8' if fp8 else 'BF16'}) + combine{' with sums per rank' if per_rank else ''}"
                raise RuntimeError(f"T={x.shape[0]}: {what} is off by {error:.2e} (rel. L2)")


def _measure(cuda: Buffer, ref: Buffer, T: int, args, rank: int) -> list[str]:
    H, K, E, M = args.hidden, args.topk, args.experts, T
    gen = torch.Generator(device="cuda").manual_seed(rank + 17 * T)
    x = torch.randn((T, H), device="cuda", generator=gen).to(torch.bfloat16)
    idx = torch.rand((T, E), device="cuda", generator=gen).topk(K, dim=1).indices
    w = torch.rand((T, K), device="cuda", generator=gen)
    _check_round_trip(cuda, x, idx, w, M, E)
    _, count, handle, _, _ = cuda.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    rows = count.sum().reshape(1).long()
    dist.broadcast(rows, 0)
    nbytes = int(rows) * H * 2
    y = torch.randn((E // cuda.group_size, cuda.group_size * M, H), device="cuda").to(torch.bfloat16)
    lines = []
    for fp8, name in ((False, "BF16"), (True, "FP8")):
        scale = (1 + 4 / 128) / 2 if fp8 else 1.0
        graph = _graph_of(lambda fp8=fp8: cuda.low_latency_dispatch(x, idx, M, E, use_fp8=fp8))
        t = median_us(graph.replay, args.iters)
        lines.append(bandwidth_row(f"T={T} cuda dispatch {name} (graph)", t, nbytes * scale))
        hooked = lambda fp8=fp8: cuda.low_latency_dispatch(x, idx, M, E, use_fp8=fp8, return_recv_hook=True)  # noqa: E731
        send, recv = _hook_us(cuda, hooked, args.iters)
        lines.append(bandwidth_row(f"T={T} cuda dispatch {name} hook: send", send, nbytes * scale))
        lines.append(bandwidth_row(f"T={T} cuda dispatch {name} hook: receive", recv, nbytes * scale))
        t = median_us(lambda fp8=fp8: ref.low_latency_dispatch(x, idx, M, E, use_fp8=fp8), args.iters)
        lines.append(bandwidth_row(f"T={T} torch dispatch {name} (eager)", t, nbytes * scale))
    graph = _graph_of(lambda: cuda.low_latency_combine(y, idx, w, handle))
    lines.append(bandwidth_row(f"T={T} cuda combine (graph)", median_us(graph.replay, args.iters), nbytes))
    send, recv = _hook_us(cuda, lambda: cuda.low_latency_combine(y, idx, w, handle, return_recv_hook=True), args.iters)
    lines.append(bandwidth_row(f"T={T} cuda combine hook: send", send, nbytes))
    lines.append(bandwidth_row(f"T={T} cuda combine hook: receive", recv, nbytes))
    # Sums per rank: one row per (token, rank) crosses the links instead of one per (token, expert).
    _, _, w_handle, _, _ = cuda.low_latency_dispatch(x, idx, M, E, use_fp8=False, topk_weights=w)
    graph = _graph_of(lambda: cuda.low_latency_combine(y, idx, w, w_handle, sum_per_rank=True))
    t = median_us(graph.replay, args.iters)
    lines.append(bandwidth_row(f"T={T} cuda combine, sums per rank (graph)", t, nbytes))
    summed = lambda: cuda.low_latency_combine(y, idx, w, w_handle, return_recv_hook=True, sum_per_rank=True)  # noqa: E731
    send, recv = _hook_us(cuda, summed, args.iters)
    lines.append(bandwidth_row(f"T={T} cuda combine, sums per rank, hook: send", send, nbytes))
    lines.append(bandwidth_row(f"T={T} cuda combine, sums per rank, hook: receive", recv, nbytes))
    _, _, ref_handle, _, _ = ref.low_latency_dispatch(x, idx, M, E, use_fp8=False, topk_weights=w)
    t = median_us(lambda: ref.low_latency_combine(y, idx, w, ref_handle), args.iters)
    lines.append(bandwidth_row(f"T={T} torch combine (eager)", t, nbytes))
    t = median_us(lambda: ref.low_latency_combine(y, idx, w, ref_handle, sum_per_rank=True), args.iters)
    lines.append(bandwidth_row(f"T={T} torch combine, sums per rank (eager)", t, nbytes))
    lines.append(f"T={T}: rank 0 receives {int(rows)} rows")
    return lines


_TRACE_PHASES = ["begin (counter, acks)", "send", "signal arrivals", "arrivals seen", "receive",
                 "acknowledge", "end"]  # fmt: skip


def _trace(cuda: Buffer, T: int, args, rank: int) -> list[list[float]]:
    """Median ns from one phase boundary to the next (block 0, fused calls; csrc/low_latency_runtime.hpp)."""
    from ep_train import _ext

    gen = torch.Generator(device="cuda").manual_seed(2000 + rank)
    x = torch.randn((T, args.hidden), device="cuda", generator=gen).to(torch.bfloat16)
    idx = torch.rand((T, args.experts), device="cuda", generator=gen).topk(args.topk, dim=1).indices
    w = torch.rand((T, args.topk), device="cuda", generator=gen)
    trace = torch.zeros((2, _ext.load().LOW_LATENCY_TRACE_POINTS), dtype=torch.int64, device="cuda")
    cuda._backend.set_low_latency_trace(trace)
    samples: list[list[list[int]]] = [[], [], []]  # dispatch FP8, combine, combine with sums per rank
    for i in range(args.iters + 5):
        recv, _, handle, _, _ = cuda.low_latency_dispatch(x, idx, T, args.experts, use_fp8=True, topk_weights=w)
        y = recv[0].to(torch.bfloat16) if isinstance(recv, tuple) else recv
        cuda.low_latency_combine(y, idx, w, handle)
        torch.cuda.synchronize()
        points = trace.tolist()
        cuda.low_latency_combine(y, idx, w, handle, sum_per_rank=True)  # writes the combine's row again
        torch.cuda.synchronize()
        if i >= 5:
            samples[0].append(points[0])
            samples[1].append(points[1])
            samples[2].append(trace[1].tolist())
    cuda._backend.set_low_latency_trace(None)
    rows = []
    for op in range(3):
        points = torch.tensor(samples[op], dtype=torch.float64)
        rows.append((points[:, 1:] - points[:, :-1]).median(dim=0).values.div(1e3).tolist())
    return rows


def _worker(rank: int, world: int, args) -> None:
    rdma = Buffer.get_low_latency_rdma_size_hint(
        max(args.tokens), args.hidden, world, args.experts, rma_staging=_env.low_latency_rma()
    )
    cuda = Buffer(None, 0, rdma, low_latency_mode=True, backend="cuda", timeout_s=60.0)
    ref = Buffer(None, 0, rdma, low_latency_mode=True, backend="torch")
    lines = []
    for T in args.tokens:
        lines += _measure(cuda, ref, T, args, rank)
    if args.trace:
        for T in args.tokens:
            per_rank = [None] * world
            dist.all_gather_object(per_rank, _trace(cuda, T, args, rank))
            for op, name in enumerate(("dispatch FP8", "combine", "combine, sums per rank")):
                lines.append(f"T={T} {name} phases (us, median, block 0; per rank):")
                for i, phase in enumerate(_TRACE_PHASES):
                    lines.append(f"    {phase:<26}" + "".join(f"{r[op][i]:8.2f}" for r in per_rank))
    if rank == 0:
        head = f"{world} x {torch.cuda.get_device_name()}, {datetime.date.today()}, H={args.hidden} top-{args.topk} "
        print(f"\n{head}E={args.experts}, num_rdma_bytes={rdma / 2**20:.0f} MiB, "
              f"low-latency buffer: {cuda.low_latency_transport}"
              f"{', every rank by NVSHMEM puts' if cuda.low_latency_rma else ''}")  # fmt: skip
        print("\n".join(lines), flush=True)
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()


def main() -> None:
    p = standard_parser(__doc__, tokens=[128, 1, 32, 256], iters=50)
    p.add_argument("--trace", action="store_true", help="also print each phase's time inside the kernels")
    run_on_gpus(_worker, p.parse_args())


if __name__ == "__main__":
    main()
