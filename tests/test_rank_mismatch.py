"""Ranks that disagree raise ``RankMismatchError`` on every rank; a rank that skips a call makes
its peers raise ``CommTimeoutError`` within the buffer's timeout; a dead peer gives ``CommError``."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from ep_train import Buffer, CommError, CommTimeoutError, RankMismatchError
from ep_train.testing import make_routing, run_distributed

T, E, H, M = 8, 8, 256, 16


def _buffer(timeout_s: float, **kwargs) -> Buffer:
    nvl = Buffer.get_dispatch_config(4).get_nvl_buffer_size_hint(1024 * 4, 4)
    rdma = Buffer.get_low_latency_rdma_size_hint(2 * M, 1024, 4, 2 * E)
    return Buffer(dist.group.WORLD, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, timeout_s=timeout_s,
                  **kwargs)  # fmt: skip


def _dispatch(buf, rank, R, hidden=H, num_experts=E, dtype=torch.bfloat16, num_topk=2, weights=True, **extra):
    idx, w = make_routing("uniform", T, num_experts, num_topk, R, 7, rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    return buf.dispatch(torch.randn(T, hidden).to(dtype), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w if weights else None,
                        **extra)  # fmt: skip


def _ll_dispatch(buf, rank, R, max_tokens=M, weights=False):
    idx, w = make_routing("uniform", T, E, 2, R, 7, rank)
    return buf.low_latency_dispatch(torch.randn(T, H).bfloat16(), idx, max_tokens, E, use_fp8=False,
                                    topk_weights=w if weights else None)  # fmt: skip


def _combine_weights(buf, rank, R, odd):
    recv_x, _, recv_w, _, handle, _ = _dispatch(buf, rank, R, dtype=torch.float32)
    return buf.combine(recv_x, handle, topk_weights=recv_w.double() if odd else recv_w)


def _ll_combine(buf, rank, R, sum_per_rank, plain=False):
    idx, w = make_routing("uniform", T, E, 2, R, 7, rank)
    recv, _, handle, _, _ = buf.low_latency_dispatch(torch.randn(T, H).bfloat16(), idx, M, E, use_fp8=False,
                                                     topk_weights=w)  # fmt: skip
    return buf.low_latency_combine(recv, idx, None if plain else w, handle, sum_per_rank=sum_per_rank)


def _combine_or_dispatch(buf, rank, R, odd):
    recv_x, _, _, _, handle, _ = _dispatch(buf, rank, R)
    return buf.combine(recv_x, handle) if odd else _dispatch(buf, rank, R)


def _combine_other_handle(buf, rank, R, odd):
    first, second = _dispatch(buf, rank, R), _dispatch(buf, rank, R)
    recv_x, _, _, _, handle, _ = first if odd else second
    return buf.combine(recv_x, handle)


# What the last rank does differently, and the words every rank's message must contain.
SCENARIOS = {
    "hidden": (lambda b, r, R, odd: _dispatch(b, r, R, hidden=320 if odd else H), ["hidden is", "256", "320"]),
    "num_experts": (lambda b, r, R, odd: _dispatch(b, r, R, num_experts=2 * E if odd else E), ["num_experts is"]),
    "op": (_combine_or_dispatch, ["op is", "combine", "dispatch"]),
    "dtype": (lambda b, r, R, odd: _dispatch(b, r, R, dtype=torch.float32 if odd else torch.bfloat16), ["dtype is"]),
    "num_topk": (lambda b, r, R, odd: _dispatch(b, r, R, num_topk=3 if odd else 2), ["num_topk is", "2", "3"]),
    "ll_max_tokens": (lambda b, r, R, odd: _ll_dispatch(b, r, R, 2 * M if odd else M),
                      ["num_max_dispatch_tokens_per_rank", "16", "32"]),
    "ll_vs_dispatch": (lambda b, r, R, odd: _ll_dispatch(b, r, R) if odd else _dispatch(b, r, R),
                       ["op is", "low_latency_dispatch"]),
    "ll_sum_per_rank": (_ll_combine, ["(sum_per_rank, plain sum without topk_weights, topk_weights given) is",
                                      "(False, False, False)", "(True, False, False)"]),
    "ll_plain_sum": (lambda b, r, R, odd: _ll_combine(b, r, R, True, plain=odd), ["(True, True, False)",
                                                                                  "(True, False, False)"]),
    "ll_weights": (lambda b, r, R, odd: _ll_dispatch(b, r, R, weights=odd),
                   ["(use_fp8, plain sum without topk_weights, topk_weights given) is", "(False, False, True)",
                    "(False, False, False)"]),
    "handle": (_combine_other_handle, ["the handle (the call number of its dispatch) is", "combine call #2"]),
    "dispatch_weights": (lambda b, r, R, odd: _dispatch(b, r, R, weights=not odd),
                         ["(topk_weights, expert_major) is", "(float32, False)", "(None, False)"]),
    "expert_major": (lambda b, r, R, odd: _dispatch(b, r, R, expert_major=odd),
                     ["(topk_weights, expert_major) is", "(float32, True)", "(float32, False)"]),
    "combine_weights_dtype": (_combine_weights, ["(topk_weights, expert_major) is", "(float64, False)",
                                                 "(float32, False)", "combine call #1"]),
}  # fmt: skip


def _mismatch_body(rank, world_size):
    out = {}
    for name, (call, _) in SCENARIOS.items():
        buf = _buffer(30)  # a buffer is unusable after a failure: one per scenario
        try:
            call(buf, rank, world_size, rank == world_size - 1)
            out[name] = "no error"
        except RankMismatchError as exc:
            out[name] = str(exc)
        try:  # the failed buffer refuses further work at once, without waiting for peers
            _dispatch(buf, rank, world_size)
        except CommError as exc:
            out[name] += " || " + str(exc)
        try:
            buf.check()
            out[name] += " || check passed"
        except CommError as exc:
            out[name] += " || " + str(exc)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_disagreeing_ranks_raise_on_every_rank(world_size):
    for rank, out in enumerate(run_distributed(_mismatch_body, world_size, timeout_s=240)):
        for name, (_, words) in SCENARIOS.items():
            msg = out[name]
            assert msg != "no error", f"rank {rank}, {name}: no RankMismatchError"
            first, later, checked = msg.split(" || ")
            assert "unusable after an earlier failure" in checked, f"rank {rank}, {name}: Buffer.check: {checked!r}"
            for word in words + [f"rank {rank}", f"rank {world_size - 1}"]:
                assert word in first, f"rank {rank}, {name}: {word!r} not in {first!r}"
            assert "unusable after an earlier failure" in later, f"rank {rank}, {name}: {later!r}"


def _skip_body(rank, world_size, timeout_s):
    buf = _buffer(timeout_s)
    if rank == 1:
        time.sleep(timeout_s + 4)  # alive, but never calls dispatch
        return None
    start = time.monotonic()
    try:
        _dispatch(buf, rank, world_size)
    except CommTimeoutError as exc:
        return str(exc), time.monotonic() - start
    raise AssertionError("dispatch returned although rank 1 never called it")


def test_rank_skipping_a_call_times_out():
    msg, elapsed = run_distributed(_skip_body, 2, 3, timeout_s=60)[0]
    assert 2.5 <= elapsed < 3 + 4, f"waited {elapsed:.1f} s with timeout_s=3"
    assert "rank 0" in msg and "3 s" in msg and "skipped" in msg, msg


def _dead_peer_body(rank, world_size):
    buf = _buffer(20)
    dist.barrier()  # both ranks are up; then rank 1 dies
    if rank == 1:
        os._exit(1)  # dies without a word: its connections close
    start = time.monotonic()
    try:
        _dispatch(buf, rank, world_size)
    except CommError as exc:
        return type(exc).__name__, str(exc), time.monotonic() - start
    raise AssertionError("dispatch returned although rank 1 is dead")


def test_dead_peer_raises_instead_of_hanging():
    kind, msg, elapsed = run_distributed(_dead_peer_body, 2, timeout_s=90, may_exit=[1])[0]
    assert elapsed < 20 + 5, f"{kind} after {elapsed:.1f} s"
    assert "rank 0" in msg, msg


def _bad_layout_body(rank, world_size, what, check_values):
    """The last rank passes layout arguments that are not those of its topk_idx."""
    buf = _buffer(30, check_values=check_values)
    idx, w = make_routing("uniform", T, E, 2, world_size, 7, rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    if rank == world_size - 1:
        if what == "topk_idx":  # an id past num_experts on the last rank's own experts
            idx = torch.where(idx == E - 1, E, idx)
            idx[0, 0] = E
        elif what == "num_tokens_per_rank":
            per_rank = per_rank + torch.tensor([1] + [0] * (world_size - 1), dtype=torch.int32)
        elif what == "is_token_in_rank":  # token 0 sent to the ranks it does not go to
            in_rank = in_rank.clone()
            in_rank[0] = ~in_rank[0] if not in_rank[0].all() else torch.arange(world_size) == 0
            per_rank = in_rank.sum(dim=0, dtype=torch.int32)
        else:  # num_tokens_per_expert: one token moved between experts, negative counts
            per_expert = per_expert + torch.tensor([-5, 5] + [0] * (E - 2), dtype=torch.int32)
    x = torch.randn(T, H).bfloat16()
    try:
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=idx, topk_weights=w)  # fmt: skip
        msg = "no error"
    except ValueError as exc:
        msg = str(exc)
    # Every rank stopped at the same call: the next one pairs up and moves every token.
    recv_x, _, _, _, handle, _ = _dispatch(buf, rank, world_size)
    return msg, handle.num_recv_tokens


@pytest.mark.parametrize(
    "what,check_values",
    [("num_tokens_per_rank", True), ("is_token_in_rank", True), ("num_tokens_per_expert", True),
     ("topk_idx", False), ("topk_idx", True)],
)  # fmt: skip
def test_a_rank_with_a_bad_layout_stops_every_rank(what, check_values):
    """A layout that does not match topk_idx would make the peers exchange wrong sizes or drop tokens.

    Bad topk_idx values raise on every rank whether the Buffer's ``check_values`` is on or off.
    """
    out = run_distributed(_bad_layout_body, 2, what, check_values, timeout_s=120)
    own, peer = out[1][0], out[0][0]
    assert f"rank 1: {what}" in own, own
    assert "rank 0:" in peer and "rank 1 passed layout arguments" in peer, peer
    assert all(n > 0 for _, n in out)


def _bad_event_body(rank, world_size):
    buf = _buffer(30)
    if rank == 0:
        try:
            buf.get_dispatch_layout(torch.zeros(T, 2, dtype=torch.int64), E, previous_event="not an event")
        except TypeError:
            pass
        try:
            _dispatch(buf, rank, world_size, previous_event="not an event")
        except TypeError as exc:
            msg = str(exc)
    else:
        msg = None
    recv_x, _, _, _, handle, _ = _dispatch(buf, rank, world_size)  # still paired with rank 1's first call
    out, _, _ = buf.combine(recv_x, handle)
    return msg, tuple(out.shape)


def test_a_bad_previous_event_costs_no_call_number():
    out = run_distributed(_bad_event_body, 2, timeout_s=120)
    assert "previous_event" in out[0][0] and "str" in out[0][0], out[0][0]
    assert [shape for _, shape in out] == [(T, H), (T, H)]


def _foreign_ll_combine_body(rank, world_size, sum_per_rank, foreign):
    buf = _buffer(30)
    idx, w = make_routing("uniform", T, E, 2, world_size, 7, rank)
    recv, _, handle, _, _ = buf.low_latency_dispatch(torch.randn(T, H).bfloat16(), idx, M, E, use_fp8=False,
                                                     topk_weights=w)  # fmt: skip
    if rank == 1 and foreign == "topk_idx":
        idx = torch.full_like(idx, -1)
    if rank == 1 and foreign == "topk_idx written":
        idx[:, 1] = -1  # the dispatch's own tensor, edited in place before its combine
    if rank == 1 and foreign == "topk_weights":
        w = w.clone()
    if rank == 1 and foreign == "topk_weights written":
        w.mul_(2)  # the dispatch's own tensor, edited in place: its slots hold the old weights
    start = time.monotonic()
    try:
        out, _, _ = buf.low_latency_combine(recv, idx, w, handle, sum_per_rank=sum_per_rank)
        result = tuple(out.shape)
    except ValueError as exc:
        result = str(exc)
    return result, time.monotonic() - start


@pytest.mark.parametrize("sum_per_rank,foreign,words", [
    (False, "topk_idx", "topk_idx must be the dispatch's"),
    (True, "topk_idx", "topk_idx must be the dispatch's"),
    (False, "topk_idx written", "topk_idx given to low_latency_dispatch was written in place"),
    (True, "topk_idx written", "topk_idx given to low_latency_dispatch was written in place"),
    (True, "topk_weights", "topk_weights must be the tensor given to low_latency_dispatch"),
    (True, "topk_weights written", "topk_weights must be the tensor given to low_latency_dispatch, unchanged since"),
])  # fmt: skip
def test_a_foreign_low_latency_combine_argument_raises_without_stalling_the_peers(sum_per_rank, foreign, words):
    out = run_distributed(_foreign_ll_combine_body, 2, sum_per_rank, foreign, timeout_s=120)
    assert out[0][0] == (T, H) and out[0][1] < 10, out[0]
    assert words in out[1][0] and out[1][1] < 10, out[1]
