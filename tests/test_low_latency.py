"""Low-latency dispatch/combine on 2 and 4 gloo ranks against the loop reference and a dense MoE.

Cases drawn from a fresh seed (printed in each failure): every routing kind, top-k 1..9, token
counts from 0 to num_max_dispatch_tokens_per_rank (different per rank), BF16 and FP8 (with and
without round_scale), return_recv_hook on dispatch and combine, cumulative expert stats over two
calls, with and without topk_weights, combine into ``out``.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from ep_train import Buffer
from ep_train.fp8 import dequantize_fp8, quantize_fp8
from ep_train.testing import (
    ROUTING_KINDS,
    assert_bitwise_equal,
    assert_close,
    dense_moe,
    expected_low_latency,
    expected_low_latency_combine,
    expected_low_latency_combine_per_rank,
    make_all_routings,
    run_distributed,
    structured_rows,
    tokens_per_rank,
)

E, M = 16, 12  # experts; num_max_dispatch_tokens_per_rank


def _check_slots(rank, R, recv_x, recv_count, handle, want, c, tag):
    L = E // R
    assert recv_count.dtype == torch.int32 and recv_count.tolist() == want.count, f"{tag}: {recv_count} {want.count}"
    rows, scales = recv_x if c["fp8"] else (recv_x, None)
    assert rows.shape == (L, R * M, c["hidden"]), tag
    for l, n in enumerate(want.count):  # noqa: E741
        assert_bitwise_equal(rows[l, :n], want.x[l, :n], f"recv_x expert {l} {tag}")
        if scales is not None:
            assert_bitwise_equal(scales[l, :n], want.scales[l, :n], f"recv_x scales expert {l} {tag}")
        assert_bitwise_equal(handle.recv_src_info_LS[l, :n], want.src_idx[l, :n], f"recv_src_info expert {l} {tag}")
        assert_bitwise_equal(handle.recv_topk_pos_LS[l, :n], want.topk_pos[l, :n], f"recv_topk_pos expert {l} {tag}")
        if c["weights"]:
            assert_bitwise_equal(handle.recv_topk_weights_LS[l, :n], want.weights[l, :n], f"slot weights {l} {tag}")
        per_src = [int((want.src_rank[l, :n] == s).sum()) for s in range(R)]
        offsets = torch.tensor([0] + per_src[:-1]).cumsum(0).tolist()
        ranges = [(o << 32) | n_s for o, n_s in zip(offsets, per_src, strict=True)]
        assert handle.recv_layout_range_LR[l].tolist() == ranges, f"recv_layout_range expert {l} {tag}"


def _expert_out(rank, R, recv_rows, fp8):
    """Local expert l of rank d returns its rows times (global expert id + 1), in BF16."""
    dense = dequantize_fp8(*recv_rows, torch.bfloat16) if fp8 else recv_rows
    scale = (torch.arange(E // R) + rank * (E // R) + 1).double().view(-1, 1, 1)
    return (dense.double() * scale).to(torch.bfloat16)


def _case(rank, R, c):
    tag = f"[R {R} " + " ".join(f"{k} {v}" for k, v in c.items()) + "]"
    counts = tokens_per_rank(c["seed"], R, 0, M)
    if c["seed"] % 4 == 0:  # a rank without tokens in every fourth case, not only by chance
        counts[c["seed"] % R] = 0
    idxs, ws = make_all_routings(c["kind"], counts, E, c["K"], R, c["seed"])
    xs = [structured_rows(r, counts[r], c["hidden"], torch.bfloat16, c["seed"]) for r in range(R)]
    sent = [quantize_fp8(x, round_scale=c["round_scale"]) for x in xs] if c["fp8"] else xs
    rdma = Buffer.get_low_latency_rdma_size_hint(M, c["hidden"], R, E)
    buf = Buffer(dist.group.WORLD, num_rdma_bytes=rdma, low_latency_mode=True, timeout_s=60)
    stats = torch.full((E // R,), 5, dtype=torch.int32)
    kw = {"cumulative_local_expert_recv_stats": stats, "use_fp8": c["fp8"], "round_scale": c["round_scale"],
          "topk_weights": ws[rank] if c["weights"] else None}  # fmt: skip
    recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(xs[rank], idxs[rank], M, E,
                                                                   return_recv_hook=c["hook"], **kw)  # fmt: skip
    assert (hook is not None) == c["hook"], tag
    if c["hook"]:
        hook()  # compute could overlap here; the receive happens in the hook
    slots = [expected_low_latency(d, sent, idxs, ws, E, M) for d in range(R)]
    _check_slots(rank, R, recv_x, recv_count, handle, slots[rank], c, tag)
    if c["fp8"] and c["round_scale"]:
        s = torch.cat([recv_x[1][l, :n] for l, n in enumerate(slots[rank].count)]).flatten()  # noqa: E741
        assert torch.equal(torch.exp2(torch.log2(s).round()), s), f"scales are not powers of two {tag}"
    # A second call accumulates into the stats and receives the same slots.
    again = buf.low_latency_dispatch(xs[rank], idxs[rank], M, E, **kw)
    assert stats.tolist() == [5 + 2 * n for n in slots[rank].count], f"cumulative stats {stats} {tag}"
    _check_slots(rank, R, again[0], again[1], again[2], slots[rank], c, f"second call {tag}")

    ys = [_expert_out(d, R, (slots[d].x, slots[d].scales) if c["fp8"] else slots[d].x, c["fp8"]) for d in range(R)]
    y = _expert_out(rank, R, recv_x, c["fp8"])
    out = torch.full((counts[rank], c["hidden"]), float("nan"), dtype=torch.bfloat16) if c["out"] else None
    combined, _, chook = buf.low_latency_combine(y, idxs[rank], ws[rank], handle, return_recv_hook=c["hook"], out=out)
    if c["hook"]:
        chook()
    if out is not None:
        assert combined.data_ptr() == out.data_ptr(), f"combine must write into out {tag}"
    want, mag = expected_low_latency_combine(rank, slots, ys, ws[rank], counts[rank])
    assert_close(combined, want, f"low_latency_combine {tag}", torch.bfloat16, num_terms=c["K"] + 1, magnitude=mag)
    if c["weights"]:
        # Sums per rank: the dispatch's weights, one rounding per (token, rank); bit for bit against
        # the loop, and within that extra rounding of the exact sum.
        summed, _, shook = buf.low_latency_combine(y, idxs[rank], ws[rank], handle, return_recv_hook=c["hook"],
                                                   sum_per_rank=True)  # fmt: skip
        if c["hook"]:
            shook()
        want_sum = expected_low_latency_combine_per_rank(rank, slots, ys, ws[rank], counts[rank])
        assert_bitwise_equal(summed, want_sum, f"low_latency_combine sum_per_rank {tag}")
        assert_close(summed, want, f"sum_per_rank vs exact {tag}", torch.bfloat16, num_terms=c["K"] + 1,
                     magnitude=mag, rounded_partials=True)  # fmt: skip
        if min(counts) > 0:  # (empty weights of a rank without tokens are all alike)
            with pytest.raises(ValueError, match="must be the tensor given to low_latency_dispatch"):
                buf.low_latency_combine(y, idxs[rank], ws[rank].clone(), handle, sum_per_rank=True)
    else:
        with pytest.raises(ValueError, match="was given none"):
            buf.low_latency_combine(y, idxs[rank], ws[rank], handle, sum_per_rank=True)
    # The plain sum per rank (every row weighted 1: the backward of a dispatch), with or without
    # slot weights in the handle; the default combine still needs weights.
    plain, _, _ = buf.low_latency_combine(y, idxs[rank], None, handle, sum_per_rank=True)
    ones = torch.ones_like(ws[rank])
    want_plain = expected_low_latency_combine_per_rank(rank, slots, ys, ones, counts[rank])
    assert_bitwise_equal(plain, want_plain, f"low_latency_combine sum_per_rank, no weights {tag}")
    with pytest.raises(TypeError, match="topk_weights"):
        buf.low_latency_combine(y, idxs[rank], None, handle)
    x_in = dequantize_fp8(*sent[rank], torch.bfloat16) if c["fp8"] else xs[rank]
    dense, dmag = dense_moe(x_in, idxs[rank], ws[rank], lambda e, row: (row * (e + 1)).bfloat16().double())
    assert_close(combined, dense, f"low_latency vs dense MoE {tag}", torch.bfloat16, num_terms=c["K"] + 1,
                 magnitude=dmag)  # fmt: skip
    buf.destroy()


def _low_latency_body(rank, world_size, seed):
    rng = random.Random(seed)
    cases = [(kind, False) for kind in ROUTING_KINDS for _ in range(2)]
    cases += [("uniform", True), ("masked", True), ("one_rank", True), ("dropped_rows", True)]
    for i, (kind, fp8) in enumerate(cases):
        c = {
            "seed": seed + i, "kind": kind, "K": rng.randint(1, 9), "fp8": fp8, "round_scale": fp8 and i % 2 == 0,
            "hidden": rng.choice((256, 512, 7168)) if fp8 else rng.choice((8, 64, 200, 1000)),
            "hook": rng.random() < 0.5, "weights": rng.random() < 0.7, "out": rng.random() < 0.5,
        }  # fmt: skip
        _case(rank, world_size, c)


@pytest.mark.parametrize("world_size", [2, 4, 8])  # 8: the EP8 code paths, on gloo
def test_low_latency_matches_reference(world_size):
    run_distributed(_low_latency_body, world_size, random.randrange(1 << 30), timeout_s=400)


def _deepep_helpers_body(rank, world_size):
    H = 64
    rdma = Buffer.get_low_latency_rdma_size_hint(M, H, world_size, E)
    buf = Buffer(dist.group.WORLD, num_rdma_bytes=rdma, low_latency_mode=True, timeout_s=30)
    buf.clean_low_latency_buffer(M, H, E)
    try:
        buf.clean_low_latency_buffer(2 * M, 4 * H, E)
    except ValueError as exc:
        assert "num_rdma_bytes" in str(exc), str(exc)
    else:
        raise AssertionError("a shape larger than num_rdma_bytes allows was accepted")
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(M - rank, H, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=gen)[:3] for _ in range(M - rank)])
    w = torch.rand(idx.shape, generator=gen)
    recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    y = buf.get_next_low_latency_combine_buffer(handle)
    assert y.shape == recv.shape and y.dtype == torch.bfloat16
    y.copy_(recv * 2)
    plain, _, _ = buf.low_latency_combine(recv * 2, idx, w, handle)
    zero, _, _ = buf.low_latency_combine(y, idx, w, handle, zero_copy=True)
    assert torch.equal(plain, zero)
    # Sums per rank in inference mode (its tensors have no version counter), against the same call outside it.
    _, _, w_handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False, topk_weights=w)
    summed, _, _ = buf.low_latency_combine(y, idx, w, w_handle, sum_per_rank=True)
    with torch.inference_mode():
        w_inf = w.clone()
        _, _, inf_handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False, topk_weights=w_inf)
        inferred, _, _ = buf.low_latency_combine(y, idx, w_inf, inf_handle, sum_per_rank=True)
    assert torch.equal(summed, inferred)
    buf.destroy()


def test_deepep_low_latency_helpers():
    """clean_low_latency_buffer checks the shape; the combine buffer helper gives the slots' shape."""
    run_distributed(_deepep_helpers_body, 2, timeout_s=120)
