"""Low-latency dispatch/combine of the torch backend against the loop reference (2 and 4 ranks)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from ep_train import Buffer
from ep_train.fp8 import quantize_fp8
from ep_train.testing import ROUTING_KINDS, assert_bitwise_equal, assert_close, make_routing, run_distributed
from ep_train.testing.payloads import structured_rows
from ep_train.testing.reference import expected_low_latency, expected_low_latency_combine

E, M = 8, 12


def _case(rank, R, kind, K, hidden, num_tokens, use_fp8, round_scale, hook_mode, seed):
    tag = f"[seed {seed} kind {kind} K {K} H {hidden} T {num_tokens} fp8 {use_fp8} hook {hook_mode}]"
    routes = [make_routing(kind, num_tokens, E, K, R, seed, r) for r in range(R)]
    idxs, ws = [i for i, _ in routes], [w for _, w in routes]
    xs = [structured_rows(r, num_tokens, hidden, torch.bfloat16, seed) for r in range(R)]
    need = Buffer.get_low_latency_rdma_size_hint(M, hidden, R, E)
    buf = Buffer(dist.group.WORLD, num_rdma_bytes=need, low_latency_mode=True, timeout_s=60)
    L = E // R
    stats = torch.zeros(L, dtype=torch.int32)
    recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(
        xs[rank], idxs[rank], M, E, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
        round_scale=round_scale, return_recv_hook=hook_mode, topk_weights=ws[rank],
    )  # fmt: skip
    assert (hook is not None) == hook_mode, tag
    if hook_mode:
        hook()
    ref = expected_low_latency(rank, xs, idxs, E, M)
    assert recv_count.tolist() == ref["count"] and stats.tolist() == ref["count"], tag
    if use_fp8:
        qs = [quantize_fp8(x, round_scale=round_scale) for x in xs]
        ref_q = expected_low_latency(rank, [q for q, _ in qs], idxs, E, M)["x"]
        ref_s = expected_low_latency(rank, [s for _, s in qs], idxs, E, M)["x"]
        for e in range(L):
            c = ref["count"][e]
            assert_bitwise_equal(recv_x[0][e, :c], ref_q[e, :c], f"fp8 rows expert {e} {tag}")
            assert_bitwise_equal(recv_x[1][e, :c], ref_s[e, :c], f"fp8 scales expert {e} {tag}")
            if round_scale:
                s = recv_x[1][e, :c]
                assert torch.equal(torch.exp2(torch.log2(s).round()), s), f"scales not powers of two {tag}"
        return
    for e in range(L):
        c = ref["count"][e]
        assert_bitwise_equal(recv_x[e, :c], ref["x"][e, :c], f"rows expert {e} {tag}")
        assert_bitwise_equal(handle.recv_src_info_LS[e, :c], ref["src"][e, :c], f"src info expert {e} {tag}")
    # Expert e multiplies by (e + 1); combine is weighted by topk_weights.
    scale = (torch.arange(L) + rank * L + 1).double().view(L, 1, 1)
    y = (recv_x.double() * scale).to(torch.bfloat16)
    out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
    combined, _, chook = buf.low_latency_combine(y, idxs[rank], ws[rank], handle, return_recv_hook=hook_mode, out=out)
    if hook_mode:
        chook()
    want = expected_low_latency_combine(rank, idxs, ws, lambda e, x: (x * (e + 1)).bfloat16().double(), xs)
    assert combined.data_ptr() == out.data_ptr(), tag
    assert_close(combined, want, f"low_latency_combine {tag}", num_terms=K)


def _low_latency_body(rank, world_size, seed):
    rng = random.Random(seed)
    for i, kind in enumerate(ROUTING_KINDS):
        K = rng.choice((1, 2, 3))
        T = rng.choice((0, 1, 7, M))  # tokens below and at the maximum
        _case(rank, world_size, kind, K, rng.choice((64, 136)), T, False, False, i % 2 == 1, seed + i)
    _case(rank, world_size, "masked", 3, 256, M, True, False, False, seed + 50)
    _case(rank, world_size, "uniform", 2, 200, 5, True, True, True, seed + 51)


@pytest.mark.parametrize("world_size", [2, 4])
def test_low_latency_matches_reference(world_size):
    run_distributed(_low_latency_body, world_size, random.randrange(1 << 30), timeout_s=600)
