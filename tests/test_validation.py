"""Bad input gets an error of the right type whose message names the argument.

Most checks are local, so they run in this process on a 1-rank gloo group; the checks that need
several ranks (num_experts not divisible by the group size, errors every rank must raise alike) run
on 2 ranks through the launcher.  Each case is one pytest id: a failure names the argument.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import ep_train.autograd as ep_autograd
from ep_train import Buffer, Config, MoEDispatcher, get_combine_config, get_dispatch_config
from ep_train.fp8 import quantize_fp8
from ep_train.testing import make_routing, run_distributed

T, H, E, K, M = 6, 256, 4, 2, 8


@contextlib.contextmanager
def raises_naming(exc: type[BaseException], *words: str):
    """The block raises ``exc`` (or a subclass) and the message contains every word."""
    with pytest.raises(exc) as info:
        yield info
    for word in words:
        assert word in str(info.value), f"message does not name {word!r}: {info.value}"


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        pytest.skip("this process already has a default process group")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        yield dist.group.WORLD
        dist.destroy_process_group()


@pytest.fixture()
def ctx(group):
    """A fresh low-latency-capable buffer, valid inputs, a dispatch handle and a low-latency handle."""
    nvl = Buffer.get_dispatch_config(1).get_nvl_buffer_size_hint(H * 8, 1)
    rdma = Buffer.get_low_latency_rdma_size_hint(M, H, 1, E)
    buf = Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, timeout_s=10)
    idx = torch.tensor([[0, 1], [2, -1], [3, 0], [-1, -1], [1, 2], [0, 3]])
    x, w = torch.randn(T, H).bfloat16(), torch.rand(T, K)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    lay = {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    ll_x, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    yield SimpleNamespace(buf=buf, x=x, idx=idx, w=w, lay=lay, recv_x=recv_x, recv_w=recv_w, handle=handle,
                          ll_x=ll_x, ll_handle=ll_handle)  # fmt: skip
    buf.destroy()


def _dispatch(c, **over):
    args = {"x": c.x, "topk_idx": c.idx, "topk_weights": c.w, **c.lay, **over}
    return c.buf.dispatch(**args)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _strided(t):
    return torch.empty((t.shape[1], t.shape[0]), dtype=t.dtype).t()


_fp8 = lambda c: quantize_fp8(c.x)  # noqa: E731

# (id, call on the ctx, exception type, words the message must contain)
CASES = [
    ("x-dtype", lambda c: _dispatch(c, x=c.x.int()), TypeError, ["x", "dtype", "torch.int32"]),
    ("x-ndim", lambda c: _dispatch(c, x=c.x[None]), ValueError, ["x", "2-D"]),
    ("x-contiguous", lambda c: _dispatch(c, x=_strided(c.x)), ValueError, ["x", "contiguous"]),
    ("x-device", lambda c: _dispatch(c, x=_meta(c.x)), ValueError, ["x", "device", "meta"]),
    ("x-type", lambda c: _dispatch(c, x=c.x.tolist()), ValueError, ["x", "tuple"]),
    ("x-rows-vs-topk_idx", lambda c: _dispatch(c, x=c.x[:4]), ValueError, ["x has 4 rows", "topk_idx has 6"]),
    ("topk_idx-dtype", lambda c: _dispatch(c, topk_idx=c.idx.int()), TypeError, ["topk_idx", "int64"]),
    ("topk_idx-ndim", lambda c: _dispatch(c, topk_idx=c.idx[:, 0]), ValueError, ["topk_idx", "2-D"]),
    ("topk_idx-contiguous", lambda c: _dispatch(c, topk_idx=_strided(c.idx)), ValueError, ["topk_idx", "contiguous"]),
    ("topk_idx-device", lambda c: _dispatch(c, topk_idx=_meta(c.idx)), ValueError, ["topk_idx", "device"]),
    (
        "topk_idx-too-large",
        lambda c: _dispatch(c, topk_idx=torch.where(c.idx == 3, 4, c.idx)),
        ValueError,
        ["topk_idx", "num_experts=4", "found 4"],
    ),
    (
        "topk_idx-below-minus-one",
        lambda c: _dispatch(c, topk_idx=torch.where(c.idx == -1, -2, c.idx)),
        ValueError,
        ["topk_idx", "found -2"],
    ),
    (
        "topk_idx-columns",
        lambda c: _dispatch(c, topk_idx=c.idx.repeat(1, 9), topk_weights=None),
        ValueError,
        ["topk_idx", "columns"],
    ),
    (
        "topk_idx-repeats-an-expert",
        lambda c: _dispatch(c, topk_idx=torch.where(c.idx == 3, 0, c.idx)),
        ValueError,
        ["topk_idx row 2", "expert 0 more than once", "[0, 0]"],
    ),
    (
        "ll-topk_idx-repeats-an-expert",
        lambda c: c.buf.low_latency_dispatch(c.x, torch.where(c.idx == 1, 0, c.idx), M, E, use_fp8=False),
        ValueError,
        ["topk_idx row 0", "expert 0 more than once"],
    ),
    (
        "num_tokens_per_rank-vs-is_token_in_rank",
        lambda c: _dispatch(c, num_tokens_per_rank=c.lay["num_tokens_per_rank"] + 1),
        ValueError,
        ["num_tokens_per_rank [6]", "column sums [5]"],
    ),
    (
        "is_token_in_rank-not-of-topk_idx",
        lambda c: _dispatch(
            c, num_tokens_per_rank=c.lay["num_tokens_per_rank"] + 1, is_token_in_rank=torch.ones(T, 1, dtype=torch.bool)
        ),
        ValueError,
        ["is_token_in_rank row 3", "[True]", "[-1, -1]", "ranks []"],
    ),  # fmt: skip
    (
        "num_tokens_per_expert-not-of-topk_idx",
        lambda c: _dispatch(
            c, num_tokens_per_expert=c.lay["num_tokens_per_expert"] + torch.tensor([-2, 2, 0, 0], dtype=torch.int32)
        ),
        ValueError,
        ["num_tokens_per_expert[0] is 1", "sends 3 tokens"],
    ),
    (
        "previous_event-type-layout",
        lambda c: c.buf.get_dispatch_layout(c.idx, E, previous_event="event"),
        TypeError,
        ["previous_event", "str"],
    ),
    (
        "autograd-dispatch-topk_weights-missing",
        lambda c: ep_autograd.dispatch(c.buf, c.x, c.idx, None, E),
        TypeError,
        ["topk_weights", "NoneType"],
    ),
    (
        "autograd-combine-handle-missing",
        lambda c: ep_autograd.combine(c.buf, c.recv_x, None),
        TypeError,
        ["handle", "DispatchHandle", "NoneType"],
    ),
    ("moe-dispatcher-num_experts", lambda c: MoEDispatcher(c.buf, 4.0), TypeError, ["num_experts", "float", "4.0"]),
    (
        "moe-dispatcher-combine-handle",
        lambda c: MoEDispatcher(c.buf, E).combine(c.recv_x, c.handle),
        TypeError,
        ["handle", "MoEHandle", "DispatchHandle"],
    ),
    (
        "ll-dispatch-hook-called-twice",
        lambda c: [
            hook()
            for hook in [c.buf.low_latency_dispatch(c.x, c.idx, M, E, use_fp8=False, return_recv_hook=True)[4]] * 2
        ],
        RuntimeError,
        ["receive hook", "already called"],
    ),  # fmt: skip
    ("topk_weights-dtype", lambda c: _dispatch(c, topk_weights=c.w.half()), TypeError, ["topk_weights", "float32"]),
    (
        "topk_weights-shape",
        lambda c: _dispatch(c, topk_weights=c.w[:, :1].contiguous()),
        ValueError,
        ["topk_weights", "shape"],
    ),
    ("topk_weights-device", lambda c: _dispatch(c, topk_weights=_meta(c.w)), ValueError, ["topk_weights", "device"]),
    ("topk_weights-without-topk_idx", lambda c: _dispatch(c, topk_idx=None), ValueError, ["topk_weights", "topk_idx"]),
    (
        "is_token_in_rank-shape",
        lambda c: _dispatch(c, is_token_in_rank=c.lay["is_token_in_rank"][:3]),
        ValueError,
        ["is_token_in_rank", "shape"],
    ),
    (
        "is_token_in_rank-dtype",
        lambda c: _dispatch(c, is_token_in_rank=c.lay["is_token_in_rank"].int()),
        TypeError,
        ["is_token_in_rank", "bool"],
    ),
    (
        "num_tokens_per_rank-missing",
        lambda c: _dispatch(c, num_tokens_per_rank=None),
        ValueError,
        ["num_tokens_per_rank"],
    ),
    (
        "num_tokens_per_rank-dtype",
        lambda c: _dispatch(c, num_tokens_per_rank=c.lay["num_tokens_per_rank"].long()),
        TypeError,
        ["num_tokens_per_rank", "int32"],
    ),
    (
        "num_tokens_per_expert-missing",
        lambda c: _dispatch(c, num_tokens_per_expert=None),
        ValueError,
        ["num_tokens_per_expert"],
    ),
    (
        "num_tokens_per_expert-dtype",
        lambda c: _dispatch(c, num_tokens_per_expert=c.lay["num_tokens_per_expert"].float()),
        TypeError,
        ["num_tokens_per_expert", "int32"],
    ),
    (
        "num_tokens_per_rdma_rank",
        lambda c: _dispatch(c, num_tokens_per_rdma_rank=c.lay["num_tokens_per_rank"]),
        ValueError,
        ["num_tokens_per_rdma_rank"],
    ),
    ("expert_alignment-zero", lambda c: _dispatch(c, expert_alignment=0), ValueError, ["expert_alignment", ">= 1"]),
    ("expert_alignment-type", lambda c: _dispatch(c, expert_alignment=4.0), TypeError, ["expert_alignment", "int"]),
    ("num_worst_tokens-negative", lambda c: _dispatch(c, num_worst_tokens=-1), ValueError, ["num_worst_tokens"]),
    (
        "num_worst_tokens-too-small",
        lambda c: _dispatch(c, num_worst_tokens=2),
        ValueError,
        ["num_worst_tokens=2", "5 rows"],
    ),
    ("config-type", lambda c: _dispatch(c, config={"num_sms": 24}), TypeError, ["config", "Config"]),
    ("previous_event-type", lambda c: _dispatch(c, previous_event=object()), TypeError, ["previous_event"]),
    (
        "fp8-scales-shape",
        lambda c: _dispatch(c, x=(_fp8(c)[0], _fp8(c)[1][:, :1].contiguous())),
        ValueError,
        ["x[1]", "FP8 scales", "shape", f"({T}, 2)"],
    ),
    ("fp8-scales-dtype", lambda c: _dispatch(c, x=(_fp8(c)[0], _fp8(c)[1].double())), TypeError, ["x[1]", "float32"]),
    ("fp8-values-dtype", lambda c: _dispatch(c, x=(c.x, _fp8(c)[1])), TypeError, ["x[0]", "float8_e4m3fn"]),
    ("fp8-tuple-length", lambda c: _dispatch(c, x=(*_fp8(c), _fp8(c)[1])), ValueError, ["x", "3 items"]),
    ("layout-num_experts-zero", lambda c: c.buf.get_dispatch_layout(c.idx, 0), ValueError, ["num_experts", ">= 1"]),
    ("layout-num_experts-type", lambda c: c.buf.get_dispatch_layout(c.idx, 4.0), TypeError, ["num_experts"]),
    (
        "layout-topk_idx-range",
        lambda c: c.buf.get_dispatch_layout(c.idx, 3),
        ValueError,
        ["topk_idx", "num_experts=3", "found 3"],
    ),
    (
        "cached-hidden",
        lambda c: c.buf.dispatch(torch.randn(T, H + 2).bfloat16(), handle=c.handle),
        ValueError,
        ["x", "cached handle", f"({T}, {H})", f"({T}, {H + 2})"],
    ),
    (
        "cached-tokens",
        lambda c: c.buf.dispatch(torch.randn(T + 1, H).bfloat16(), handle=c.handle),
        ValueError,
        ["x", "cached handle", f"({T + 1}, {H})"],
    ),
    (
        "cached-topk_idx",
        lambda c: c.buf.dispatch(c.x, handle=c.handle, topk_idx=c.idx),
        ValueError,
        ["topk_idx", "cached"],
    ),
    (
        "cached-num_worst_tokens",
        lambda c: c.buf.dispatch(c.x, handle=c.handle, num_worst_tokens=99),
        ValueError,
        ["num_worst_tokens=99", "cached handle"],
    ),
    ("cached-handle-type", lambda c: c.buf.dispatch(c.x, handle=(1, 2, 3)), TypeError, ["handle", "DispatchHandle"]),
    ("combine-x-rows", lambda c: c.buf.combine(c.recv_x[:-1], c.handle), ValueError, ["x", "shape"]),
    ("combine-x-dtype", lambda c: c.buf.combine(c.recv_x.int(), c.handle), TypeError, ["x", "dtype"]),
    ("combine-x-contiguous", lambda c: c.buf.combine(_strided(c.recv_x), c.handle), ValueError, ["x", "contiguous"]),
    ("combine-x-device", lambda c: c.buf.combine(_meta(c.recv_x), c.handle), ValueError, ["x", "device"]),
    ("combine-handle-type", lambda c: c.buf.combine(c.recv_x, c.ll_handle), TypeError, ["handle", "DispatchHandle"]),
    (
        "combine-bias-shape",
        lambda c: c.buf.combine(c.recv_x, c.handle, bias=torch.zeros(T + 1, H).bfloat16()),
        ValueError,
        ["bias[0]", "shape"],
    ),
    (
        "combine-bias-dtype",
        lambda c: c.buf.combine(c.recv_x, c.handle, bias=(c.x, c.x.float())),
        TypeError,
        ["bias[1]", "bfloat16"],
    ),
    (
        "combine-bias-count",
        lambda c: c.buf.combine(c.recv_x, c.handle, bias=(c.x, c.x, c.x)),
        ValueError,
        ["bias", "3 tensors"],
    ),
    (
        "combine-topk_weights-dtype",
        lambda c: c.buf.combine(c.recv_x, c.handle, topk_weights=c.recv_w.long()),
        TypeError,
        ["topk_weights", "float32"],
    ),
    (
        "combine-topk_weights-rows",
        lambda c: c.buf.combine(c.recv_x, c.handle, topk_weights=c.recv_w[:-1]),
        ValueError,
        ["topk_weights", "shape"],
    ),
    ("combine-config", lambda c: c.buf.combine(c.recv_x, c.handle, config=24), TypeError, ["config", "Config"]),
    (
        "ll-too-many-tokens",
        lambda c: c.buf.low_latency_dispatch(c.x, c.idx, 4, E),
        ValueError,
        ["num_max_dispatch_tokens_per_rank=4", f"{T} tokens"],
    ),
    (
        "ll-max-tokens-zero",
        lambda c: c.buf.low_latency_dispatch(c.x, c.idx, 0, E),
        ValueError,
        ["num_max_dispatch_tokens_per_rank", ">= 1"],
    ),
    (
        "ll-rdma-too-small",
        lambda c: c.buf.low_latency_dispatch(c.x, c.idx, 4096, E),
        ValueError,
        ["num_rdma_bytes", "get_low_latency_rdma_size_hint"],
    ),
    ("ll-use_ue8m0", lambda c: c.buf.low_latency_dispatch(c.x, c.idx, M, E, use_ue8m0=True), ValueError, ["use_ue8m0"]),
    ("ll-x-dtype", lambda c: c.buf.low_latency_dispatch(c.x.int(), c.idx, M, E), TypeError, ["x", "dtype"]),
    ("ll-x-device", lambda c: c.buf.low_latency_dispatch(_meta(c.x), c.idx, M, E), ValueError, ["x", "device"]),
    (
        "ll-topk_idx-rows",
        lambda c: c.buf.low_latency_dispatch(c.x, c.idx[:4], M, E),
        ValueError,
        ["topk_idx", "shape", f"({T}, *)"],
    ),
    (
        "ll-topk_idx-range",
        lambda c: c.buf.low_latency_dispatch(c.x, c.idx * 2, M, E),
        ValueError,
        ["topk_idx", "num_experts=4"],
    ),
    (
        "ll-topk_weights-shape",
        lambda c: c.buf.low_latency_dispatch(c.x, c.idx, M, E, topk_weights=c.w[:3]),
        ValueError,
        ["topk_weights", "shape"],
    ),
    (
        "ll-stats-shape",
        lambda c: c.buf.low_latency_dispatch(
            c.x, c.idx, M, E, cumulative_local_expert_recv_stats=torch.zeros(E + 1, dtype=torch.int32)
        ),
        ValueError,
        ["cumulative_local_expert_recv_stats", "shape"],
    ),
    (
        "ll-stats-dtype",
        lambda c: c.buf.low_latency_dispatch(c.x, c.idx, M, E, cumulative_local_expert_recv_stats=torch.zeros(E)),
        TypeError,
        ["cumulative_local_expert_recv_stats", "int32"],
    ),
    (
        "ll-combine-x-shape",
        lambda c: c.buf.low_latency_combine(c.ll_x[:, :3], c.idx, c.w, c.ll_handle),
        ValueError,
        ["x", "shape"],
    ),
    (
        "ll-combine-topk_weights",
        lambda c: c.buf.low_latency_combine(c.ll_x, c.idx, c.w[:, :1].contiguous(), c.ll_handle),
        ValueError,
        ["topk_weights"],
    ),
    (
        "ll-combine-topk_idx-dtype",
        lambda c: c.buf.low_latency_combine(c.ll_x, c.idx.int(), c.w, c.ll_handle),
        TypeError,
        ["topk_idx", "int64"],
    ),
    (
        "ll-combine-handle-type",
        lambda c: c.buf.low_latency_combine(c.ll_x, c.idx, c.w, c.handle),
        TypeError,
        ["handle", "LowLatencyHandle"],
    ),
    (
        "ll-use_fp8-not-a-bool",
        lambda c: c.buf.low_latency_dispatch(c.x, c.idx, M, E, use_fp8="no"),
        ValueError,
        ["use_fp8 must be True or False", "'no'"],
    ),
    (
        "ll-combine-sum_per_rank-not-a-bool",
        lambda c: c.buf.low_latency_combine(c.ll_x, c.idx, c.w, c.ll_handle, sum_per_rank=1),
        ValueError,
        ["sum_per_rank must be True or False"],
    ),
    (
        "ll-combine-use_logfmt",
        lambda c: c.buf.low_latency_combine(c.ll_x, c.idx, c.w, c.ll_handle, use_logfmt=True),
        ValueError,
        ["use_logfmt"],
    ),
    (
        "ll-combine-topk_idx-not-the-dispatch's",
        lambda c: c.buf.low_latency_combine(c.ll_x, torch.where(c.idx == 2, -1, c.idx), c.w, c.ll_handle),
        ValueError,
        ["topk_idx must be the dispatch's", "row 1 is [-1, -1]", "sent [2, -1]"],
    ),
    (
        "ll-combine-out-shape",
        lambda c: c.buf.low_latency_combine(c.ll_x, c.idx, c.w, c.ll_handle, out=c.x[:2]),
        ValueError,
        ["out", "shape"],
    ),
    (
        "ll-combine-out-dtype",
        lambda c: c.buf.low_latency_combine(c.ll_x, c.idx, c.w, c.ll_handle, out=c.x.float()),
        TypeError,
        ["out", "bfloat16"],
    ),
]


@pytest.mark.parametrize("call, exc, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_named(ctx, call, exc, words):
    with raises_naming(exc, *words):
        call(ctx)


def test_buffer_too_small_and_buffer_arguments(ctx, group):
    x, idx = ctx.x, ctx.idx
    need = Buffer.get_dispatch_config(1).get_nvl_buffer_size_hint(H * 2, 1)
    small = Buffer(group, num_nvl_bytes=need - 1)
    per_rank, _, per_expert, in_rank, _ = small.get_dispatch_layout(idx, E)
    with raises_naming(ValueError, f"num_nvl_bytes={need - 1}", f"needs >= {need}", "get_nvl_buffer_size_hint"):
        small.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                       topk_idx=idx)  # fmt: skip
    with raises_naming(ValueError, "num_nvl_bytes", "combine"):
        Buffer(group, num_nvl_bytes=1024).combine(ctx.recv_x, ctx.handle)
    with raises_naming(ValueError, "low_latency_mode"):
        small.low_latency_dispatch(x, idx, M, E)
    with raises_naming(ValueError, "num_rdma_bytes=0", "get_low_latency_rdma_size_hint"):
        Buffer(group, low_latency_mode=True).low_latency_dispatch(x, idx, M, E)
    with raises_naming(ValueError, "num_sms", "7"):
        small.set_num_sms(7)
    for kwargs, exc, words in [
        ({"timeout_s": 0}, ValueError, ["timeout_s"]),
        ({"timeout_s": "10"}, ValueError, ["timeout_s"]),
        ({"timeout_s": True}, ValueError, ["timeout_s"]),
        ({"backend": "mpi"}, ValueError, ["backend", "mpi"]),
        ({"backend": "cuda"}, ValueError, ["backend='cuda'", "cpu"]),
        ({"num_nvl_bytes": -1}, ValueError, ["num_nvl_bytes", ">= 0"]),
        ({"num_rdma_bytes": 1.5}, TypeError, ["num_rdma_bytes", "int"]),
        ({"num_qps_per_rank": 0}, ValueError, ["num_qps_per_rank"]),
        ({"num_sms": 3}, ValueError, ["num_sms", "3"]),
        ({"timeout_s": float("nan")}, ValueError, ["timeout_s", "finite", "nan"]),
        ({"timeout_s": float("inf")}, ValueError, ["timeout_s", "finite", "inf"]),
        ({"low_latency_mode": "no"}, ValueError, ["low_latency_mode must be True or False", "'no'"]),
        ({"check_values": "no"}, ValueError, ["check_values must be True or False", "'no'"]),
    ]:
        with raises_naming(exc, *words):
            Buffer(group, **kwargs)


AFTER_DESTROY = {
    "get_dispatch_layout": lambda c: c.buf.get_dispatch_layout(c.idx, E),
    "dispatch": lambda c: _dispatch(c),
    "cached-dispatch": lambda c: c.buf.dispatch(c.x, handle=c.handle),
    "combine": lambda c: c.buf.combine(c.recv_x, c.handle),
    "low_latency_dispatch": lambda c: c.buf.low_latency_dispatch(c.x, c.idx, M, E),
    "low_latency_combine": lambda c: c.buf.low_latency_combine(c.ll_x, c.idx, c.w, c.ll_handle),
}


@pytest.mark.parametrize("call", list(AFTER_DESTROY.values()), ids=list(AFTER_DESTROY))
def test_destroyed_buffer_refuses_every_call(ctx, call):
    ctx.buf.destroy()
    with raises_naming(RuntimeError, "destroyed"):
        call(ctx)
    ctx.buf.destroy()  # a second destroy is harmless


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_sms": 3}, ["Config.num_sms", "3"]),
        ({"num_sms": 0}, ["Config.num_sms"]),
        ({"num_sms": 24.0}, ["Config.num_sms"]),
        ({"num_max_nvl_chunked_send_tokens": 0}, ["num_max_nvl_chunked_send_tokens"]),
        ({"num_max_nvl_chunked_send_tokens": 8, "num_max_nvl_chunked_recv_tokens": 8},
         ["num_max_nvl_chunked_recv_tokens", "16"]),
    ],
)  # fmt: skip
def test_bad_config(kwargs, words):
    with raises_naming(ValueError, *words):
        Config(**kwargs)


@pytest.mark.parametrize("fn", [get_dispatch_config, get_combine_config])
@pytest.mark.parametrize("num_ranks", [0, -2, "4"])
def test_default_config_needs_a_rank_count(fn, num_ranks):
    with raises_naming(ValueError, "num_ranks"):
        fn(num_ranks)


def _two_rank_body(rank, world_size):
    """Checks that need a group of 2: every rank must raise the same error."""
    idx, w = make_routing("uniform", T, 6, 2, 2, 3, rank)
    x = torch.randn(T, H).bfloat16()
    nvl = Buffer.get_dispatch_config(2).get_nvl_buffer_size_hint(H * 2, 2)
    rdma = Buffer.get_low_latency_rdma_size_hint(M, H, 2, 6)
    buf = Buffer(dist.group.WORLD, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, timeout_s=30)
    seen = []
    for call in (
        lambda: buf.get_dispatch_layout(idx.clamp(max=4), 5),
        lambda: buf.low_latency_dispatch(x, idx.clamp(max=2), M, 3),
    ):  # fmt: skip
        with raises_naming(ValueError, "num_experts=", "divisible by the group size 2") as info:
            call()
        seen.append(str(info.value))
    # The dispatch takes num_experts from num_tokens_per_expert's length: the message names it.
    with raises_naming(ValueError, "num_tokens_per_expert has 7 entries", "group size 2") as info:
        buf.dispatch(x, num_tokens_per_rank=torch.zeros(2, dtype=torch.int32),
                     is_token_in_rank=torch.zeros(T, 2, dtype=torch.bool),
                     num_tokens_per_expert=torch.zeros(7, dtype=torch.int32), topk_idx=idx.clamp(max=6))  # fmt: skip
    seen.append(str(info.value))
    # Every rank raises when one rank receives more rows than num_worst_tokens allows.
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 6)
    with raises_naming(ValueError, "num_worst_tokens=1", "rows rank"):
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=idx, topk_weights=w, num_worst_tokens=1)  # fmt: skip
    # A handle of another rank is refused, by combine and by a cached dispatch, before any exchange.
    lay = {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    foreign = dataclasses.replace(handle, rank=1 - rank)
    with raises_naming(ValueError, f"handle belongs to rank {1 - rank} of 2", f"this buffer is rank {rank} of 2"):
        buf.combine(recv_x, foreign)
    with raises_naming(ValueError, f"handle belongs to rank {1 - rank} of 2"):
        buf.dispatch(x, handle=foreign)
    out, _, _ = buf.combine(recv_x, handle)  # the refusals cost no call number: the ranks are still in step
    assert out.shape == x.shape
    return seen


def _unchecked_ids_body(rank, world_size):
    """With check_values=False the Buffer leaves topk_idx values to the backend: the torch backend
    still refuses ids outside [-1, E) on every rank, and drops no token.  Rank 0 holds the bad id."""
    idx, w = make_routing("uniform", T, E, K, 2, 5, rank)
    if rank == 0:
        idx[1, 0] = E + 1
    x = torch.randn(T, H).bfloat16()
    nvl = Buffer.get_dispatch_config(2).get_nvl_buffer_size_hint(H * 2, 2)
    rdma = Buffer.get_low_latency_rdma_size_hint(M, H, 2, E)
    buf = Buffer(dist.group.WORLD, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, timeout_s=30,
                 check_values=False)  # fmt: skip
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    assert per_expert.shape == (E,), "one count per expert whatever the ids"
    mine = [f"{E + 1}", "topk_idx"] if rank == 0 else ["stopped on every rank", "rank 0"]
    with raises_naming(ValueError, *mine):
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=idx, topk_weights=w)  # fmt: skip
    ll_idx = idx.clone()
    if rank == 0:
        ll_idx[1, 0] = -5
    mine = ["-5", "topk_idx"] if rank == 0 else ["stopped on every rank", "rank 0", f"[-1, {E})"]
    with raises_naming(ValueError, *mine):
        buf.low_latency_dispatch(x, ll_idx, M, E)
    return True


def test_unchecked_expert_ids_are_refused_on_every_rank():
    assert all(run_distributed(_unchecked_ids_body, 2, timeout_s=120))


def test_handles_of_another_buffer_are_refused(ctx, group):
    """Calls are numbered per Buffer: another Buffer's handle could match this one's call numbers,
    so every call that takes a handle refuses it (before taking a call number)."""
    nvl = Buffer.get_dispatch_config(1).get_nvl_buffer_size_hint(H * 8, 1)
    rdma = Buffer.get_low_latency_rdma_size_hint(M, H, 1, E)
    other = Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, timeout_s=10)
    try:
        with raises_naming(ValueError, "combine: handle comes from another Buffer"):
            other.combine(ctx.recv_x, ctx.handle)
        with raises_naming(ValueError, "cached dispatch: handle comes from another Buffer"):
            other.dispatch(ctx.x, handle=ctx.handle)
        with raises_naming(ValueError, "low_latency_combine: handle comes from another Buffer", "low_latency_dispatch"):
            other.low_latency_combine(ctx.ll_x, ctx.idx, ctx.w, ctx.ll_handle)
        # Refused without a trace: the other buffer's own calls still pair up, and ctx's handle still works.
        assert other.dispatch(ctx.x, **ctx.lay, topk_idx=ctx.idx)[0].shape == ctx.recv_x.shape
        assert ctx.buf.combine(ctx.recv_x, ctx.handle)[0].shape == ctx.x.shape
    finally:
        other.destroy()
    with raises_naming(TypeError, "bias must be a tensor, a pair of tensors or None", "int"):
        ctx.buf.combine(ctx.recv_x, ctx.handle, bias=5)


def test_low_latency_combine_waits_for_the_receive_hook(ctx):
    ll_x, _, handle, _, hook = ctx.buf.low_latency_dispatch(ctx.x, ctx.idx, M, E, use_fp8=False,
                                                            return_recv_hook=True)  # fmt: skip
    with raises_naming(ValueError, "receive hook has not been called", "call it first"):
        ctx.buf.low_latency_combine(ll_x, ctx.idx, ctx.w, handle)
    hook()
    want = ctx.buf.low_latency_combine(ctx.ll_x, ctx.idx, ctx.w, ctx.ll_handle)[0]
    assert torch.equal(ctx.buf.low_latency_combine(ll_x, ctx.idx, ctx.w, handle)[0], want)


def test_flags_must_be_bools(ctx):
    with raises_naming(ValueError, "expert_major must be True or False", "'False'"):
        _dispatch(ctx, expert_major="False")
    with raises_naming(ValueError, "fp8 must be True or False", "'no'"):
        MoEDispatcher(ctx.buf, E, fp8="no")
    with raises_naming(ValueError, "fused_permutation must be True or False"):
        MoEDispatcher(ctx.buf, E, fused_permutation=1)


def test_errors_that_need_two_ranks():
    for seen in run_distributed(_two_rank_body, 2, timeout_s=120):
        assert [m.split("num_experts=")[1].split()[0] for m in seen[:2]] == ["5", "3"], seen
        assert "has 7 entries" in seen[2], seen


def test_topk_values_rechecked_after_an_in_place_change(ctx):
    """The layout call and the dispatch share one value check, unless the tensor changed in between."""
    idx = ctx.idx.clone()
    per_rank, _, per_expert, in_rank, _ = ctx.buf.get_dispatch_layout(idx, E)
    idx[1, 1] = E  # after the layout checked it
    with raises_naming(ValueError, "topk_idx", f"num_experts={E}", str(E)):
        ctx.buf.dispatch(ctx.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                         num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=ctx.w)  # fmt: skip
    idx[1, 1] = -2
    with raises_naming(ValueError, "topk_idx", "-2"):
        ctx.buf.get_dispatch_layout(idx, E)


def test_topk_values_checked_once_per_layout_and_dispatch(ctx, monkeypatch):
    """get_dispatch_layout checks the values; the dispatch of the same tensor does not check them again."""
    import ep_train.backends.torch_backend as torch_backend
    import ep_train.buffer as buffer_module
    from ep_train.validate import check_topk_idx_values

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return check_topk_idx_values(*args, **kwargs)

    monkeypatch.setattr(buffer_module, "check_topk_idx_values", counted)
    monkeypatch.setattr(torch_backend, "check_topk_idx_values", counted)
    idx = ctx.idx.clone()
    per_rank, _, per_expert, in_rank, _ = ctx.buf.get_dispatch_layout(idx, E)
    ctx.buf.dispatch(ctx.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                     num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=ctx.w)  # fmt: skip
    assert calls == ["topk_idx"], calls
    ctx.buf.dispatch(ctx.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                     num_tokens_per_expert=per_expert, topk_idx=idx.clone(), topk_weights=ctx.w)  # fmt: skip
    assert calls == ["topk_idx"] * 2, calls  # a new tensor: checked once, by the backend's verdict


@pytest.mark.parametrize("check_values", [True, False])
def test_buffer_pool_passes_check_values(group, monkeypatch, check_values):
    """A BufferPool's check_values reaches its buffers: off, the Buffer runs no value check of its own.

    (The torch backend still checks in its collective verdict: its exchange needs valid values, and
    the check costs it nothing extra.  The CUDA backend leaves the check to the Buffer.)
    """
    import ep_train.backends.torch_backend as torch_backend
    import ep_train.buffer as buffer_module
    from ep_train.buffer_pool import BufferPool

    calls = []
    monkeypatch.setattr(buffer_module, "check_topk_idx_values", lambda *a, **k: calls.append("buffer"))
    monkeypatch.setattr(torch_backend, "check_topk_idx_values", lambda *a, **k: calls.append("backend"))
    assert BufferPool().check_values is False  # the default: the adapters build topk_idx from a top-k
    buf = BufferPool(backend="torch", check_values=check_values).get(group, H)
    try:
        assert buf.check_values is check_values
        idx = torch.tensor([[0, 1], [2, -1], [3, 0], [-1, -1], [1, 2], [0, 3]])
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        buf.dispatch(torch.randn(T, H).bfloat16(), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                     num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=torch.rand(T, K))  # fmt: skip
        assert calls == (["buffer"] if check_values else ["backend"]), calls
    finally:
        buf.destroy()


def test_buffer_pool_takes_none_as_the_default_group(group):
    from ep_train.buffer_pool import BufferPool

    pool = BufferPool(backend="torch")
    buf = pool.get(None, H)
    try:
        assert pool.get(None, H) is buf and pool.get(group, H) is buf, "one buffer for the default group"
        with raises_naming(TypeError, "configs must be a sequence", "one Config"):
            pool.get(group, H, configs=get_dispatch_config(1))
        with raises_naming(ValueError, "check_values must be True or False"):
            BufferPool(check_values="no")
        with raises_naming(ValueError, "hidden", "-64"):
            pool.get(group, -64)
        with raises_naming(TypeError, "hidden", "float"):
            pool.get(group, 64.0)
        with raises_naming(ValueError, "element_size", "-2"):
            pool.get(group, 64, element_size=-2)
    finally:
        buf.destroy()


def test_reference_moe_helpers_check_their_inputs():
    from ep_train.moe import GroupedExperts, TopKRouter, grouped_matmul, grouped_mlp

    router = TopKRouter(8, 4, 2)
    idx, weights, aux = router(torch.zeros(0, 8))  # no tokens: empty routing, a zero loss
    assert idx.shape == (0, 2) and weights.shape == (0, 2) and float(aux.detach()) == 0.0
    with raises_naming(TypeError, "top_k", "2.0"):
        TopKRouter(8, 4, 2.0)
    with raises_naming(ValueError, "hidden", "0"):
        TopKRouter(0, 4, 2)
    x = torch.randn(5, 8)
    with raises_naming(ValueError, "grouped_matmul takes x [P, D] and w [L, D, F]", "(2, 8)"):
        grouped_matmul(x, torch.randn(2, 8), [2, 3])
    with raises_naming(ValueError, "tokens_per_expert must be a 1-D integer tensor", "float32"):
        grouped_matmul(x, torch.randn(2, 8, 4), torch.tensor([2.5, 2.5]))
    with raises_naming(ValueError, "probs_P must be a [P] tensor", "(1,)"):
        GroupedExperts(2, 8, 4)(x, [2, 3], torch.ones(1))
    with raises_naming(ValueError, "w1 must be [L, D, 2F]", "(2, 8, 7)"):
        grouped_mlp(x, [2, 3], torch.randn(2, 8, 7), torch.randn(2, 3, 8))


def test_autograd_entry_points_name_a_wrong_buffer_or_rows(ctx):
    with raises_naming(TypeError, "buffer must be an ep_train.Buffer", "NoneType"):
        ep_autograd.dispatch(None, ctx.x, ctx.idx, ctx.w, E)
    with raises_naming(TypeError, "buffer must be an ep_train.Buffer", "NoneType"):
        ep_autograd.combine(None, ctx.recv_x, ctx.handle)
    with raises_naming(TypeError, "bias must be a tensor, a pair of tensors or None", "int"):
        ep_autograd.combine(ctx.buf, ctx.recv_x, ctx.handle, bias=5)
    fused = ep_autograd.dispatch_to_experts(ctx.buf, ctx.x, ctx.idx, ctx.w, E)
    with raises_naming(TypeError, "y must be a [P, H] tensor", "list"):
        ep_autograd.combine_from_experts(ctx.buf, [1.0], fused.handle)
    with raises_naming(TypeError, "buffer must be an ep_train.Buffer", "str"):
        ep_autograd.dispatch_to_experts("buf", ctx.x, ctx.idx, ctx.w, E)


def test_set_num_sms_keeps_the_chunk_sizes(ctx):
    """set_num_sms changes the SM count of both default configs and nothing else."""
    d, c = ctx.buf._dispatch_config, ctx.buf._combine_config
    ctx.buf.set_num_sms(12)
    assert ctx.buf._dispatch_config == Config(12, *dataclasses.astuple(d)[1:])
    assert ctx.buf._combine_config == Config(12, *dataclasses.astuple(c)[1:])
    assert ctx.buf.num_sms == 12


def test_dispatch_in_inference_mode(ctx):
    """Inference tensors have no version counter: the once-per-tensor value check must not need one."""
    with torch.inference_mode():
        idx, x, w = ctx.idx.clone(), ctx.x.clone(), ctx.w.clone()
        per_rank, _, per_expert, in_rank, _ = ctx.buf.get_dispatch_layout(idx, E)
        layout = {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}
        recv_x = ctx.buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)[0]
    assert torch.equal(recv_x, ctx.recv_x)
    bad = torch.full_like(ctx.idx, E)
    with torch.inference_mode(), raises_naming(ValueError, "topk_idx"):
        ctx.buf.get_dispatch_layout(bad, E)


def test_buffer_pool_sizes_its_buffers_for_its_sm_count(group):
    """A pool's buffers hold the NVLink rings of its SM count (more SMs, more channels), at creation
    and after set_num_sms; a buffer too small for a new count is made again by the next get."""
    from ep_train.buffer_pool import BufferPool

    def need(num_sms: int) -> int:
        configs = (Buffer.get_dispatch_config(1), Buffer.get_combine_config(1))
        return max(dataclasses.replace(c, num_sms=num_sms).get_nvl_buffer_size_hint(H * 2, 1) for c in configs)

    pool = BufferPool(backend="torch", num_sms=64)
    first = pool.get(group, H)
    assert first.num_sms == 64 and first.num_nvl_bytes >= need(64) > need(24)
    pool.set_num_sms(32)  # fits: kept, with the new count
    assert pool.get(group, H) is first and first.num_sms == 32
    pool.set_num_sms(96)  # does not fit: made again
    again = pool.get(group, H)
    assert again is not first and again.num_sms == 96 and again.num_nvl_bytes >= need(96)
    for buf in (first, again):
        buf.destroy()


def test_buffer_pool_sizes_its_buffers_for_the_callers_configs(group):
    """get(..., configs=) holds the rings of configs a caller passes to its calls: a larger one
    replaces the buffer (keeping its row width), smaller or equal ones keep it; non-configs refused."""
    from ep_train.buffer_pool import BufferPool

    pool = BufferPool(backend="torch")
    first = pool.get(group, 2 * H)
    big = Config(96, 16, 256)
    need = big.get_nvl_buffer_size_hint(2 * H * 2, 1)
    assert first.num_nvl_bytes < need
    assert pool.get(group, H, configs=(Config(24, 8, 256),)) is first
    again = pool.get(group, H, configs=(big, Config(8, 8, 256)))
    assert again is not first and again.num_nvl_bytes >= need  # sized for the wider row it replaced
    assert pool.get(group, 2 * H) is again and pool.get(group, H, configs=(big,)) is again
    with pytest.raises(TypeError, match="configs must hold ep_train.Config objects, got int"):
        pool.get(group, H, configs=(96,))
    wider = pool.get(group, 4 * H)  # made for a wider row: still holds the configs callers passed before
    assert wider is not again and wider.num_nvl_bytes >= big.get_nvl_buffer_size_hint(4 * H * 2, 1)
    for buf in (first, again, wider):
        buf.destroy()


def test_collecting_a_calls_tensors_keeps_none_alive():
    """The walk over a call's results (on every CUDA call's path) leaves no reference cycle: with the
    cyclic garbage collector off (Megatron's manual GC), a dropped output is freed at once."""
    import gc
    import weakref

    from ep_train.buffer import _tensors_in

    out = torch.randn(4, 8)
    result = ((out, [3, 4]), {"rows": out}, None)
    gc.disable()
    try:
        assert [id(t) for t in _tensors_in(result)] == [id(out)]
        ref = weakref.ref(out)
        del out, result
        assert ref() is None, "the output outlived its last reference"
    finally:
        gc.enable()
