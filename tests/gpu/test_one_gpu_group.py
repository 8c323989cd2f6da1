"""The intranode kernels with all 2, 4 or 8 ranks on one GPU (``ep_train.testing.one_gpu``): plain and
expert-major dispatch against the loop reference (bitwise), the expert-major combine against the
combine of the pair-sum kernel's rows (bitwise) and the loop reference (one BF16 rounding).
Fresh random inputs every run (the seed is in the failure), plus skewed routings."""

from __future__ import annotations

import random

import pytest
import torch

from ep_train import Config, layout
from ep_train.fp8 import quantize_fp8
from ep_train.permute import permute_to_experts, sum_pair_rows
from ep_train.testing import (
    assert_bitwise_equal,
    assert_close,
    expected_combine,
    expected_combined_weights,
    expected_dispatch,
    expected_low_latency,
    expected_low_latency_combine,
    expected_low_latency_combine_per_rank,
    fp8_rows,
    make_routing,
)
from ep_train.testing.routing import ROUTING_KINDS, rank_generator

pytestmark = pytest.mark.gpu

# R x num_sms must fit on the GPU (132 SMs) with every block resident at once.
_CONFIGS = {2: Config(24, 8, 256), 4: Config(16, 8, 256), 8: Config(12, 6, 128)}
_CONFIGS |= {1: _CONFIGS[2], 3: _CONFIGS[4], 6: _CONFIGS[8]}  # low-latency-only groups (no NVLink buffer)


def _case(kernels, R: int, kind: str, T: int, H: int, K: int, E: int, alignment: int, seed: int) -> None:
    from ep_train.testing.one_gpu import OneGpuGroup

    group = OneGpuGroup(R, _CONFIGS[R], H * 2, timeout_s=10.0)
    L = E // R
    routes = [make_routing(kind, T + 3 * r, E, K, R, seed, r) for r in range(R)]
    xs = [torch.randn(T + 3 * r, H, generator=rank_generator(seed, r, 1)).to(torch.bfloat16) for r in range(R)]
    x2s = [torch.randn(T + 3 * r, H, generator=rank_generator(seed, r, 2)).to(torch.bfloat16) for r in range(R)]
    biases = [torch.randn(T + 3 * r, H, generator=rank_generator(seed, r, 4)).to(torch.bfloat16) for r in range(R)]
    idxs, ws = [i for i, _ in routes], [w.float() for _, w in routes]
    recv = [expected_dispatch(r, xs, idxs, ws, E, alignment) for r in range(R)]
    # Combine inputs shaped as the kernels' outputs will be: P expert-major rows, N received rows.
    num_pairs = [permute_to_experts(w.x, w.topk_idx, w.topk_weights, L, alignment)[0].shape[0] for w in recv]
    ys = [torch.randn(num_pairs[r], H, generator=rank_generator(seed, r, 3)).to(torch.bfloat16) for r in range(R)]
    wys = [torch.rand(recv[r].topk_idx.shape, generator=rank_generator(seed, r, 5)) for r in range(R)]
    dev = OneGpuGroup.stage([xs, x2s, idxs, ws, ys, wys, biases])

    def rank_calls(r: int):
        x, x2, idx, w, y_P, w_NK, bias = (t[r] for t in dev)
        plain = group.dispatch(r, x, idx, w, E, alignment=alignment)
        fused = group.dispatch(r, x, idx, w, E, alignment=alignment, expert_major=True)
        cached = group.cached_dispatch(r, x2, fused.handle, expert_major=True)
        y_sum = sum_pair_rows(y_P, fused.handle.pair_pos_NK)
        bias = [bias]
        combined = group.combine(r, y_P, fused.handle, w_NK, bias, expert_major=True)
        combined_ref = group.combine(r, y_sum, fused.handle, w_NK, bias)
        return plain, fused, cached, y_sum, combined, combined_ref

    try:
        out = group.run(rank_calls)
    finally:
        group.destroy()
    for r, (plain, fused, cached, _, combined, combined_ref) in enumerate(out):
        tag = f"R={R} {kind} T={T} H={H} K={K} E={E} align={alignment} seed={seed} rank {r}"
        want = recv[r]
        assert_bitwise_equal(plain.recv_x_NH, want.x, f"{tag} plain recv_x")
        assert_bitwise_equal(fused.recv_topk_idx_NK, want.topk_idx, f"{tag} recv_topk_idx")
        want_P, want_tpe, want_probs, layout = permute_to_experts(want.x, want.topk_idx, want.topk_weights, L,
                                                                  alignment)  # fmt: skip
        assert fused.num_recv_tokens_per_expert_list == want_tpe.tolist(), f"{tag}: per-expert counts"
        assert_bitwise_equal(fused.recv_x_NH, want_P, f"{tag} expert-major rows")
        assert_bitwise_equal(fused.pair_probs_P, want_probs, f"{tag} expert-major probs")
        assert_bitwise_equal(fused.handle.pair_pos_NK, layout.pos_NK, f"{tag} pair_pos")
        want_x2 = expected_dispatch(r, x2s, idxs, ws, E, alignment).x
        want_P2, *_ = permute_to_experts(want_x2, want.topk_idx, want.topk_weights, L, alignment)
        assert_bitwise_equal(cached.recv_x_NH, want_P2, f"{tag} cached expert-major rows")
        assert_bitwise_equal(combined.combined_x_TH, combined_ref.combined_x_TH, f"{tag} expert-major combine")
        assert_bitwise_equal(combined.combined_topk_weights_TK, combined_ref.combined_topk_weights_TK,
                             f"{tag} combined weights")  # fmt: skip
    # The combine itself against the loop reference (rows summed per token in rank order, FP32).
    ys = [o[3].cpu() for o in out]
    for r in range(R):
        want_c, mag = expected_combine(r, recv, ys, xs[r].shape[0], [biases[r]])
        got = out[r][4].combined_x_TH
        assert_close(got, want_c, f"R={R} {kind} seed={seed} rank {r}: combine", num_terms=R + 1, magnitude=mag)


