"""Normal layout/dispatch/combine on 2 and 4 gloo ranks against the independent loop reference.

Every launch runs many cases drawn from a fresh seed (printed in each failure): every routing kind,
top-k 1..9, BF16/FP16/FP32/FP8 rows, hidden sizes that are not multiples of 128, token counts that
differ per rank (0 included), with and without top-k and weights, expert_alignment, num_worst_tokens,
cached handles, biases and combined_topk_weights; then a whole MoE layer against a dense float64 one.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from ep_train import Buffer
from ep_train.fp8 import dequantize_fp8
from ep_train.testing import (
    ROUTING_KINDS,
    assert_bitwise_equal,
    assert_close,
    dense_moe,
    expected_combine,
    expected_combined_weights,
    expected_dispatch,
    expected_layout,
    fp8_rows,
    make_all_routings,
    random_rows,
    run_distributed,
    structured_rows,
    tokens_per_rank,
)

E = 16  # experts: 8 per rank on 2 ranks, 4 on 4, 2 on 8


def _buffer(R: int, hidden: int) -> Buffer:
    nvl = Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(hidden * 8, R)  # room for FP64 rows
    return Buffer(dist.group.WORLD, num_nvl_bytes=nvl, timeout_s=60)


def _rows(rank, counts, hidden, dtype, fp8, seed, salt=0):
    if fp8:
        return [fp8_rows(r, counts[r], hidden, seed, salt=salt) for r in range(len(counts))]
    return [structured_rows(r, counts[r], hidden, dtype, seed, salt=salt) for r in range(len(counts))]


def _check_layout(buf, rank, R, idx, tag):
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    want = expected_layout(idx, E, R)
    assert per_rdma is None, tag
    assert per_rank.dtype == torch.int32 and per_rank.tolist() == want["num_tokens_per_rank"], tag
    assert per_expert.dtype == torch.int32 and per_expert.tolist() == want["num_tokens_per_expert"], tag
    want_in = torch.tensor(want["is_token_in_rank"], dtype=torch.bool).reshape(idx.shape[0], R)
    assert_bitwise_equal(in_rank, want_in, f"is_token_in_rank {tag}")
    return {"num_tokens_per_rank": per_rank, "num_tokens_per_expert": per_expert, "is_token_in_rank": in_rank}


def _check_handle(handle, rank, recv, tag):
    """send_pos / rank_prefix_matrix / recv_src_idx of the handle against every rank's expected rows."""
    R = len(recv)
    assert handle.num_recv_tokens == recv[rank].num_rows, tag
    assert handle.recv_src_idx_N[: recv[rank].num_rows].tolist() == recv[rank].src_idx, tag
    sent = [[sum(1 for s in recv[d].src_rank if s == i) for d in range(R)] for i in range(R)]
    prefix = torch.tensor(sent).cumsum(0).to(torch.int32)
    assert_bitwise_equal(handle.rank_prefix_matrix_RR, prefix, f"rank_prefix_matrix {tag}")
    for d in range(R):
        pos = {t: j for j, (s, t) in enumerate(zip(recv[d].src_rank, recv[d].src_idx, strict=True)) if s == rank}
        want = [pos.get(t, -1) for t in range(handle.num_tokens)]
        assert handle.send_pos_TR[:, d].tolist() == want, f"send_pos_TR[:, {d}] {tag}"


def _check_recv(out, want, num_rows, fp8, tag):
    recv_x, recv_idx, recv_w, counts, _, _ = out
    rows, scales = recv_x if fp8 else (recv_x, None)
    n = want.num_rows
    assert rows.shape[0] == num_rows, f"{tag}: {rows.shape[0]} rows, expected {num_rows}"
    assert_bitwise_equal(rows[:n], want.x, f"recv_x {tag}")
    if fp8:
        assert_bitwise_equal(scales[:n], want.scales, f"recv_x scales {tag}")
    if want.topk_idx is None:
        assert recv_idx is None and recv_w is None, tag
        return
    assert_bitwise_equal(recv_idx[:n], want.topk_idx, f"recv_topk_idx {tag}")
    assert (recv_idx[n:] == -1).all(), f"padding rows of recv_topk_idx must be -1 {tag}"
    assert counts == want.num_recv_tokens_per_expert, f"{tag}: counts {counts} != {want.num_recv_tokens_per_expert}"
    if want.topk_weights is None:
        assert recv_w is None, tag
    else:
        assert_bitwise_equal(recv_w[:n], want.topk_weights, f"recv_topk_weights {tag}")
        assert (recv_w[n:] == 0).all(), f"padding rows of recv_topk_weights must be 0 {tag}"


