"""Ranks that disagree raise on every rank; a rank that skips a call or dies gives a bounded error."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ep_train import Buffer, CommError, CommTimeoutError, RankMismatchError
from ep_train.testing import make_routing, run_distributed

T, E = 8, 4


def _buffer(timeout_s: float) -> Buffer:
    nvl = Buffer.get_dispatch_config(2).get_nvl_buffer_size_hint(512 * 2, 2)
    return Buffer(dist.group.WORLD, num_nvl_bytes=nvl, timeout_s=timeout_s)


def _dispatch(buf, rank, hidden, num_experts):
    idx, w = make_routing("uniform", T, num_experts, 2, 2, 7, rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    return buf.dispatch(torch.randn(T, hidden).bfloat16(), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)  # fmt: skip


def _expect(fn, exc):
    start = time.monotonic()
    try:
        fn()
    except exc as e:
        return str(e), time.monotonic() - start
    raise AssertionError(f"expected {exc.__name__}")


def _mismatch_body(rank, world_size):
    buf = _buffer(30)
    msgs = []
    # Different hidden sizes.
    msgs.append(_expect(lambda: _dispatch(buf, rank, 256 if rank == 0 else 320, E), RankMismatchError)[0])
    buf = _buffer(30)  # a failed buffer refuses further calls: start a fresh one
    msgs.append(_expect(lambda: _dispatch(buf, rank, 256, E if rank == 0 else 2 * E), RankMismatchError)[0])
    buf = _buffer(30)
    recv_x, _, _, _, handle, _ = _dispatch(buf, rank, 128, E)
    if rank == 0:
        msgs.append(_expect(lambda: _dispatch(buf, rank, 128, E), RankMismatchError)[0])
    else:
        msgs.append(_expect(lambda: buf.combine(recv_x, handle), RankMismatchError)[0])
    later = _expect(lambda: _dispatch(buf, rank, 128, E), CommError)[0]
    return msgs, later


def test_disagreeing_ranks_raise_on_every_rank():
    for msgs, later in run_distributed(_mismatch_body, 2, timeout_s=120):
        assert "hidden is" in msgs[0] and "256" in msgs[0] and "320" in msgs[0], msgs[0]
        assert "num_experts" in msgs[1], msgs[1]
        assert "op is" in msgs[2] and "combine" in msgs[2] and "dispatch" in msgs[2], msgs[2]
        assert "unusable after an earlier failure" in later, later


def _skip_body(rank, world_size):
    buf = _buffer(3)
    if rank == 1:
        time.sleep(6)  # alive but never calls dispatch
        return None
    return _expect(lambda: _dispatch(buf, rank, 128, E), CommTimeoutError)


def test_rank_skipping_a_call_times_out():
    result = run_distributed(_skip_body, 2, timeout_s=60)[0]
    msg, elapsed = result
    assert elapsed < 10, f"waited {elapsed:.1f} s, bound was 3 s"
    assert "rank 0" in msg and "3 s" in msg and "skipped" in msg, msg


def _dead_peer_body(rank, world_size):
    buf = _buffer(20)
    if rank == 1:
        dist.destroy_process_group()  # the peer goes away: its connections close
        return None
    return _expect(lambda: _dispatch(buf, rank, 128, E), CommError)


def test_dead_peer_raises_instead_of_hanging():
    msg, elapsed = run_distributed(_dead_peer_body, 2, timeout_s=60)[0]
    assert elapsed < 25, f"took {elapsed:.1f} s"
    assert "rank 0" in msg, msg