@pytest.mark.parametrize("R", [2, 4, 8])
@pytest.mark.parametrize(
    "kind,T,H,K,E,alignment",
    [
        ("uniform", 300, 7168, 8, 64, 1),
        ("uniform", 257, 2048, 9, 32, 16),
        ("one_expert", 128, 2048, 4, 16, 1),
        ("empty_rank", 100, 1024, 3, 16, 4),
        ("masked", 64, 4096, 6, 24, 1),
        ("dropped_rows", 90, 2048, 4, 32, 8),
        ("one_rank", 80, 2048, 4, 16, 1),
        ("uniform", 0, 2048, 4, 16, 4),  # rank 0 sends nothing (T = 0), the others 3, 6, 9 .. tokens
    ],
)
def test_expert_major_kernels_on_one_gpu(kernels, R, kind, T, H, K, E, alignment):
    if E % R:
        pytest.skip(f"E={E} is not divisible by {R} ranks")
    _case(kernels, R, kind, T, H, K, E, alignment, random.randrange(1 << 30))


@pytest.mark.parametrize("R", [2, 4])
def test_plain_kernels_on_one_gpu(kernels, R):
    """The harness itself on the plain dispatch and combine (rows against the loop reference)."""
    from ep_train.testing.one_gpu import OneGpuGroup

    seed, E, K, H = random.randrange(1 << 30), 16, 4, 2048
    group = OneGpuGroup(R, _CONFIGS[R], H * 2, timeout_s=10.0)
    routes = [make_routing("uniform", 64 + r, E, K, R, seed, r) for r in range(R)]
    xs = [torch.randn(64 + r, H, generator=rank_generator(seed, r, 1)).to(torch.bfloat16) for r in range(R)]
    idxs, ws = [i for i, _ in routes], [w.float() for _, w in routes]
    dev = OneGpuGroup.stage([xs, idxs, ws])

    def rank_calls(r: int):
        res = group.dispatch(r, *(t[r] for t in dev), E)
        return res, group.combine(r, res.recv_x_NH, res.handle)

    try:
        out = group.run(rank_calls)
    finally:
        group.destroy()
    recv = [expected_dispatch(r, xs, idxs, ws, E) for r in range(R)]
    for r, (res, _) in enumerate(out):
        assert_bitwise_equal(res.recv_x_NH, recv[r].x, f"R={R} seed={seed} rank {r} recv_x")
    ys = [res.recv_x_NH.cpu() for res, _ in out]  # each rank sends its received rows back
    for r, (_, combined) in enumerate(out):
        want, mag = expected_combine(r, recv, ys, xs[r].shape[0])
        assert_close(combined.combined_x_TH, want, f"R={R} seed={seed} rank {r} combine", num_terms=R, magnitude=mag)


@pytest.mark.parametrize("R", [2, 4, 8])
def test_expert_major_fp8_on_one_gpu(kernels, R):
    """FP8 rows and their scales into expert-major order (first and cached call), bitwise."""
    from ep_train.testing.one_gpu import OneGpuGroup

    seed, E, K, H, alignment = random.randrange(1 << 30), 32, 6, 7168, 4
    L = E // R
    group = OneGpuGroup(R, _CONFIGS[R], H * 2, timeout_s=10.0)
    routes = [make_routing("masked", 70 + 5 * r, E, K, R, seed, r) for r in range(R)]
    xs = [fp8_rows(r, 70 + 5 * r, H, seed) for r in range(R)]
    x2s = [fp8_rows(r, 70 + 5 * r, H, seed + 1) for r in range(R)]
    idxs, ws = [i for i, _ in routes], [w.float() for _, w in routes]
    dev = OneGpuGroup.stage([xs, x2s, idxs, ws])

    def rank_calls(r: int):
        (x, s), (x2, s2), idx, w = (t[r] for t in dev)
        fused = group.dispatch(r, x, idx, w, E, alignment=alignment, expert_major=True, x_scales_TS=s)
        cached = group.cached_dispatch(r, x2, fused.handle, expert_major=True, x_scales_TS=s2)
        return fused, cached

    try:
        out = group.run(rank_calls)
    finally:
        group.destroy()
    for r, (fused, cached) in enumerate(out):
        tag = f"R={R} FP8 seed={seed} rank {r}"
        for name, got, payload in (("first call", fused, xs), ("cached call", cached, x2s)):
            want = expected_dispatch(r, payload, idxs, ws, E, alignment)
            # Rows as bytes (CPU float8 has no indexing arithmetic to compare), scales as they are.
            idx, w = want.topk_idx, want.topk_weights
            want_P, _, _, _ = permute_to_experts(want.x.view(torch.uint8), idx, w, L, alignment)
            want_S, _, _, _ = permute_to_experts(want.scales, idx, w, L, alignment)
            assert_bitwise_equal(got.recv_x_NH.view(torch.uint8), want_P, f"{tag} {name} rows")
            assert_bitwise_equal(got.recv_x_scales_NS, want_S, f"{tag} {name} scales")