def _expert_rows(d, rows, fp8):
    """What 'experts' of rank d return for its received rows: the rows scaled by (d + 1)."""
    dense = dequantize_fp8(*rows, torch.bfloat16) if fp8 else rows
    return (dense.double() * (d + 1)).to(dense.dtype)


def _check_combine(buf, rank, c, xs_out, recv, handle, ws, tag):
    R, fp8 = len(recv), c["fp8"]
    ys = [_expert_rows(d, (recv[d].x, recv[d].scales) if fp8 else recv[d].x, fp8) for d in range(R)]
    y = ys[rank]
    if handle.num_recv_rows > y.shape[0]:  # padding rows carry NaN: combine must ignore them
        y = torch.cat([y, y.new_full((handle.num_recv_rows - y.shape[0], y.shape[1]), float("nan"))])
    T = handle.num_tokens
    bias = [random_rows(rank, T, y.shape[1], y.dtype, c["seed"], salt=i) for i in range(c["num_bias"])]
    recv_w = xs_out[2]
    combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=tuple(bias) if bias else None)
    want, mag = expected_combine(rank, recv, ys, T, bias)
    assert_close(combined, want, f"combine {tag}", y.dtype, num_terms=R + len(bias), magnitude=mag)
    if recv_w is None:
        assert combined_w is None, tag
        return
    wys = [recv[d].topk_weights for d in range(R)]
    assert_bitwise_equal(combined_w, expected_combined_weights(rank, recv, wys, T).float(), f"combined_w {tag}")
    assert_bitwise_equal(combined_w, ws[rank], f"combined_topk_weights restore the gate weights {tag}")


def _case(rank, R, c):
    tag = f"[R {R} " + " ".join(f"{k} {v}" for k, v in c.items()) + "]"
    counts = tokens_per_rank(c["seed"], R, 0, 40)
    if c["seed"] % 4 == 0:  # a rank without tokens in every fourth case, not only by chance
        counts[c["seed"] % R] = 0
    idxs, ws = make_all_routings(c["kind"], counts, E, c["K"], R, c["seed"])
    xs = _rows(rank, counts, c["hidden"], c["dtype"], c["fp8"], c["seed"])
    buf = _buffer(R, c["hidden"])
    layout = _check_layout(buf, rank, R, idxs[rank], tag)
    if not c["with_topk"]:
        layout.pop("num_tokens_per_expert")
    topk = {"topk_idx": idxs[rank], "topk_weights": ws[rank] if c["with_weights"] else None} if c["with_topk"] else {}
    worst = sum(counts) if c["worst"] else 0
    out = buf.dispatch(xs[rank], **layout, **topk, expert_alignment=c["alignment"], num_worst_tokens=worst)
    recv = [expected_dispatch(d, xs, idxs, ws if c["with_weights"] else None, E, c["alignment"], c["with_topk"])
            for d in range(R)]  # fmt: skip
    _check_recv(out, recv[rank], worst or recv[rank].num_rows, c["fp8"], tag)
    handle = out[4]
    _check_handle(handle, rank, recv, tag)
    # Cached mode: the same routing on new rows, no layout.
    xs2 = _rows(rank, counts, c["hidden"], c["dtype"], c["fp8"], c["seed"], salt=1)
    again = buf.dispatch(xs2[rank], handle=handle, num_worst_tokens=worst)
    recv2 = expected_dispatch(rank, xs2, idxs, None, E, c["alignment"], with_topk=False)
    _check_recv(again, recv2, worst or recv2.num_rows, c["fp8"], f"cached {tag}")
    assert again[3] == out[3] and again[4] is handle, f"cached counts/handle {tag}"
    _check_combine(buf, rank, c, out, recv, handle, ws, tag)
    buf.destroy()


