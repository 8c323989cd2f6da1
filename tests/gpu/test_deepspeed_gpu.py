"""DeepSpeed adapter on GPUs: parity with DeepSpeed's MOELayer over NCCL (CUDA kernels where built)
and the recipe runner with both MoE implementations, tokens/s printed side by side."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _num_gpus() -> int:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs >= 2 CUDA GPUs")
    ds = pytest.importorskip("deepspeed")
    if not hasattr(ds, "initialize"):  # tests/deepspeed can shadow a missing package as a namespace
        pytest.skip("DeepSpeed is not installed")
    return 4 if torch.cuda.device_count() >= 4 else 2


def test_deepspeed_parity_nccl():
    n = _num_gpus()
    sys.path.insert(0, os.path.join(ROOT, "tests", "deepspeed"))
    import _ds_harness as harness

    from ep_train import _ext
    from ep_train.testing.launcher import run_distributed

    shape = dict(hidden=256, batch=4, seq=64, ffn=128, device="cuda", dtype="bf16")
    cases = [dict(shape, ep=n, experts=2 * n, k=k) for k in (1, 2, 3)]
    cases.append(dict(shape, ep=n, experts=2 * n, k=2, drop=True))
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    results = run_distributed(harness.parity_cases, n, cases, env=dict(_SAFE_ENV, DS_ACCELERATOR="cuda"), seed=seed,
                              backend="nccl", timeout_s=600)  # fmt: skip
    expected = "cuda" if _ext.is_available() else "torch"
    for rank, rows in enumerate(results):
        for case, r in zip(cases, rows, strict=True):
            print(f"rank {rank} ep{n} k={case['k']} drop={case.get('drop', False)} backend={r['backend']}: {r}")
            assert r["backend"] == expected
            assert r["l_aux"] == 0.0 and r["counts"] == 0.0, r
            assert max(r["out"], r["x_grad"], r["param_grad"]) <= 3e-2, (case, r)


def test_deepspeed_recipe_tokens_per_s(tmp_path):
    """The recipe with DeepSpeed's own MoE and through ep_train, in one call; prints tokens/s."""
    n = _num_gpus()
    env = dict(os.environ, **_SAFE_ENV, DS_ACCELERATOR="cuda")
    summary = {}
    for impl in ("deepspeed", "ep_train", "ep_train_grouped"):
        jsonl = tmp_path / f"{impl}.jsonl"
        cmd = [sys.executable, "-m", "ep_train.deepspeed.run", "--recipe", "recipes/deepspeed_moe.yaml",
               "--impl", impl, "--jsonl", str(jsonl), "--set", "train.device=cuda", "--set", "train.dtype=bf16",
               "--set", f"launch.nproc={n}", "--set", f"moe.ep_size={n}", "--set", f"model.num_experts={2 * n}",
               "--set", "train.steps=8"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows)
        summary[impl] = sum(r["tokens_per_s"] for r in rows[2:]) / len(rows[2:])
    print(f"recipe deepspeed_moe on {n} x {torch.cuda.get_device_name(0)}, mean tokens/s (steps 3-8): "
          + ", ".join(f"{k} {v:.0f}" for k, v in summary.items()))  # fmt: skip