# (T, H, K, E, routing, config): the plain kernels' paths at every rank count; each config keeps
# 8 x num_sms within the GPU.  Tiny rings and chunks make senders wait for free slots.
_PLAIN_CASES = [
    (300, 2000, 4, 32, "uniform", Config(4, 2, 8)),  # hidden % 8 != 0: 2-byte copies
    (257, 7168, 9, 64, "masked", Config(12, 6, 64)),
    (64, 4096, 1, 16, "one_expert", Config(2, 1, 2)),
    (129, 2048, 8, 32, "dropped_rows", Config(8, 4, 32)),
    (90, 1024, 3, 16, "empty_rank", Config(16, 8, 256)),
]


@pytest.mark.parametrize("R", [2, 4, 8])
@pytest.mark.parametrize("case", range(len(_PLAIN_CASES)))
def test_plain_kernels_matrix_on_one_gpu(kernels, R, case):
    """Plain dispatch (layout-free, cached with a second payload, and with num_worst_tokens) and
    combine with weights and two biases, against the loop references."""
    from ep_train.testing.one_gpu import OneGpuGroup

    T0, H, K, E, kind, config = _PLAIN_CASES[case]
    seed = random.randrange(1 << 30)
    group = OneGpuGroup(R, config, H * 2, timeout_s=10.0)
    T = [T0 + 7 * r for r in range(R)]
    routes = [make_routing(kind, T[r], E, K, R, seed, r) for r in range(R)]
    idxs, ws = [i for i, _ in routes], [w.float() for _, w in routes]
    xs = [torch.randn(T[r], H, generator=rank_generator(seed, r, 1)).to(torch.bfloat16) for r in range(R)]
    x2s = [torch.randn(T[r], H, generator=rank_generator(seed, r, 2)).to(torch.bfloat16) for r in range(R)]
    recv = [expected_dispatch(r, xs, idxs, ws, E) for r in range(R)]
    worst = sum(T)  # at least what any rank receives
    ys = [torch.randn(recv[r].x.shape, generator=rank_generator(seed, r, 3)).to(torch.bfloat16) for r in range(R)]
    wys = [torch.rand(recv[r].topk_weights.shape, generator=rank_generator(seed, r, 4)) for r in range(R)]
    biases = [[torch.randn(T[r], H, generator=rank_generator(seed, r, 5 + i)).to(torch.bfloat16) for i in range(2)]
              for r in range(R)]  # fmt: skip

    dev = OneGpuGroup.stage([xs, x2s, idxs, ws, ys, wys, biases])

    def rank_calls(r: int):
        x, x2, idx, w, y, wy, bias = (t[r] for t in dev)
        first = group.dispatch(r, x, idx, w, E)
        cached = group.cached_dispatch(r, x2, first.handle)
        combined = group.combine(r, y, first.handle, wy, list(bias))
        padded = group.dispatch(r, x, idx, w, E, num_worst_tokens=worst)
        return first, cached, combined, padded

    try:
        out = group.run(rank_calls)
    finally:
        group.destroy()
    for r, (first, cached, combined, padded) in enumerate(out):
        tag = f"R={R} case {case} ({kind}, H={H}, K={K}) seed={seed} rank {r}"
        want, n = recv[r], recv[r].num_rows
        assert_bitwise_equal(first.recv_x_NH, want.x, f"{tag} recv_x")
        assert_bitwise_equal(first.recv_topk_idx_NK, want.topk_idx, f"{tag} recv_topk_idx")
        assert_bitwise_equal(first.recv_topk_weights_NK, want.topk_weights, f"{tag} recv_topk_weights")
        assert first.num_recv_tokens_per_expert_list == want.num_recv_tokens_per_expert, f"{tag}: per-expert counts"
        assert_bitwise_equal(cached.recv_x_NH, expected_dispatch(r, x2s, idxs, ws, E).x, f"{tag} cached recv_x")
        assert padded.recv_x_NH.shape[0] == worst, f"{tag}: num_worst_tokens rows"
        assert_bitwise_equal(padded.recv_x_NH[:n], want.x, f"{tag} padded recv_x")
        assert bool((padded.recv_topk_idx_NK[n:] == -1).all()), f"{tag}: padding rows must carry no expert"
        want_c, mag = expected_combine(r, recv, ys, T[r], biases[r])
        assert_close(combined.combined_x_TH, want_c, f"{tag} combine", num_terms=R + 2, magnitude=mag)
        want_w = expected_combined_weights(r, recv, wys, T[r])
        assert_close(combined.combined_topk_weights_TK, want_w, f"{tag} combined weights", num_terms=R)