def _dispatch_combine_body(rank, world_size, seed):
    rng = random.Random(seed)
    cases = [(kind, K, False) for kind in ROUTING_KINDS for K in (1, 2, 9)]
    cases += [("uniform", 8, True), ("masked", 3, True), ("one_expert", 5, True), ("dropped_rows", 2, True)]
    for i, (kind, K, fp8) in enumerate(cases):
        hidden = rng.choice((256, 1024, 7168)) if fp8 else rng.choice((1, 64, 200, 256, 1000))
        c = {
            "seed": seed + i, "kind": kind, "K": K, "hidden": hidden, "fp8": fp8,
            "dtype": rng.choice((torch.bfloat16, torch.bfloat16, torch.float16, torch.float32)),
            "alignment": rng.choice((1, 1, 4, 128)), "worst": rng.random() < 0.3,
            "with_topk": rng.random() < 0.85, "with_weights": rng.random() < 0.85, "num_bias": rng.choice((0, 1, 2)),
        }  # fmt: skip
        _case(rank, world_size, c)


@pytest.mark.parametrize("world_size", [2, 4, 8])  # 8: the EP8 code paths, on gloo
def test_dispatch_combine_matches_reference(world_size):
    seed = random.randrange(1 << 30)
    run_distributed(_dispatch_combine_body, world_size, seed, timeout_s=400)


def _moe_case(rank, R, kind, K, hidden, seed):
    """dispatch → experts weighted by the received gate weights → combine == dense float64 MoE."""
    tag = f"[R {R} seed {seed} kind {kind} K {K} H {hidden}]"
    L = E // R
    counts = tokens_per_rank(seed, R, 1, 32)
    if seed % 4 == 0:  # a rank without tokens
        counts[seed % R] = 0
    idxs, ws = make_all_routings(kind, counts, E, K, R, seed)
    x = random_rows(rank, counts[rank], hidden, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    scale_EH = torch.randn(E, hidden, generator=g, dtype=torch.float64)
    shift_EH = torch.randn(E, hidden, generator=g, dtype=torch.float64)

    def expert_fn(e, row):
        return torch.tanh(row * scale_EH[e] + shift_EH[e])

    with _buffer(R, hidden) as buf:
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idxs[rank], E)
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_expert=per_expert, is_token_in_rank=in_rank,
            topk_idx=idxs[rank], topk_weights=ws[rank],
        )  # fmt: skip
        y = torch.zeros(recv_x.shape, dtype=torch.float64)
        for j in range(recv_x.shape[0]):
            for k in range(K):
                if recv_idx[j, k] >= 0:
                    y[j] += float(recv_w[j, k]) * expert_fn(rank * L + int(recv_idx[j, k]), recv_x[j].double())
        combined, _, _ = buf.combine(y.float(), handle)
    want, mag = dense_moe(x, idxs[rank], ws[rank], expert_fn)
    # Each rank's partial is rounded to FP32 once, then R partials are summed in FP32.
    assert_close(combined, want, f"MoE layer vs dense {tag}", torch.float32, num_terms=R + 1, magnitude=mag)


def _moe_body(rank, world_size, seed):
    for i, kind in enumerate(ROUTING_KINDS):
        _moe_case(rank, world_size, kind, 1 + (seed + i) % 6, (64, 200)[i % 2], seed + i)


@pytest.mark.parametrize("world_size", [2, 4])
def test_moe_layer_matches_dense_reference(world_size):
    run_distributed(_moe_body, world_size, random.randrange(1 << 30), timeout_s=300)


def test_outputs_recorded_on_the_compute_stream_include_results_and_handles():
    """Buffer records every output tensor of a call on the compute stream: the tensors inside the
    backends' result dataclasses and their handles (dicts included) must all be found, each once."""
    import dataclasses

    from ep_train.buffer import _tensors_in

    @dataclasses.dataclass(frozen=True)
    class Handle:
        pos: torch.Tensor
        extras: dict

    @dataclasses.dataclass
    class Result:
        rows: torch.Tensor
        scales: torch.Tensor | None
        counts: list
        handle: Handle

    t = [torch.zeros(i + 1) for i in range(5)]
    result = Result(t[0], None, [3, 4], Handle(t[1], {"layout": (t[2], t[0]), "n": 2, "more": [t[3]]}))
    got = _tensors_in((result, t[4], Result))  # a class, not an instance, holds no tensors
    assert [id(x) for x in got] == [id(x) for x in t]
