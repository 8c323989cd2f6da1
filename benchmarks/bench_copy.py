"""What an SM moves: rows copied device-to-device on N SMs, with the 16-byte warp copies of the
ring kernels and with bulk copies (one thread per SM, rows through 8 shared-memory stages).

Rows of the standard case (hidden 7168 BF16 = 14 KB); 8192 rows (117 MB, well above L2) per copy,
two buffers alternated.  Bandwidth counts each row once (bytes copied / time).  One GPU.

    python benchmarks/bench_copy.py [--rows 8192] [--hidden 7168] [--sms 6 12 24 64 132]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--sms", type=int, nargs="*", default=[6, 12, 24, 64, 132])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    from ep_train import _ext

    C = _ext.load()
    srcs = [torch.randn(args.rows, args.hidden, device="cuda").bfloat16() for _ in range(2)]
    dsts = [torch.empty_like(s) for s in srcs]
    nbytes = srcs[0].numel() * srcs[0].element_size()
    print(f"row copy | {torch.cuda.get_device_name(0)} | {args.rows} rows x {args.hidden * 2} B | GB/s (median)")
    print(f"  {'SMs':>4} {'16-byte warp copies':>20} {'bulk copies':>12}")
    for sms in args.sms:
        row = []
        for bulk in (False, True):
            times = []
            for d in dsts:  # a configuration that copies nothing must not pass on the last one's rows
                d.fill_(float("nan"))
            for i in range(args.iters + 3):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                C.copy_rows(dsts[i % 2], srcs[i % 2], sms, bulk)
                b.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(a.elapsed_time(b) * 1e-3)
            assert torch.equal(dsts[0], srcs[0]) and torch.equal(dsts[1], srcs[1])
            row.append(nbytes / statistics.median(times) / 1e9)
        print(f"  {sms:>4} {row[0]:>20.0f} {row[1]:>12.0f}")


if __name__ == "__main__":
    main()
