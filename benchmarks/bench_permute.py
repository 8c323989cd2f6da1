"""Expert-major permutation on one GPU: ep_train's ``permute_to_experts``/``unpermute_from_experts``
(CUDA pair-layout and pair-sum kernels, and the op-by-op path) beside Megatron-Core's
``permute``/``unpermute`` (the unfused path its alltoall dispatcher runs without
TransformerEngine), same routing, same rows.

Standard case: the rows one EP2 rank receives in the DESIGN.md §4 case — about 8192 rows, hidden
7168, top-8 of 256 experts (128 local), BF16.  Times forward+backward (permute, scale by probs,
unpermute) and reports median CUDA-event ms over ``--iters`` (each checked once against the
kernels' output and input gradient first); then ``pair_layout`` alone, kernel
against torch ops: GPU ms and the host's time to issue it.  Never asserts on time.

    python benchmarks/bench_permute.py [--rows 8192] [--hidden 7168] [--topk 8] [--experts 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ep_train import permute as ep_permute


def _time(fn, iters: int, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256, help="global experts; half are local (EP2)")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    n, k, num_local = args.rows, args.topk, args.experts // 2
    # Global top-k over E experts; the local half keeps its ids, the rest become -1.
    idx = torch.rand(n, args.experts, device="cuda").topk(k, dim=1).indices.sort(dim=1).values
    idx = torch.where(idx < num_local, idx, torch.full_like(idx, -1))
    x = torch.randn(n, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(n, k, device="cuda") * (idx >= 0)).requires_grad_(True)
    counts = torch.bincount(idx[idx >= 0], minlength=num_local).tolist()
    grad = torch.randn(n, args.hidden, device="cuda", dtype=torch.bfloat16)

    def ours(kernels: bool = True) -> torch.Tensor:
        x_PH, _, probs_P, layout = ep_permute.permute_to_experts(x, idx, w, num_local, 1, counts,
                                                                 sum_kernel=kernels, layout_kernel=kernels)  # fmt: skip
        y = (x_PH * probs_P.unsqueeze(1)).to(x_PH.dtype)
        out = ep_permute.unpermute_from_experts(y, layout)
        out.backward(grad)
        return out

    def result(fn) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: the output and the input gradient (a fast wrong implementation is not timed)."""
        x.grad = None
        out = fn().detach().float()
        got = out, x.grad.float()
        x.grad = None
        return got

    want = result(ours)
    if not all(torch.equal(a, b) for a, b in zip(result(lambda: ours(False)), want, strict=True)):
        raise RuntimeError("the op-by-op path's output or input gradient differs from the kernels'")
    rows = []
    rows.append(("ep_train (pair layout and pair sum kernels)", _time(ours, args.iters)))
    rows.append(("ep_train (op-by-op path)", _time(lambda: ours(False), args.iters)))
    try:
        from megatron.core.transformer.moe.moe_utils import permute, unpermute
    except ImportError:
        permute = None
    if permute is not None:
        routing_map = torch.zeros(n, num_local, dtype=torch.bool, device="cuda")
        routing_map.scatter_(1, idx.clamp_min(0), idx >= 0)
        probs_full = torch.zeros(n, num_local, device="cuda").scatter(1, idx.clamp_min(0), w.detach() * (idx >= 0))
        probs_full.requires_grad_(True)
        num_out = int(routing_map.sum())

        def megatron() -> torch.Tensor:
            out = permute(x, routing_map, probs=probs_full, num_out_tokens=num_out)
            x_PH, probs_P, sorted_indices = out[0], out[1], out[2]
            y = (x_PH * probs_P.unsqueeze(1)).to(x_PH.dtype)
            out = unpermute(y, sorted_indices, x.shape, routing_map=routing_map)
            out.backward(grad)
            return out

        for a, b in zip(result(megatron), want, strict=True):  # BF16 sums in another order
            if (a - b).norm() > 1e-2 * b.norm():
                raise RuntimeError("megatron-core's permute/unpermute differs from ep_train's")

        rows.append(("megatron-core permute/unpermute", _time(megatron, args.iters)))
    print(f"permute+unpermute fwd+bwd | {torch.cuda.get_device_name(0)} | {n} rows, hidden {args.hidden}, "
          f"top-{k}, {num_local} local experts, {sum(counts)} pairs, BF16")  # fmt: skip
    for label, ms in rows:
        print(f"  {label:<44} {ms:8.3f} ms")

    def layout_only(kernel: bool) -> tuple[float, float]:
        """Median host µs to issue one ``pair_layout`` (what a host-bound forward waits for), and its GPU ms."""
        host = []
        for _ in range(args.iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ep_permute.pair_layout(idx, num_local, 1, counts, layout_kernel=kernel)
            host.append((time.perf_counter() - t0) * 1e6)
        gpu = _time(lambda: ep_permute.pair_layout(idx, num_local, 1, counts, layout_kernel=kernel), args.iters)
        return statistics.median(host), gpu

    for kernel, label in ((True, "pair_layout, kernel"), (False, "pair_layout, torch ops")):
        host_us, gpu_ms = layout_only(kernel)
        print(f"  {label:<44} {gpu_ms:8.3f} ms GPU, host {host_us:7.1f} us to issue")


if __name__ == "__main__":
    main()
