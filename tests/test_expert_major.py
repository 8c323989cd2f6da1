"""Expert-major dispatch (``Buffer.dispatch(..., expert_major=True)``) and its autograd pair against
a plain dispatch followed by the permutation, on fresh random and skewed routings: rows, weights
and counts bitwise, forward outputs and gradients bitwise (the same sums in the same order).

Each check runs twice: on the torch backend, where Buffer composes the permutation itself, and on
a backend that answers the fusion hooks as the CUDA kernels do (expert-major rows and pair sums
inside dispatch and combine, handles that carry only ``pair_pos``), so that Buffer's and the
autograd pair's fused branches run here too."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
import torch.distributed as dist

import ep_train.autograd as A
from ep_train import Buffer
from ep_train.buffer import _tensors_in
from ep_train.moe import grouped_mlp
from ep_train.permute import permute_to_experts, unpermute_from_experts
from ep_train.testing import ROUTING_KINDS, check_attached_offsets, make_routing, run_distributed
from ep_train.testing.fusing import FusingTorchBackend, fusing_torch_backend
from ep_train.testing.routing import rank_generator

E = 8


def _buffer(R: int, hidden: int, fusing: bool = False) -> Buffer:
    nvl = Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(hidden * 8, R)
    with fusing_torch_backend() if fusing else contextlib.nullcontext():
        buf = Buffer(dist.group.WORLD, num_nvl_bytes=nvl, timeout_s=60, backend="torch")
    assert isinstance(buf._backend, FusingTorchBackend) == fusing
    return buf


def _inputs(R, rank, seed, kind, K, T, H, dtype):
    idx, w = make_routing(kind, T, E, K, R, seed, rank)
    x = torch.randn(T, H, generator=rank_generator(seed, rank, 5)).to(dtype)
    return x, idx, w


def _buffer_body(rank, R, seed, kind, K, alignment, fusing=False):
    T, H, L = 7 + rank, 6, E // R
    buf = _buffer(R, H, fusing)
    x, idx, w = _inputs(R, rank, seed, kind, K, T, H, torch.float32)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    ref_x, ref_idx, ref_w, ref_counts, ref_handle, _ = buf.dispatch(
        x, None, per_rank, None, in_rank, per_expert, idx, w, expert_alignment=alignment
    )
    ref_P, ref_tpe, ref_probs, layout = permute_to_experts(ref_x, ref_idx, ref_w, L, alignment, ref_counts)
    x_P, recv_idx, probs_P, counts, handle, _ = buf.dispatch(
        x, None, per_rank, None, in_rank, per_expert, idx, w, expert_alignment=alignment, expert_major=True
    )
    assert torch.equal(x_P, ref_P) and torch.equal(probs_P, ref_probs) and torch.equal(recv_idx, ref_idx)
    assert list(counts) == ref_tpe.tolist() and sum(counts) == handle.num_pair_rows == x_P.shape[0]
    assert torch.equal(handle.pair_pos_NK, layout.pos_NK)
    in_result = {id(t) for t in _tensors_in(handle)}  # what Buffer records on the compute stream
    assert {id(handle.pair_pos_NK), id(handle.recv_src_idx_N), id(handle.send_pos_TR)} <= in_result
    # Cached: other rows, the same places.
    x2 = torch.randn(T, H, generator=rank_generator(seed, rank, 6))
    plain2, *_ = buf.dispatch(x2, ref_handle)
    ref2, *_ = permute_to_experts(plain2, ref_idx, ref_w, L, alignment, ref_counts)
    got2, *_ = buf.dispatch(x2, handle, expert_major=True)
    assert torch.equal(got2, ref2)
    # Combine of expert-major rows = the pair sums, then combine.
    y_P = torch.randn(x_P.shape, generator=rank_generator(seed, rank, 8))
    bias = torch.randn(T, H, generator=rank_generator(seed, rank, 9))
    got_c, got_w, _ = buf.combine(y_P, handle, topk_weights=ref_w, bias=bias, expert_major=True)
    want_c, want_w, _ = buf.combine(unpermute_from_experts(y_P, layout), ref_handle, topk_weights=ref_w, bias=bias)
    assert torch.equal(got_c, want_c) and torch.equal(got_w, want_w)
    # Bad calls name what is wrong.
    with pytest.raises(ValueError, match="expert-major dispatch"):
        buf.dispatch(x2, ref_handle, expert_major=True)
    with pytest.raises(ValueError, match="num_worst_tokens"):
        buf.dispatch(x, None, per_rank, None, in_rank, per_expert, idx, w, num_worst_tokens=64, expert_major=True)
    with pytest.raises(ValueError, match="expert-major dispatch"):
        buf.combine(y_P, ref_handle, expert_major=True)
    with pytest.raises(ValueError, match="x"):
        buf.combine(torch.zeros(handle.num_pair_rows + 1, H), handle, expert_major=True)
    with pytest.raises(ValueError, match="needs topk_idx"):
        buf.dispatch(x, None, per_rank, None, in_rank, None, expert_major=True)


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "one_expert", "empty_rank", "masked"])
@pytest.mark.parametrize("alignment", [1, 4])
def test_expert_major_dispatch_is_dispatch_then_permute(world_size, kind, alignment):
    assert kind in ROUTING_KINDS
    run_distributed(_buffer_body, world_size, random.randrange(1 << 30), kind, 3, alignment)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["uniform", "empty_rank", "masked"])
def test_expert_major_dispatch_on_a_fusing_backend(world_size, kind):
    run_distributed(_buffer_body, world_size, random.randrange(1 << 30), kind, 3, 4, True)


def _autograd_body(rank, R, seed, kind, K, alignment, fusing=False):
    T, H, F, L = 6 + 2 * rank, 5, 3, E // R
    buf = _buffer(R, max(H, K), fusing)
    x, idx, w = _inputs(R, rank, seed, kind, K, T, H, torch.float64)
    w = w.double()
    g = rank_generator(seed, 999)
    w1, w2 = (
        torch.randn(L, H, 2 * F, generator=g, dtype=torch.float64),
        torch.randn(L, F, H, generator=g, dtype=torch.float64),
    )
    gout = torch.randn(T, H, generator=rank_generator(seed, rank, 7), dtype=torch.float64)

    def unfused(x, w):
        out = A.dispatch(buf, x, idx, w, E, expert_alignment=alignment)
        x_P, tpe, probs, layout = permute_to_experts(out.recv_x, out.recv_topk_idx, out.recv_topk_weights, L,
                                                     alignment, out.tokens_per_expert_list)  # fmt: skip
        y_P = grouped_mlp(x_P, tpe, w1, w2) * probs.unsqueeze(-1)
        return A.combine(buf, unpermute_from_experts(y_P, layout), out.handle)

    def fused(x, w):
        out = A.dispatch_to_experts(buf, x, idx, w, E, expert_alignment=alignment)
        check_attached_offsets(out.tokens_per_expert, out.x.device)
        y_P = grouped_mlp(out.x, out.tokens_per_expert, w1, w2) * out.probs.unsqueeze(-1)
        return A.combine_from_experts(buf, y_P, out.handle)

    def fused_checkpointed(x, w):  # the recomputation replays the routing (cached expert-major dispatch)
        return A.checkpoint(fused, x, w)

    results = []
    for fn in (unfused, fused, fused_checkpointed):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi)
        y.backward(gout)
        results.append((y.detach(), xi.grad, wi.grad))
    for other, path in ((results[1], "fused"), (results[2], "checkpointed fused")):
        for name, a, b in zip(("output", "x.grad", "topk_weights.grad"), results[0], other, strict=True):
            assert torch.equal(a, b), f"{name} differs between the unfused and the {path} path"


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "dropped_rows", "one_rank"])
def test_expert_major_autograd_matches_dispatch_permute_combine(world_size, kind):
    run_distributed(_autograd_body, world_size, random.randrange(1 << 30), kind, 2, 2)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["uniform", "empty_rank"])
def test_expert_major_autograd_on_a_fusing_backend(world_size, kind):
    run_distributed(_autograd_body, world_size, random.randrange(1 << 30), kind, 2, 2, True)
