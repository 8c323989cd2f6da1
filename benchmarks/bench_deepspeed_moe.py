"""DeepSpeed training throughput: DeepSpeed's own MoE beside the same model through ep_train.

Runs the recipe runner (``python -m ep_train.deepspeed.run``) once per implementation on the same
machine and GPU count, then prints one table:

- ``deepspeed cf=1.0``: DeepSpeed's MOELayer with its capacity factor (drops tokens; the baseline);
- ``deepspeed dropless``: DeepSpeed's MOELayer with ``drop_tokens=False`` (capacity = max load);
- ``ep_train``: DeepSpeed's gate and per-expert modules, ep_train dispatch/combine, dropless;
- ``ep_train grouped``: the same with grouped-GEMM SwiGLU experts (``ep_train.deepspeed.MoE``).

Mean tokens/s over the steps after ``--warmup``.  Never asserts on time.

    python benchmarks/bench_deepspeed_moe.py                  # all GPUs of this node, BF16
    python benchmarks/bench_deepspeed_moe.py --device cpu     # 2 CPU ranks, tiny shape (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "deepspeed_moe.yaml")

RUNS = (
    ("deepspeed cf=1.0", "deepspeed", ["moe.drop_tokens=true", "moe.capacity_factor=1.0"]),
    ("deepspeed dropless", "deepspeed", ["moe.drop_tokens=false"]),
    ("ep_train", "ep_train", ["moe.drop_tokens=false"]),
    ("ep_train grouped", "ep_train_grouped", ["moe.drop_tokens=false"]),
)


def _shape(args) -> list[str]:
    if args.device == "cpu":
        return []  # the recipe's tiny shape
    return [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            f"model.num_attention_heads={args.hidden // 128}", f"model.moe_ffn_hidden_size={args.ffn}",
            f"model.num_experts={args.experts}", f"model.top_k={args.topk}", f"model.seq_length={args.seq}",
            f"model.vocab_size={args.vocab}", f"train.micro_batch_size={args.micro_batch}",
            f"train.lr={args.lr}", "train.dtype=bf16", "train.device=cuda"]  # fmt: skip


def _run(label: str, impl: str, sets: list[str], args, nproc: int, tmp: str) -> dict | None:
    jsonl = os.path.join(tmp, impl + "_" + label.replace(" ", "_").replace("=", "") + ".jsonl")
    overrides = [*_shape(args), *sets, f"launch.nproc={nproc}", f"moe.ep_size={nproc}", f"train.steps={args.steps}"]
    cmd = [sys.executable, "-m", "ep_train.deepspeed.run", "--recipe", RECIPE, "--impl", impl, "--jsonl", jsonl]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(jsonl):
        print(f"{label}: failed (exit {proc.returncode})\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return None
    rows = [json.loads(line) for line in open(jsonl)]
    steady = rows[args.warmup :] or rows
    seconds = sum(r["step_time_s"] for r in steady)
    return {
        # Tokens over time of the steady steps (not a mean of per-step rates).
        "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in steady) / seconds,
        "step_ms": 1e3 * sum(r["step_time_s"] for r in steady) / len(steady),
        "final_loss": rows[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--nproc", type=int, default=0, help="ranks (default: every GPU; 2 on CPU)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate of the GPU shape (stable losses)")
    parser.add_argument(
        "--runs",
        nargs="*",
        default=[label for label, _, _ in RUNS],
        choices=[r[0] for r in RUNS],
        help="which rows to run (default: all)",
    )
    args = parser.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --device cpu for a smoke run")
        nproc = args.nproc or torch.cuda.device_count()
        machine = f"{nproc} x {torch.cuda.get_device_name(0)}"
    else:
        nproc, machine = args.nproc or 2, f"{args.nproc or 2} CPU ranks (gloo)"
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_ds_moe_") as tmp:
        for label, impl, sets in RUNS:
            if label not in args.runs:
                continue
            results[label] = _run(label, impl, sets, args, nproc, tmp)
            r = results[label]
            if r is not None:  # one line per run as it finishes (each run starts its own ranks)
                print(f"{label}: {r['tokens_per_s']:.0f} tokens/s, {r['step_ms']:.1f} ms/step", flush=True)
    print(f"\nDeepSpeed MoE training, {machine}, EP {nproc}, mean over steps {args.warmup + 1}-{args.steps}")
    base = (results.get("deepspeed cf=1.0") or {}).get("tokens_per_s")
    print(f"{'implementation':<20} {'tokens/s':>12} {'ms/step':>10} {'vs cf=1.0':>10} {'final loss':>11}")
    for label, r in results.items():
        if r is None:
            print(f"{label:<20} {'failed':>12}")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{label:<20} {r['tokens_per_s']:>12.0f} {r['step_ms']:>10.1f} {ratio:>10} {r['final_loss']:>11.4f}")


if __name__ == "__main__":
    main()
