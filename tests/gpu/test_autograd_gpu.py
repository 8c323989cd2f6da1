"""Autograd pairs on GPUs.

- NCCL, torch backend, float64: the CPU suite's checks (gradients of x, gate weights and expert
  weights against a single-process dense MoE, checkpoint replay bitwise, gradcheck), on every GPU
  count the machine has, random and skewed routing.
- BF16 on the CUDA kernels: a dispatch → grouped-GEMM experts → combine layer and its gradients equal
  the same layer on the torch backend (NCCL) for the same inputs, within BF16 rounding.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CASES = [("uniform", 2), ("masked", 3), ("one_expert", 1), ("empty_rank", 2), ("dropped_rows", 8)]


@pytest.mark.parametrize("kind,K", CASES, ids=[c[0] for c in CASES])
def test_gradients_match_dense_reference_nccl(num_gpus, kind, K):
    from test_autograd import _grads_body

    from ep_train.testing import run_distributed

    run_distributed(_grads_body, num_gpus, random.randrange(1 << 30), kind, K, "torch", backend="nccl", timeout_s=300)


def test_low_latency_pair_gradcheck_nccl(num_gpus):
    from test_autograd import _low_latency_body

    from ep_train.testing import run_distributed

    seed = random.randrange(1 << 30)
    kind, K = random.Random(seed).choice(CASES)
    run_distributed(_low_latency_body, num_gpus, seed, kind, K, "torch", backend="nccl", timeout_s=300)


def _kernels_vs_torch_body(rank, world, seed, kind, K, backends=("cuda", "torch")):
    import torch.distributed as dist

    from ep_train import Buffer, MoEDispatcher
    from ep_train.buffer import group_device
    from ep_train.moe import grouped_mlp
    from ep_train.testing import make_routing
    from ep_train.testing.routing import rank_generator

    T, H, E, F = 384, 2048, 16, 256
    L = E // world
    dev = group_device()
    g = rank_generator(seed, 999)
    w1 = (torch.randn(E, H, 2 * F, generator=g) / H**0.5).bfloat16()[rank * L : (rank + 1) * L].to(dev)
    w2 = (torch.randn(E, F, H, generator=g) / F**0.5).bfloat16()[rank * L : (rank + 1) * L].to(dev)
    idx, weights = make_routing(kind, T, E, K, world, seed, rank)
    x = torch.randn(T, H, generator=rank_generator(seed, rank, 3)).bfloat16().to(dev)
    grad = torch.randn(T, H, generator=rank_generator(seed, rank, 4)).bfloat16().to(dev)
    idx, weights = idx.to(dev), weights.float().to(dev)

    results = []
    for backend in backends:
        hint = Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(H * 2, world)
        buf = Buffer(dist.group.WORLD, num_nvl_bytes=hint, backend=backend, timeout_s=60)
        disp = MoEDispatcher(buf, E, expert_alignment=8)
        lw1, lw2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        xb, wb = x.clone().requires_grad_(), weights.clone().requires_grad_()
        x_PD, tpe, probs_P, handle = disp.dispatch(xb, idx, wb)
        y_PD = grouped_mlp(x_PD, tpe, lw1, lw2) * probs_P.unsqueeze(-1).to(torch.bfloat16)
        out = disp.combine(y_PD, handle)
        out.backward(grad)
        results.append((out.detach(), xb.grad, wb.grad, lw1.grad, lw2.grad))
        buf.destroy()
    tag = f"[rank {rank} seed {seed} kind {kind} K {K}]"
    for name, a, b in zip(("output", "grad x", "grad topk_weights", "grad w1", "grad w2"), *results, strict=True):
        scale = b.float().abs().max().clamp_min(1e-6)
        err = (a.float() - b.float()).abs().max() / scale
        assert err <= 1e-2, f"{name} {tag}: max error {err:.3g} of the largest value"


@pytest.mark.parametrize("kind,K", [("uniform", 8), ("one_expert", 2), ("empty_rank", 4), ("dropped_rows", 9)])
def test_bf16_kernels_match_torch_backend(num_gpus, kind, K):
    from ep_train.testing import run_distributed

    run_distributed(_kernels_vs_torch_body, num_gpus, random.randrange(1 << 30), kind, K, backend="nccl",
                    timeout_s=300)  # fmt: skip


@pytest.mark.parametrize("kind,K", [("uniform", 8), ("empty_rank", 4)])
def test_bf16_kernels_match_torch_backend_two_processes_on_one_gpu(kernels, kind, K):
    """The same layer with two ranks as processes sharing GPU 0 (a machine with one GPU runs it too)."""
    from ep_train.testing import run_distributed

    from ._scenarios import SHARED_GPU

    run_distributed(_kernels_vs_torch_body, 2, random.randrange(1 << 30), kind, K, backend=SHARED_GPU,
                    timeout_s=300)  # fmt: skip
