"""Bad input gets a clear error naming the argument (single-rank gloo group in this process)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import ep_train
from ep_train import Buffer, Config
from ep_train.fp8 import quantize_fp8

T, H, E, K, M = 6, 256, 4, 2, 8


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    tmp = tempfile.mkdtemp()
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture()
def buf(group):
    nvl = Buffer.get_dispatch_config(1).get_nvl_buffer_size_hint(H * 8, 1)
    rdma = Buffer.get_low_latency_rdma_size_hint(M, H, 1, E)
    with Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, timeout_s=10) as b:
        yield b


def _inputs():
    idx = torch.tensor([[0, 1], [2, -1], [3, 0], [-1, -1], [1, 2], [0, 3]])
    return torch.randn(T, H).bfloat16(), idx, torch.rand(T, K)


def _layout(buf, idx):
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    return {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}


def _raises(exc, *names):
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            assert et is not None, f"expected {exc.__name__} naming {names}, nothing was raised"
            assert issubclass(et, exc), f"expected {exc.__name__}, got {et.__name__}: {ev}"
            for n in names:
                assert n in str(ev), f"message does not name {n!r}: {ev}"
            return True

    return _Ctx()


def test_dispatch_argument_errors(buf):
    x, idx, w = _inputs()
    lay = _layout(buf, idx)
    with _raises(TypeError, "x", "dtype"):
        buf.dispatch(x.to(torch.int32), topk_idx=idx, topk_weights=w, **lay)
    with _raises(ValueError, "x", "2-D"):
        buf.dispatch(x[None], topk_idx=idx, topk_weights=w, **lay)
    with _raises(ValueError, "x", "contiguous"):
        buf.dispatch(torch.randn(H, T).bfloat16().t(), topk_idx=idx, topk_weights=w, **lay)
    with _raises(ValueError, "x has 4 rows", "topk_idx has 6"):
        buf.dispatch(x[:4], topk_idx=idx, topk_weights=w, **lay)
    with _raises(TypeError, "topk_idx", "int64"):
        buf.dispatch(x, topk_idx=idx.int(), topk_weights=w, **lay)
    with _raises(ValueError, "topk_idx", "num_experts=4", "7"):
        buf.dispatch(x, topk_idx=torch.where(idx == 3, 7, idx), topk_weights=w, **lay)
    with _raises(ValueError, "topk_idx", "-2"):
        buf.get_dispatch_layout(torch.where(idx == 3, -2, idx), E)
    with _raises(TypeError, "topk_weights", "float32"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w.half(), **lay)
    with _raises(ValueError, "is_token_in_rank", "shape"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w, **{**lay, "is_token_in_rank": lay["is_token_in_rank"][:3]})
    with _raises(ValueError, "num_tokens_per_rank"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w, **{**lay, "num_tokens_per_rank": None})
    with _raises(ValueError, "expert_alignment"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w, expert_alignment=0, **lay)
    with _raises(TypeError, "config"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w, config={"num_sms": 24}, **lay)
    with _raises(ValueError, "num_worst_tokens=2"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=2, **lay)
    q, s = quantize_fp8(x)
    with _raises(ValueError, "x[1]", "FP8 scales", "shape"):
        buf.dispatch((q, s[:, :1]), topk_idx=idx, topk_weights=w, **lay)
    with _raises(TypeError, "x[0]", "float8_e4m3fn"):
        buf.dispatch((x, s), topk_idx=idx, topk_weights=w, **lay)


def test_cached_handle_and_combine_errors(buf):
    x, idx, w = _inputs()
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **_layout(buf, idx))
    with _raises(ValueError, "x", "cached handle", f"({T}, {H})"):
        buf.dispatch(torch.randn(T, H + 2).bfloat16(), handle=handle)
    with _raises(ValueError, "x", "cached handle"):
        buf.dispatch(torch.randn(T + 1, H).bfloat16(), handle=handle)
    with _raises(ValueError, "topk_idx", "cached"):
        buf.dispatch(x, handle=handle, topk_idx=idx)
    with _raises(TypeError, "handle"):
        buf.dispatch(x, handle=(1, 2, 3))
    with _raises(ValueError, "x", "shape"):
        buf.combine(recv_x[:-1], handle)
    with _raises(ValueError, "bias[0]", "shape"):
        buf.combine(recv_x, handle, bias=torch.zeros(T + 1, H).bfloat16())
    with _raises(ValueError, "bias"):
        buf.combine(recv_x, handle, bias=(recv_x, recv_x, recv_x))
    with _raises(TypeError, "topk_weights"):
        buf.combine(recv_x, handle, topk_weights=recv_w.long())


def test_low_latency_errors(buf):
    x, idx, w = _inputs()
    with _raises(ValueError, "num_max_dispatch_tokens_per_rank=4", "6 tokens"):
        buf.low_latency_dispatch(x, idx, 4, E)
    with _raises(ValueError, "num_rdma_bytes", "get_low_latency_rdma_size_hint"):
        buf.low_latency_dispatch(x, idx, 4096, E)
    with _raises(ValueError, "use_ue8m0"):
        buf.low_latency_dispatch(x, idx, M, E, use_ue8m0=True)
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    with _raises(ValueError, "x", "shape"):
        buf.low_latency_combine(recv_x[:, :3], idx, w, handle)
    with _raises(ValueError, "topk_weights", "shape"):
        buf.low_latency_combine(recv_x, idx, w[:, :1].contiguous(), handle)
    with _raises(ValueError, "use_logfmt"):
        buf.low_latency_combine(recv_x, idx, w, handle, use_logfmt=True)


def test_buffer_level_errors(group):
    x, idx, w = _inputs()
    small = Buffer(group, num_nvl_bytes=1024)
    with _raises(ValueError, "num_nvl_bytes=1024", "get_nvl_buffer_size_hint"):
        small.dispatch(x, topk_idx=idx, topk_weights=w, **_layout(small, idx))
    with _raises(ValueError, "low_latency_mode"):
        small.low_latency_dispatch(x, idx, M, E)
    with _raises(ValueError, "num_sms"):
        small.set_num_sms(7)
    with _raises(ValueError, "timeout_s"):
        Buffer(group, timeout_s=0)
    with _raises(ValueError, "backend"):
        Buffer(group, backend="mpi")
    with _raises(ValueError, "num_nvl_bytes"):
        Buffer(group, num_nvl_bytes=-1)
    with _raises(ValueError, "backend='cuda'"):
        Buffer(group, backend="cuda")
    small.destroy()
    with _raises(RuntimeError, "destroyed"):
        small.get_dispatch_layout(idx, E)


def test_config_errors():
    with _raises(ValueError, "Config.num_sms"):
        Config(num_sms=3)
    with _raises(ValueError, "num_max_nvl_chunked_recv_tokens"):
        Config(num_sms=24, num_max_nvl_chunked_send_tokens=8, num_max_nvl_chunked_recv_tokens=8)
    with _raises(ValueError, "num_ranks"):
        ep_train.get_dispatch_config(0)
