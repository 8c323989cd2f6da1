"""The CUDA pair-layout and pair-sum kernels (``ep_train._C.pair_layout``, ``sum_pairs``) and the
whole expert-major permutation on one GPU, against the op-by-op path (the same integers; bitwise
sums: same values added in the same order) and the CPU."""

from __future__ import annotations

import pytest
import torch

from ep_train.permute import (
    _count_pairs,
    _place_pairs_ops,
    _sum_pairs_ops,
    pair_layout,
    permute_to_experts,
    sum_pair_rows,
    unpermute_from_experts,
)

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
    if kind == "first_experts":  # every row picks the same experts 0..k-1 (those that exist)
        idx = torch.arange(k).expand(n, k).clone()
        return torch.where(idx < num_local, idx, torch.full_like(idx, -1))
    return torch.full((n, k), -1)  # "none"


def _aligned_total(idx: torch.Tensor, num_local: int, alignment: int) -> int:
    counts = torch.bincount(idx[idx >= 0].cpu(), minlength=num_local)
    return int(((counts + alignment - 1) // alignment * alignment).sum())


@pytest.mark.parametrize("kind", ["random", "one_expert", "first_experts", "none"])
@pytest.mark.parametrize("num_local,alignment", [(1, 1), (16, 4), (64, 1), (128, 8), (384, 16)])
@pytest.mark.parametrize("n,k", [(0, 8), (1, 1), (1024, 1), (4099, 8), (301, 9)])
def test_pair_layout_kernel_is_the_op_path(kernels, kind, num_local, alignment, n, k):
    gen = torch.Generator().manual_seed(n * 31 + k * 7 + num_local)
    idx = _routing(kind, n, k, num_local, gen).cuda()
    total = _aligned_total(idx, num_local, alignment)
    pos, row_P, pair_P = kernels.pair_layout(idx, num_local, alignment, total)
    idx_Q = idx.reshape(-1)
    ref = _place_pairs_ops(idx_Q, n, k, _count_pairs(idx_Q, num_local), alignment, total)
    assert torch.equal(pos, ref[0]) and torch.equal(row_P, ref[1]) and torch.equal(pair_P, ref[2])
    # and through pair_layout, with the dispatch's counts (the path that runs the kernel)
    counts = torch.bincount(idx[idx >= 0].cpu(), minlength=num_local).tolist()
    layout = pair_layout(idx, num_local, alignment, counts)
    assert torch.equal(layout.pos_NK, pos) and torch.equal(layout.row_P, row_P) and torch.equal(layout.pair_P, pair_P)


@pytest.mark.parametrize("kind", ["random", "one_expert", "first_experts", "none"])
@pytest.mark.parametrize("num_experts", [1, 8, 256, 384])
@pytest.mark.parametrize("n,k", [(0, 8), (1, 1), (4096, 8), (301, 9)])
def test_expert_ranks_kernel_counts_earlier_tokens_of_the_expert(kernels, kind, num_experts, n, k):
    """What an expert-major dispatch sends along: (t, k)'s rank among the slots before it with that expert."""
    gen = torch.Generator().manual_seed(n * 13 + k * 5 + num_experts)
    idx = _routing(kind, n, k, num_experts, gen)
    rank = kernels.expert_ranks(idx.cuda(), num_experts).cpu()
    flat = idx.reshape(-1)
    seen = torch.zeros(num_experts, dtype=torch.int64)
    want = torch.full_like(flat, -1)
    for q, e in enumerate(flat.tolist()):  # the definition, one slot at a time
        if e >= 0:
            want[q] = seen[e]
            seen[e] += 1
    valid = flat >= 0
    assert torch.equal(rank.reshape(-1)[valid], want[valid])


def test_pair_layout_kernel_stays_in_bounds_when_counts_disagree(kernels):
    gen = torch.Generator().manual_seed(5)
    idx = _routing("random", 999, 8, 32, gen).cuda()
    total = _aligned_total(idx, 32, 1)
    short = total // 2  # counts from somewhere else that undercount: rows past them are never written
    pos, row_P, pair_P = kernels.pair_layout(idx, 32, 1, short)
    torch.cuda.synchronize()
    assert row_P.numel() == short and int(pos.max()) <= short and int(pos.min()) >= 0
    assert kernels.PAIR_LAYOUT_MAX_LOCAL_EXPERTS == 384  # what ep_train.permute routes to the kernel
    with pytest.raises(RuntimeError, match="num_local_experts must be in"):
        kernels.pair_layout(idx, 385, 1, total)
    with pytest.raises(RuntimeError, match="recv_topk_idx"):
        kernels.pair_layout(idx.int(), 32, 1, total)


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
        got = sum_pair_rows(y, layout.pos_NK)
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
