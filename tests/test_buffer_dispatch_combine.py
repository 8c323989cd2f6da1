"""Normal dispatch/combine/layout of the torch backend against the independent loop reference,
on 2 and 4 gloo ranks, for random and skewed routings, BF16/FP32/FP8 rows and odd hidden sizes."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.distributed as dist

from ep_train import Buffer
from ep_train.fp8 import quantize_fp8
from ep_train.testing import ROUTING_KINDS, assert_bitwise_equal, assert_close, make_routing, run_distributed
from ep_train.testing.payloads import random_rows, structured_rows
from ep_train.testing.reference import expected_dispatch

T, E = 24, 16


def _buffer(R: int, hidden: int, elem: int) -> Buffer:
    hint = Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(hidden * max(elem, 2), R)
    return Buffer(dist.group.WORLD, num_nvl_bytes=hint, timeout_s=60)


def _inputs(R, kind, K, hidden, dtype, seed):
    routes = [make_routing(kind, T, E, K, R, seed, r) for r in range(R)]
    xs = [structured_rows(r, T, hidden, dtype, seed) for r in range(R)]
    return xs, [i for i, _ in routes], [w for _, w in routes]


def _check_layout(buf, rank, R, idx):
    per_rank, rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    L = E // R
    want_in = torch.tensor([[any(e >= 0 and e // L == r for e in row) for r in range(R)] for row in idx.tolist()])
    assert rdma is None
    assert torch.equal(in_rank, want_in.reshape(T, R))
    assert per_rank.dtype == torch.int32 and per_rank.tolist() == want_in.sum(0).tolist()
    want_e = [sum(row.count(e) for row in idx.tolist()) for e in range(E)]
    assert per_expert.dtype == torch.int32 and per_expert.tolist() == want_e
    return per_rank, per_expert, in_rank


def _case(rank, R, kind, K, hidden, dtype, fp8, alignment, worst, seed):
    tag = f"[seed {seed} kind {kind} K {K} H {hidden} {dtype} fp8 {fp8} align {alignment} worst {worst}]"
    xs, idxs, ws = _inputs(R, kind, K, hidden, dtype, seed)
    buf = _buffer(R, hidden, xs[0].element_size())
    per_rank, per_expert, in_rank = _check_layout(buf, rank, R, idxs[rank])
    x_in = quantize_fp8(xs[rank]) if fp8 else xs[rank]
    num_worst = T * R if worst else 0
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idxs[rank], topk_weights=ws[rank], expert_alignment=alignment, num_worst_tokens=num_worst,
    )  # fmt: skip
    ref_rows = [quantize_fp8(x) for x in xs] if fp8 else None
    ref = expected_dispatch(rank, [q for q, _ in ref_rows] if fp8 else xs, idxs, ws, E, alignment)
    n = ref["x"].shape[0]
    rows = recv_x[0] if fp8 else recv_x
    assert rows.shape[0] == (num_worst or n), tag
    assert handle.num_recv_tokens == n, tag
    assert_bitwise_equal(rows[:n], ref["x"], f"recv_x {tag}")
    if fp8:
        ref_s = expected_dispatch(rank, [s for _, s in ref_rows], idxs, ws, E)["x"]
        assert_bitwise_equal(recv_x[1][:n], ref_s, f"recv_x scales {tag}")
    assert_bitwise_equal(recv_idx[:n], ref["topk_idx"], f"recv_topk_idx {tag}")
    assert_bitwise_equal(recv_w[:n], ref["topk_weights"], f"recv_topk_weights {tag}")
    assert_bitwise_equal(handle.recv_src_idx_N, ref["src_idx"], f"recv_src_idx {tag}")
    assert counts == ref["per_expert"], f"{tag} counts {counts} != {ref['per_expert']}"
    if worst:
        assert (recv_idx[n:] == -1).all() and (recv_w[n:] == 0).all(), tag

    again, *_ = buf.dispatch(x_in, handle=handle, num_worst_tokens=num_worst)
    assert_bitwise_equal(again[0] if fp8 else again, recv_x[0] if fp8 else recv_x, f"cached dispatch {tag}")
    if fp8:
        return
    # Experts: rank d scales its rows by (d + 1); combine must return, per token, the sum over the
    # ranks it went to, plus the bias, and restore the gate weights.
    y = (recv_x.double() * (rank + 1)).to(dtype)
    bias = random_rows(rank, T, hidden, dtype, seed, salt=5)
    combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=bias)
    L = E // R
    want = torch.zeros(T, hidden, dtype=torch.float64)
    for t, row in enumerate(idxs[rank].tolist()):
        for d in sorted({e // L for e in row if e >= 0}):
            want[t] += (xs[rank][t].double() * (d + 1)).to(dtype).double()
    assert_close(combined, want + bias.double(), f"combine {tag}", num_terms=R + 1)
    assert_bitwise_equal(combined_w, ws[rank], f"combined_topk_weights {tag}")


def _dispatch_combine_body(rank, world_size, seed):
    rng = random.Random(seed)
    cases = list(itertools.product(ROUTING_KINDS, (1, 2, 9)))
    for i, (kind, K) in enumerate(cases):
        hidden = rng.choice((64, 200, 256))  # 200: not a multiple of 128
        dtype = rng.choice((torch.bfloat16, torch.float32))
        _case(rank, world_size, kind, K, hidden, dtype, False, rng.choice((1, 4)), i % 3 == 0, seed + i)
    for i, kind in enumerate(("uniform", "masked", "one_expert")):
        _case(rank, world_size, kind, 8, 256, torch.bfloat16, True, 1, i == 1, seed + 100 + i)
    # Dispatch without top-k: rows only.
    xs, idxs, _ = _inputs(world_size, "uniform", 2, 128, torch.bfloat16, seed)
    buf = _buffer(world_size, 128, 2)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idxs[rank], E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(xs[rank], num_tokens_per_rank=per_rank,
                                                               is_token_in_rank=in_rank)  # fmt: skip
    ref = expected_dispatch(rank, xs, idxs, None, E)
    assert recv_idx is None and recv_w is None
    assert_bitwise_equal(recv_x, ref["x"], "recv_x without topk")


@pytest.mark.parametrize("world_size", [2, 4])
def test_dispatch_combine_matches_reference(world_size):
    seed = random.randrange(1 << 30)
    run_distributed(_dispatch_combine_body, world_size, seed, timeout_s=600)
