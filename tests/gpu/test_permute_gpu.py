"""The CUDA pair-sum kernel (``ep_train._C.sum_pairs``) and the whole expert-major permutation on
one GPU, against the op-by-op path (bitwise: same values added in the same order) and the CPU."""

from __future__ import annotations

import pytest
import torch

from ep_train.permute import _sum_pairs, _sum_pairs_ops, pair_layout, permute_to_experts, unpermute_from_experts

pytestmark = pytest.mark.gpu


def _routing(kind: str, n: int, k: int, num_local: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        scores = torch.rand(n, num_local + k, generator=gen)
        idx = scores.topk(k, dim=1).indices
        return torch.where(idx < num_local, idx, torch.full_like(idx, -1))
    if kind == "one_expert":
        idx = torch.full((n, k), -1)
        idx[:, k - 1] = 0
        return idx
    return torch.full((n, k), -1)  # "none"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [7168, 2048, 200, 13])
@pytest.mark.parametrize("kind", ["random", "one_expert", "none"])
@pytest.mark.parametrize("k", [1, 8, 9])
def test_sum_pairs_kernel_is_bitwise_the_op_path(kernels, dtype, hidden, kind, k):
    gen = torch.Generator().manual_seed(hidden * 10 + k)
    idx = _routing(kind, 301, k, 16, gen).cuda()
    layout = pair_layout(idx, 16, 4)
    y = torch.randn(layout.num_pair_rows, hidden, generator=gen).to(dtype).cuda()
    if hidden * y.element_size() % 16 == 0:
        got = kernels.sum_pairs(y, layout.pos_NK)
    else:  # rows the kernel does not take: refused by name, summed by the op-by-op path
        with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
            kernels.sum_pairs(y, layout.pos_NK)
        got = _sum_pairs(y, layout)
    ref = _sum_pairs_ops(y, layout.pos_NK, torch.float32)
    assert got.dtype == dtype and torch.equal(got, ref)


def test_permutation_on_gpu_equals_cpu(kernels):
    gen = torch.Generator().manual_seed(3)
    n, k, num_local, hidden = 4099, 8, 64, 7168
    idx = _routing("random", n, k, num_local, gen)
    x = torch.randn(n, hidden, generator=gen).bfloat16()
    w = torch.rand(n, k, generator=gen) * (idx >= 0)
    counts = torch.bincount(idx[idx >= 0], minlength=num_local).tolist()
    cpu = permute_to_experts(x, idx, w, num_local, 8)
    gpu = permute_to_experts(x.cuda(), idx.cuda(), w.cuda(), num_local, 8, counts)
    assert torch.equal(cpu[1], gpu[1])
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[2], gpu[2].cpu())
    y = torch.randn(cpu[0].shape, generator=gen).bfloat16()
    assert torch.equal(unpermute_from_experts(y, cpu[3]), unpermute_from_experts(y.cuda(), gpu[3]).cpu())


def test_permutation_makes_no_host_sync(kernels):
    gen = torch.Generator().manual_seed(5)
    idx = _routing("random", 512, 8, 32, gen).cuda()
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(512, 8, device="cuda", requires_grad=True)
    counts = torch.bincount(idx[idx >= 0], minlength=32).tolist()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x_PH, _, probs_P, layout = permute_to_experts(x, idx, w, 32, 16, counts)
        out = unpermute_from_experts(x_PH * probs_P.unsqueeze(1).to(x_PH.dtype), layout)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None and w.grad is not None