@pytest.mark.parametrize("R", [2, 4, 8])
def test_failures_on_one_gpu(kernels, R):
    """Bounded waits at every rank count: a rank that skips a dispatch leaves the others with
    CommTimeoutError (no hang); ranks that disagree on a call's hidden size raise RankMismatchError
    naming the field, before any row moves."""
    from ep_train.errors import CommTimeoutError, RankMismatchError
    from ep_train.testing.one_gpu import GroupError, OneGpuGroup

    seed, E, K, H = random.randrange(1 << 30), 16, 4, 2048
    routes = [make_routing("uniform", 40, E, K, R, seed, r) for r in range(R)]
    xs = [torch.randn(40, H, generator=rank_generator(seed, r, 1)).to(torch.bfloat16) for r in range(R)]
    dev = OneGpuGroup.stage([[x[:, :hidden].contiguous() for x in xs] for hidden in (H // 2, H)] + [
        [i for i, _ in routes], [w.float() for _, w in routes]])  # fmt: skip

    def call(group, r: int, hidden: int):
        return group.dispatch(r, dev[int(hidden == H)][r], dev[2][r], dev[3][r], E)

    group = OneGpuGroup(R, _CONFIGS[R], H * 2, timeout_s=2.0)
    try:
        with pytest.raises(GroupError) as failed:
            group.run(lambda r: None if r == R - 1 else call(group, r, H))
    finally:
        group.destroy()
    errors = [e for _, e in failed.value.rank_errors]
    assert len(errors) == R - 1, str(failed.value)
    assert all(isinstance(e, CommTimeoutError) for e in errors), str(failed.value)

    group = OneGpuGroup(R, _CONFIGS[R], H * 2, timeout_s=2.0)
    try:
        with pytest.raises(GroupError) as failed:
            group.run(lambda r: call(group, r, H // 2 if r == 0 else H))
    finally:
        group.destroy()
    errors = [e for _, e in failed.value.rank_errors]
    assert len(errors) == R and all(isinstance(e, RankMismatchError) for e in errors), str(failed.value)
    assert all("hidden" in str(e) for e in errors), str(failed.value)


def _assert_low_latency_slots(tag: str, d, want, fp8: bool) -> None:
    """A low-latency dispatch against ``expected_low_latency``: counts, each expert's rows (FP8:
    bytes and scales) and the handle's source token, top-k column and weight of every slot."""
    assert d.recv_count_L.cpu().tolist() == want.count, f"{tag}: recv_count"
    h = d.handle
    for l, cnt in enumerate(want.count):  # noqa: E741 - l is the local expert
        got_x, want_x = d.recv_x_LSH[l, :cnt], want.x[l, :cnt]
        if fp8:
            got_x, want_x = got_x.view(torch.uint8), want_x.view(torch.uint8)
            assert_bitwise_equal(d.recv_x_scales_LSS[l, :cnt], want.scales[l, :cnt], f"{tag} expert {l} scales")
        assert_bitwise_equal(got_x, want_x, f"{tag} expert {l} rows")
        assert_bitwise_equal(h.recv_src_info_LS[l, :cnt], want.src_idx[l, :cnt], f"{tag} expert {l} src")
        assert_bitwise_equal(h.recv_topk_pos_LS[l, :cnt], want.topk_pos[l, :cnt], f"{tag} expert {l} pos")
        assert_bitwise_equal(h.recv_topk_weights_LS[l, :cnt], want.weights[l, :cnt], f"{tag} expert {l} w")


@pytest.mark.parametrize("R", [2, 4, 8])
@pytest.mark.parametrize("H,kind", [(2048, "masked"), (7168, "uniform")])
def test_low_latency_on_one_gpu(kernels, R, H, kind):
    """Low-latency dispatch (BF16 then FP8, both sent before either is received: the two buffer
    halves) and their combines (hooks), twice over; slots bitwise against the loop reference (FP8:
    ``quantize_fp8`` on CUDA, the kernels' own arithmetic), combine within one BF16 rounding."""
    from ep_train.testing.one_gpu import OneGpuGroup

    seed, E, K, M = random.randrange(1 << 30), 32, 6, 64
    L = E // R
    group = OneGpuGroup(R, _CONFIGS[R], 2048 * 2, timeout_s=10.0,
                        low_latency_bytes=layout.low_latency_buffer_bytes(M, H, R, E))  # fmt: skip
    T = [0 if r == 0 and kind == "masked" else M - 5 * r for r in range(R)]  # below M, rank 0 may send nothing
    routes = [make_routing(kind, T[r], E, K, R, seed, r) for r in range(R)]
    idxs, ws = [i for i, _ in routes], [w.float() for _, w in routes]
    xs = [[torch.randn(T[r], H, generator=rank_generator(seed, r, n)).to(torch.bfloat16) for r in range(R)]
          for n in range(4)]  # fmt: skip
    ys = [[torch.randn(L, R * M, H, generator=rank_generator(seed, r, 10 + n)).to(torch.bfloat16) for r in range(R)]
          for n in range(4)]  # fmt: skip

    dev_x, dev_y, dev_idx, dev_w = OneGpuGroup.stage([xs, ys, idxs, ws])
    # FP8 calls: the rows as quantize_fp8 on CUDA makes them (the kernels' own arithmetic).
    sent_fp8 = [[tuple(t.cpu() for t in quantize_fp8(dev_x[n][r])) for r in range(R)] if n % 2 else None
                for n in range(4)]  # fmt: skip

    def rank_calls(r: int):
        idx, w, out = dev_idx[r], dev_w[r], []
        for pair in range(2):
            sent = [group.low_latency_dispatch(r, dev_x[2 * pair + f][r], idx, w, M, E, use_fp8=bool(f),
                                               return_recv_hook=True) for f in range(2)]  # fmt: skip
            for d in sent:
                d.hook()
            combined = [group.low_latency_combine(r, dev_y[2 * pair + n][r], idx, w, sent[n].handle,
                                                  return_recv_hook=True) for n in range(2)]  # fmt: skip
            for c in combined:
                c.hook()
            out += list(zip(sent, combined, strict=True))
        return out

    try:
        out = group.run(rank_calls)
    finally:
        group.destroy()
    for n in range(4):
        fp8 = n % 2 == 1
        sent_xs = sent_fp8[n] if fp8 else xs[n]
        slots = [expected_low_latency(r, sent_xs, idxs, ws, E, M) for r in range(R)]
        for r in range(R):
            tag = f"R={R} H={H} {kind} seed={seed} call {n} ({'FP8' if fp8 else 'BF16'}) rank {r}"
            d, c = out[r][n]
            _assert_low_latency_slots(tag, d, slots[r], fp8)
            want_c, mag = expected_low_latency_combine(r, slots, [ys[n][q] for q in range(R)], ws[r], T[r])
            assert_close(c.combined_x_TH, want_c, f"{tag} combine", num_terms=K, magnitude=mag)


# Ranks every rank reaches by puts from staged rows (the path for peers on other nodes).
_RMA_MASKS = {"stores": lambda R: 0, "rma-odd": lambda R: sum(1 << r for r in range(1, R, 2)),
              "rma-all": lambda R: (1 << R) - 1}  # fmt: skip


@pytest.mark.parametrize("rma", list(_RMA_MASKS))
@pytest.mark.parametrize("R", [2, 3, 4, 6, 8])
def test_low_latency_matrix_on_one_gpu(kernels, R, rma):
    """Twelve low-latency dispatch + combine pairs through one group: hidden 2048/4096/7168, top-k 1
    to 9, BF16 and FP8 (with power-of-two scales), with and without gate weights, hooks and ``out``,
    every routing kind, tokens from 0 to M per rank; slots, handle tensors, the cumulative receive
    counts and the combine against the loop references.  ``rma``: which ranks are reached by staged
    puts (done here as copies through the peer pointer) rather than stores."""
    low_latency_matrix(R, _RMA_MASKS[rma](R))


def low_latency_matrix(R: int, rma_mask: int, rma_impl: int | None = None, memory=None, seed: int | None = None):
    """The matrix above on a group of R ranks (``memory``: low-latency buffers to adopt, of
    ``low_latency_matrix_bytes(R, rma_mask != 0)`` bytes each)."""
    from ep_train.testing.one_gpu import OneGpuGroup

    seed = random.randrange(1 << 30) if seed is None else seed
    E, M = 48, 64  # 48 experts: every rank count from 1 to 8 except 5 and 7 divides them
    L, pick = E // R, random.Random(seed)
    cases = []
    for i in range(12):
        fp8 = i % 4 >= 2
        cases.append(dict(H=(2048, 4096, 7168)[i % 3], K=1 + (i * 5) % 9, fp8=fp8, round_scale=fp8 and i % 8 >= 4,
                          kind=ROUTING_KINDS[i % len(ROUTING_KINDS)], weights=i % 3 != 1, hook=i % 2 == 0,
                          out=i % 5 == 2, T=[0 if i % 6 == r else pick.randint(1, M) for r in range(R)],
                          per_rank=i % 4 in (1, 2)))  # fmt: skip
    group = OneGpuGroup(R, _CONFIGS[R], 2048 * 2, timeout_s=10.0,
                        low_latency_bytes=low_latency_matrix_bytes(R, rma_mask != 0), low_latency_rma=rma_mask,
                        low_latency_rma_impl=rma_impl, low_latency_memory=memory)  # fmt: skip
    inputs = []  # per case: per rank (x, idx, w, y, out)
    for n, c in enumerate(cases):
        per_rank = []
        for r in range(R):
            idx, w = make_routing(c["kind"], c["T"][r], E, c["K"], R, seed + n, r)
            x = torch.randn(c["T"][r], c["H"], generator=rank_generator(seed, r, 2 * n)).to(torch.bfloat16)
            y = torch.randn(L, R * M, c["H"], generator=rank_generator(seed, r, 2 * n + 1)).to(torch.bfloat16)
            out = torch.full((c["T"][r], c["H"]), float("nan")).to(torch.bfloat16) if c["out"] else None
            per_rank.append((x, idx, w.float(), y, out))
        inputs.append(per_rank)
    dev = OneGpuGroup.stage(inputs)
    stats = OneGpuGroup.stage([torch.full((L,), 3, dtype=torch.int32) for _ in range(R)])
    sent_fp8 = [[tuple(t.cpu() for t in quantize_fp8(dev[n][r][0], round_scale=c["round_scale"])) for r in range(R)]
                if c["fp8"] else None for n, c in enumerate(cases)]  # fmt: skip

    def rank_calls(r: int):
        results = []
        for n, c in enumerate(cases):
            x, idx, w, y, out = dev[n][r]
            weights = w if c["weights"] else None
            d = group.low_latency_dispatch(r, x, idx, weights, M, E, use_fp8=c["fp8"], round_scale=c["round_scale"],
                                           stats_L=stats[r], return_recv_hook=c["hook"])  # fmt: skip
            if d.hook is not None:
                d.hook()
            # Sums per rank weight with the dispatch's weights, or without them give the plain sum.
            comb_w = None if c["per_rank"] and not c["weights"] else w
            comb = group.low_latency_combine(r, y, idx, comb_w, d.handle, out_TH=out, return_recv_hook=c["hook"],
                                             sum_per_rank=c["per_rank"])  # fmt: skip
            if comb.hook is not None:
                comb.hook()
            results.append((d, comb))
        return results

    try:
        out = group.run(rank_calls)
    finally:
        group.destroy()
    total = [torch.full((L,), 3, dtype=torch.int32) for _ in range(R)]
    for n, c in enumerate(cases):
        xs = sent_fp8[n] if c["fp8"] else [inputs[n][r][0] for r in range(R)]
        idxs, ws = [inputs[n][r][1] for r in range(R)], [inputs[n][r][2] for r in range(R)]
        slots = [expected_low_latency(r, xs, idxs, ws if c["weights"] else None, E, M) for r in range(R)]
        for r in range(R):
            tag = f"R={R} RMA mask {rma_mask} seed={seed} case {n} {c} rank {r}"
            d, comb = out[r][n]
            _assert_low_latency_slots(tag, d, slots[r], c["fp8"])
            total[r] += torch.tensor(slots[r].count, dtype=torch.int32)
            if c["out"]:
                assert comb.combined_x_TH.data_ptr() == dev[n][r][4].data_ptr(), f"{tag}: combine must write into out"
            ys = [inputs[n][q][3] for q in range(R)]
            w_r = ws[r] if c["weights"] or not c["per_rank"] else torch.ones_like(ws[r])
            want_c, mag = expected_low_latency_combine(r, slots, ys, w_r, c["T"][r])
            assert_close(comb.combined_x_TH, want_c, f"{tag} combine", num_terms=c["K"], magnitude=mag,
                         rounded_partials=c["per_rank"])  # fmt: skip
            if c["per_rank"]:
                want_sum = expected_low_latency_combine_per_rank(r, slots, ys, w_r, c["T"][r])
                assert_bitwise_equal(comb.combined_x_TH, want_sum, f"{tag} combine with sums per rank")
    for r in range(R):
        assert_bitwise_equal(stats[r], total[r], f"R={R} seed={seed} rank {r} cumulative receive counts")


def low_latency_matrix_bytes(R: int, rma_staging: bool) -> int:
    return layout.low_latency_buffer_bytes(64, 7168, R, 48, rma_staging=rma_staging)


# Kernel configs of different channel counts, chunks and rings that one group's calls switch
# between (each keeps 8 x num_sms within the GPU).
_CALL_CONFIGS = (Config(12, 6, 128), Config(4, 2, 16), Config(16, 4, 64))


@pytest.mark.parametrize("R", [2, 4, 8])
def test_configs_per_call_on_one_gpu(kernels, R):
    """Calls of one group on different kernel configs (prepare rebuilds the row ranges for each
    call's channel count): BF16 and FP8 dispatch, cached dispatch and combine each on another
    config than the dispatch that made the handle, against the loop references."""
    from ep_train.testing.one_gpu import OneGpuGroup

    seed, E, K, H = random.randrange(1 << 30), 32, 6, 4096
    A, B, C = _CALL_CONFIGS
    T = [90 + 11 * r for r in range(R)]
    routes = [make_routing("masked", T[r], E, K, R, seed, r) for r in range(R)]
    idxs, ws = [i for i, _ in routes], [w.float() for _, w in routes]
    xs = [torch.randn(T[r], H, generator=rank_generator(seed, r, 1)).to(torch.bfloat16) for r in range(R)]
    x2s = [torch.randn(T[r], H, generator=rank_generator(seed, r, 2)).to(torch.bfloat16) for r in range(R)]
    f8s = [fp8_rows(r, T[r], H, seed) for r in range(R)]
    f8s2 = [fp8_rows(r, T[r], H, seed + 1) for r in range(R)]
    recv = [expected_dispatch(r, xs, idxs, ws, E) for r in range(R)]
    ys = [torch.randn(recv[r].x.shape, generator=rank_generator(seed, r, 3)).to(torch.bfloat16) for r in range(R)]
    wys = [torch.rand(recv[r].topk_weights.shape, generator=rank_generator(seed, r, 4)) for r in range(R)]
    group = OneGpuGroup(R, A, H * 2, timeout_s=10.0, more_configs=(B, C))
    dev = OneGpuGroup.stage([xs, x2s, f8s, f8s2, idxs, ws, ys, wys])

    def rank_calls(r: int):
        x, x2, (f8, s8), (f8_2, s8_2), idx, w, y, wy = (t[r] for t in dev)
        first = group.dispatch(r, x, idx, w, E, config=A)
        cached = group.cached_dispatch(r, x2, first.handle, config=B)
        combined = group.combine(r, y, first.handle, wy, config=C)
        fp8 = group.dispatch(r, f8, idx, w, E, x_scales_TS=s8, config=B)
        fp8_cached = group.cached_dispatch(r, f8_2, fp8.handle, x_scales_TS=s8_2, config=C)
        combined_b = group.combine(r, y, fp8.handle, wy, config=A)
        return first, cached, combined, fp8, fp8_cached, combined_b

    try:
        out = group.run(rank_calls)
    finally:
        group.destroy()
    for r, (first, cached, combined, fp8, fp8_cached, combined_b) in enumerate(out):
        tag = f"R={R} seed={seed} rank {r}"
        want = recv[r]
        assert_bitwise_equal(first.recv_x_NH, want.x, f"{tag} recv_x (config A)")
        assert_bitwise_equal(first.recv_topk_idx_NK, want.topk_idx, f"{tag} recv_topk_idx")
        assert_bitwise_equal(cached.recv_x_NH, expected_dispatch(r, x2s, idxs, ws, E).x, f"{tag} cached (B)")
        for name, got, payload in (("FP8 (B)", fp8, f8s), ("cached FP8 (C)", fp8_cached, f8s2)):
            want8 = expected_dispatch(r, payload, idxs, ws, E)
            assert_bitwise_equal(got.recv_x_NH.view(torch.uint8), want8.x.view(torch.uint8), f"{tag} {name} rows")
            assert_bitwise_equal(got.recv_x_scales_NS, want8.scales, f"{tag} {name} scales")
        want_c, mag = expected_combine(r, recv, ys, T[r])
        for name, got in (("combine (C)", combined), ("combine of the FP8 handle (A)", combined_b)):
            assert_close(got.combined_x_TH, want_c, f"{tag} {name}", num_terms=R, magnitude=mag)
            want_w = expected_combined_weights(r, recv, wys, T[r])
            assert_close(got.combined_topk_weights_TK, want_w, f"{tag} {name} weights", num_terms=R)


@pytest.mark.parametrize("R", [2, 4, 8])
def test_low_latency_shapes_in_flight_on_one_gpu(kernels, R):
    """Two low-latency dispatches of different shapes in flight at once (hidden 7168 with M = 64,
    then hidden 2048 with M = 32: the two buffer halves), then their combines in the same way,
    three rounds: each half must stay where it is whatever the other call's shape."""
    from ep_train.testing.one_gpu import OneGpuGroup

    seed, E, K = random.randrange(1 << 30), 32, 8
    L = E // R
    shapes = ((7168, 64), (2048, 32))  # (H, M)
    group = OneGpuGroup(R, _CONFIGS[R], 2048 * 2, timeout_s=10.0,
                        low_latency_bytes=layout.low_latency_buffer_bytes(64, 7168, R, E))  # fmt: skip
    calls = []  # per round and shape: per rank (x, idx, w, y)
    for n in range(3):
        for si, (H, M) in enumerate(shapes):
            per_rank = []
            for r in range(R):
                Tr = M - 3 * r if (n + r) % 4 else 0
                idx, w = make_routing("uniform", Tr, E, K, R, seed + 2 * n + si, r)
                x = torch.randn(Tr, H, generator=rank_generator(seed, r, 10 * n + si)).to(torch.bfloat16)
                y = torch.randn(L, R * M, H, generator=rank_generator(seed, r, 10 * n + si + 5)).to(torch.bfloat16)
                per_rank.append((x, idx, w.float(), y))
            calls.append(per_rank)
    dev = OneGpuGroup.stage(calls)

    def rank_calls(r: int):
        results = []
        for n in range(3):
            pair = [dev[2 * n + si][r] for si in range(2)]
            sent = [group.low_latency_dispatch(r, x, idx, w, M, E, return_recv_hook=True)
                    for (x, idx, w, _), (_, M) in zip(pair, shapes, strict=True)]  # fmt: skip
            for d in sent:
                d.hook()
            combined = [group.low_latency_combine(r, y, idx, w, d.handle, return_recv_hook=True)
                        for (_, idx, w, y), d in zip(pair, sent, strict=True)]  # fmt: skip
            for c in combined:
                c.hook()
            results += list(zip(sent, combined, strict=True))
        return results

    try:
        out = group.run(rank_calls)
    finally:
        group.destroy()
    for n, per_rank in enumerate(calls):
        H, M = shapes[n % 2]
        xs, idxs, ws = ([per_rank[r][i] for r in range(R)] for i in range(3))
        slots = [expected_low_latency(r, xs, idxs, ws, E, M) for r in range(R)]
        for r in range(R):
            tag = f"R={R} seed={seed} call {n} (H={H}, M={M}) rank {r}"
            d, comb = out[r][n]
            _assert_low_latency_slots(tag, d, slots[r], fp8=False)
            want_c, mag = expected_low_latency_combine(r, slots, [per_rank[q][3] for q in range(R)], ws[r],
                                                       xs[r].shape[0])  # fmt: skip
            assert_close(comb.combined_x_TH, want_c, f"{tag} combine", num_terms=K, magnitude=mag)


@pytest.mark.parametrize("R", [2, 4, 8])
def test_expert_major_configs_per_call_on_one_gpu(kernels, R):
    """Expert-major dispatch on one config, its cached call and its combine (pairs summed inside the
    combine) each on another: rows bitwise against the loop reference permuted to expert-major order,
    the combine bitwise against sum_pair_rows + the plain combine on the dispatch's config."""
    from ep_train.testing.one_gpu import OneGpuGroup

    seed, E, K, H, alignment = random.randrange(1 << 30), 32, 6, 2048, 4
    L = E // R
    A, B, C = _CALL_CONFIGS
    T = [70 + 9 * r for r in range(R)]
    routes = [make_routing("uniform", T[r], E, K, R, seed, r) for r in range(R)]
    idxs, ws = [i for i, _ in routes], [w.float() for _, w in routes]
    xs = [torch.randn(T[r], H, generator=rank_generator(seed, r, 1)).to(torch.bfloat16) for r in range(R)]
    x2s = [torch.randn(T[r], H, generator=rank_generator(seed, r, 2)).to(torch.bfloat16) for r in range(R)]
    recv = [expected_dispatch(r, xs, idxs, ws, E, alignment) for r in range(R)]
    perm = [permute_to_experts(w.x, w.topk_idx, w.topk_weights, L, alignment) for w in recv]
    ys = [torch.randn(perm[r][0].shape, generator=rank_generator(seed, r, 3)).to(torch.bfloat16) for r in range(R)]
    wys = [torch.rand(recv[r].topk_idx.shape, generator=rank_generator(seed, r, 4)) for r in range(R)]
    group = OneGpuGroup(R, A, H * 2, timeout_s=10.0, more_configs=(B, C))
    dev = OneGpuGroup.stage([xs, x2s, idxs, ws, ys, wys])

    def rank_calls(r: int):
        x, x2, idx, w, y_P, w_NK = (t[r] for t in dev)
        fused = group.dispatch(r, x, idx, w, E, alignment=alignment, expert_major=True, config=A)
        cached = group.cached_dispatch(r, x2, fused.handle, expert_major=True, config=B)
        combined = group.combine(r, y_P, fused.handle, w_NK, expert_major=True, config=C)
        y_sum = sum_pair_rows(y_P, fused.handle.pair_pos_NK)
        reference = group.combine(r, y_sum, fused.handle, w_NK, config=A)
        return fused, cached, combined, reference

    try:
        out = group.run(rank_calls)
    finally:
        group.destroy()
    for r, (fused, cached, combined, reference) in enumerate(out):
        tag = f"R={R} seed={seed} rank {r}"
        want_P, want_tpe, want_probs, want_layout = perm[r]
        assert fused.num_recv_tokens_per_expert_list == want_tpe.tolist(), f"{tag}: per-expert counts"
        assert_bitwise_equal(fused.recv_x_NH, want_P, f"{tag} expert-major rows (A)")
        assert_bitwise_equal(fused.pair_probs_P, want_probs, f"{tag} expert-major probs")
        want_x2 = expected_dispatch(r, x2s, idxs, ws, E, alignment).x
        want_P2, *_ = permute_to_experts(want_x2, recv[r].topk_idx, recv[r].topk_weights, L, alignment)
        assert_bitwise_equal(cached.recv_x_NH, want_P2, f"{tag} cached expert-major rows (B)")
        assert_bitwise_equal(combined.combined_x_TH, reference.combined_x_TH, f"{tag} expert-major combine (C)")
        assert_bitwise_equal(combined.combined_topk_weights_TK, reference.combined_topk_weights_TK,
                             f"{tag} combined weights (C)")  # fmt: skip


def test_low_latency_unmapped_peer_is_refused(kernels):
    """A rank with no load/store mapping (another node) must be reached by NVSHMEM puts: a launch
    that would store to it, or copy through its missing pointer, raises before any kernel runs."""
    from ep_train.testing.one_gpu import OneGpuGroup

    M, H, E, T = 8, 2048, 8, 4
    group = OneGpuGroup(2, _CONFIGS[2], H * 2, timeout_s=5.0,
                        low_latency_bytes=layout.low_latency_buffer_bytes(M, H, 2, E, rma_staging=True))  # fmt: skip
    try:
        ll, own = group.backends[0]._ll, group._ll_memory[0].data_ptr()
        with pytest.raises(ValueError, match="set_peer_pointers: rank 1 is not reachable"):
            ll.set_peer_pointers([own, 0])
        ll.set_peer_pointers([own, 0], allow_unmapped=True)
        assert ll.unmapped_peers() == 0b10
        x, idx = OneGpuGroup.stage([torch.randn(T, H).to(torch.bfloat16), torch.zeros(T, 1, dtype=torch.int64)])
        with pytest.raises(RuntimeError, match="ranks of mask 2 have no load/store mapping"):
            group.low_latency_dispatch(0, x, idx, None, M, E)
        ll.set_rma(0b10, kernels.LOW_LATENCY_RMA_PEER_COPIES)  # copies need the pointer too
        with pytest.raises(RuntimeError, match="ranks of mask 2 have no load/store mapping"):
            group.low_latency_dispatch(0, x, idx, None, M, E)
        if not kernels.NVSHMEM_DEVICE:
            with pytest.raises(ValueError, match="device library"):
                ll.set_rma(0b10, kernels.LOW_LATENCY_RMA_NVSHMEM)
        with pytest.raises(ValueError, match="mask of the 2 ranks"):
            ll.set_rma(0b100, kernels.LOW_LATENCY_RMA_PEER_COPIES)
    finally:
        group.destroy()
