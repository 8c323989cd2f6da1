"""Worker bodies of the GPU tests: the cuda backend against the torch backend, same inputs, same GPUs.

Dispatch is a permutation, so every dispatch output must be bitwise equal; combine sums in FP32 in
rank order on both sides and must agree within one BF16 rounding.  Inputs come from a fresh seed
every run (``run_seeded``), named in the failure.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
import torch.distributed as dist

from ep_train import Buffer, Config
from ep_train.errors import CommError, CommTimeoutError, RankMismatchError
from ep_train.fp8 import quantize_fp8
from ep_train.testing import check_attached_offsets, run_distributed

MAX_HIDDEN = 7168


#: the process-group backend of ranks that share one GPU: gloo carries the CUDA tensors (NCCL needs a
#: GPU per rank).
SHARED_GPU = "cpu:gloo,cuda:gloo"


def run_seeded(suite, num_gpus: int, *args, one_gpu: bool = False) -> None:
    """``suite(rank, world, seed, *args)`` on ``num_gpus`` NCCL ranks with a fresh seed, named on failure.

    ``one_gpu``: ``num_gpus`` ranks as processes on GPU 0 instead (SHARED_GPU group): the kernels'
    protocol between processes, separate CUDA contexts and NVSHMEM PEs, on a machine with one GPU.
    """
    seed = int(os.environ.get("EP_TRAIN_TEST_SEED", random.randrange(1 << 30)))
    try:
        run_distributed(suite, num_gpus, seed, *args, backend=SHARED_GPU if one_gpu else "nccl", timeout_s=300)
    except Exception as exc:
        raise AssertionError(
            f"{suite.__name__} failed with seed {seed} (EP_TRAIN_TEST_SEED={seed} replays it)"
        ) from exc


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """This rank's stream of the run's inputs."""
    return torch.Generator().manual_seed(seed * 16 + rank)


def make_buffers(world: int, timeout_s: float = 20.0, check_values: bool = True) -> tuple[Buffer, Buffer]:
    nvl = max(
        Config(64, 8, 256).get_nvl_buffer_size_hint(MAX_HIDDEN * 2, world),
        Config(24, 8, 512).get_nvl_buffer_size_hint(MAX_HIDDEN * 2, world),
    )
    cuda = Buffer(None, nvl, backend="cuda", timeout_s=timeout_s, check_values=check_values)
    return cuda, Buffer(None, nvl, backend="torch")


def routing(kind: str, T: int, K: int, E: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """[T, K] int64 expert ids; 'random' (distinct ids, ~10% -1), 'one_expert', 'none'."""
    if kind == "random":
        idx = torch.rand((T, E), generator=gen).argsort(dim=1)[:, :K]
        idx[torch.rand((T, K), generator=gen) < 0.1] = -1
    elif kind == "one_expert":  # every token to expert 0: rank 0 gets all, the others nothing
        idx = torch.full((T, K), -1, dtype=torch.int64)
        idx[:, 0] = 0
    elif kind == "none":
        idx = torch.full((T, K), -1, dtype=torch.int64)
    else:
        raise ValueError(kind)
    return idx.cuda()


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if t.element_size() == 1:
        return t.view(torch.uint8)
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_bitwise(name: str, got, ref) -> None:
    if got is None or ref is None:
        assert got is None and ref is None, f"{name}: one side is None"
        return
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != {ref.dtype}"
    bad = (_bits(got) != _bits(ref)).nonzero()
    assert bad.numel() == 0, f"{name}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}"


def assert_close_bf16(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within one BF16 rounding (the two sides sum in the same FP32 order, so usually bitwise)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    diff = (got.float() - ref.float()).abs()
    tol = ref.float().abs() * 2.0**-7 + 1e-6
    bad = (diff > tol).nonzero()
    if bad.numel():
        i, j = bad[0].tolist()
        rows = bad[:, 0].unique()
        raise AssertionError(
            f"{name}: {bad.shape[0]} elements in {rows.numel()} of {got.shape[0]} rows differ, first at ({i}, {j}): "
            f"got {got[i, j : j + 4].tolist()} want {ref[i, j : j + 4].tolist()}; bad rows {rows[:12].tolist()}"
        )


def layout_of(buf: Buffer, topk_idx, E):
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, E)
    return per_rank, per_expert, in_rank


def dispatch_both(cuda: Buffer, ref: Buffer, x, topk_idx, topk_w, E, **kw):
    outs = []
    for buf in (cuda, ref):
        if topk_idx is None:
            in_rank = kw.pop("_in_rank")
            per_rank = in_rank.sum(0, dtype=torch.int32)
            outs.append(buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, **kw))
            kw["_in_rank"] = in_rank
            continue
        per_rank, per_expert, in_rank = layout_of(buf, topk_idx, E)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        outs.append(buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, **layout, **kw))
    return outs


def compare_dispatch(tag: str, got, ref, worst: int = 0, cuda: Buffer | None = None) -> None:
    if cuda is not None:
        check_kernels(cuda, tag)
    (rx, ri, rw, rl, rh, _), (qx, qi, qw, ql, qh, _) = got, ref
    n = qh.num_recv_tokens
    rows = slice(0, n) if worst else slice(None)
    if worst:  # padding rows carry no expert
        num_rows = rx[0].shape[0] if isinstance(rx, tuple) else rx.shape[0]
        assert num_rows == worst, f"{tag}: {num_rows} rows != num_worst_tokens {worst}"
        assert ri is None or bool((ri[n:] == -1).all()), f"{tag}: padding recv_topk_idx must be -1"
        assert rw is None or bool((rw[n:] == 0).all()), f"{tag}: padding recv_topk_weights must be 0"
        ri, rw = (None if ri is None else ri[:n]), (None if rw is None else rw[:n])
    if isinstance(rx, tuple):
        assert_bitwise(f"{tag} recv_x", rx[0][rows], qx[0][rows])
        assert_bitwise(f"{tag} recv_x_scales", rx[1][rows], qx[1][rows])
    else:
        assert_bitwise(f"{tag} recv_x", rx[rows], qx[rows])
    assert_bitwise(f"{tag} recv_topk_idx", ri, qi)
    assert_bitwise(f"{tag} recv_topk_weights", rw, qw)
    assert_bitwise(f"{tag} recv_src_idx", rh.recv_src_idx_N[: qh.recv_src_idx_N.shape[0]], qh.recv_src_idx_N)
    assert_bitwise(f"{tag} rank_prefix_matrix", rh.rank_prefix_matrix_RR, qh.rank_prefix_matrix_RR)
    assert_bitwise(f"{tag} send_pos", rh.send_pos_TR, qh.send_pos_TR)
    assert_bitwise(f"{tag} per-expert counts", rh.num_recv_tokens_per_expert_L, qh.num_recv_tokens_per_expert_L)
    if not worst:
        assert rl == ql, f"{tag}: num_recv_tokens_per_expert_list {rl} != {ql}"
    else:
        assert int(rh.extras["num_recv_tokens_t"]) == n, f"{tag}: device recv count"


def check_kernels(cuda: Buffer, tag: str) -> None:
    """Surface a kernel-reported failure (mailbox) right after the op instead of as wrong data."""
    torch.cuda.synchronize()
    try:
        cuda._backend._raise_if_failed()
    except CommError as exc:
        raise AssertionError(f"{tag}: {exc}") from exc


def combine_both(tag: str, cuda, ref, hc, hr, y_c, y_r, weights, bias, config=None) -> None:
    bc, wc, _ = cuda.combine(y_c, hc, topk_weights=weights[0], bias=bias, config=config)
    check_kernels(cuda, tag)
    br, wr, _ = ref.combine(y_r, hr, topk_weights=weights[1], bias=bias)
    assert_close_bf16(f"{tag} combined_x", bc, br)
    if wr is not None:
        torch.testing.assert_close(wc, wr, rtol=1e-6, atol=1e-7, msg=lambda m: f"{tag} combined_topk_weights: {m}")


# ---------------------------------------------------------------- suites (run in every rank)
CASES = [  # (tag, T base, hidden, K, E, routing, expert_alignment, config)
    ("h7168-k8", 1000, 7168, 8, 256, "random", 1, None),
    ("h2048-k1", 700, 2048, 1, 16, "random", 1, Config(2, 8, 16)),
    ("h4096-k9-align4", 513, 4096, 9, 64, "random", 4, Config(64, 4, 32)),
    ("h2000-k4", 300, 2000, 4, 32, "random", 1, Config(12, 6, 64)),
    # Training shapes with the default configs: every ring wraps many times.
    ("h2048-k2-t4096", 4096, 2048, 2, 16, "random", 1, None),
    ("h7168-k8-t4096", 4096, 7168, 8, 256, "random", 1, None),
]
# Few tokens and tiny rings (every ring wraps, FP8 and non-128 hidden included): fast enough to run
# under compute-sanitizer (scripts/sanitize.sh).
SMALL_CASES = [
    ("small-h7168-k8", 40, 7168, 8, 256, "random", 1, Config(4, 2, 8)),
    ("small-h2000-k3", 33, 2000, 3, 16, "random", 1, Config(2, 1, 2)),
    ("small-h4096-k9-align4", 50, 4096, 9, 64, "random", 4, Config(6, 3, 16)),
]


def suite_dispatch_combine(rank: int, world: int, seed: int, cases: list | None = None) -> None:
    cuda, ref = make_buffers(world)
    gen = rank_generator(seed, rank)
    for tag, T0, H, K, E, kind, align, cfg in CASES if cases is None else cases:
        print(f"rank {rank}: case {tag}", flush=True)
        T = T0 + 37 * rank  # ranks hold different token counts
        x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
        idx = routing(kind, T, K, E, rank, gen)
        w = torch.rand((T, K), generator=gen).cuda()
        got = [layout_of(b, idx, E) for b in (cuda, ref)]
        for name, a, b in zip(("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"), *got, strict=True):
            assert_bitwise(f"{tag} layout {name}", a, b)
        kw = dict(expert_alignment=align, config=cfg)
        dc, dr = dispatch_both(cuda, ref, x, idx, w, E, **kw)
        compare_dispatch(tag, dc, dr, cuda=cuda)
        hc, hr = dc[4], dr[4]
        # Expert outputs (same rows on both sides), scaled per rank: one rank's copy of a token
        # read in place of another's changes the sum.
        y = (dr[0].float() * (1.5 + rank) + 0.25).to(torch.bfloat16)
        rw = dr[2]
        combine_both(f"{tag} combine", cuda, ref, hc, hr, y, y, (None, None), None, cfg)
        combine_both(f"{tag} combine+w+bias", cuda, ref, hc, hr, y, y, (rw, rw), torch.randn_like(x), cfg)
        b2 = (torch.randn_like(x), torch.randn_like(x))
        combine_both(f"{tag} combine+2bias", cuda, ref, hc, hr, y, y, (rw, rw), b2, Config(24, 8, 256))
        x2 = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()  # cached handle, other config
        rc = cuda.dispatch(x2, handle=hc, config=Config(8, 4, 64))
        rr = ref.dispatch(x2, handle=hr)
        check_kernels(cuda, f"{tag} cached")
        assert_bitwise(f"{tag} cached recv_x", rc[0], rr[0])
        assert rc[3] == rr[3], f"{tag} cached per-expert list"
        if H % 128 == 0:
            q = quantize_fp8(x)
            fc, fr = dispatch_both(cuda, ref, q, idx, w, E, **kw)
            compare_dispatch(f"{tag} fp8", fc, fr, cuda=cuda)
            q2 = quantize_fp8(x2)
            fp8_c, fp8_r = cuda.dispatch(q2, handle=fc[4])[0], ref.dispatch(q2, handle=fr[4])[0]
            assert_bitwise(f"{tag} fp8 cached", fp8_c[0], fp8_r[0])
            assert_bitwise(f"{tag} fp8 cached scales", fp8_c[1], fp8_r[1])
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()


def suite_no_topk_and_empty(rank: int, world: int, seed: int) -> None:
    cuda, ref = make_buffers(world)
    gen = rank_generator(seed, rank)
    T, H = 300 + 11 * rank, 2048
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    in_rank = (torch.rand((T, world), generator=gen) < 0.5).cuda()
    dc, dr = dispatch_both(cuda, ref, x, None, None, world, _in_rank=in_rank)
    compare_dispatch("no-topk", dc, dr, cuda=cuda)
    y = dr[0]
    combine_both("no-topk combine", cuda, ref, dc[4], dr[4], y, y, (None, None), None)
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()


def _gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """Rows of every rank's x (T may differ per rank), concatenated in rank order."""
    counts = torch.tensor([x.shape[0]], device="cuda")
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    t_max = max(int(c) for c in all_counts)
    padded = torch.zeros((t_max, x.shape[1]), dtype=x.dtype, device="cuda")
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, all_counts, strict=True)])


def _roundtrip(tag: str, cuda: Buffer, x, idx, E: int, world: int) -> tuple:
    """Dispatch, then combine the received rows unchanged: token t comes back x[t] x (ranks holding it)."""
    per_rank, per_expert, in_rank = layout_of(cuda, idx, E)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    out = cuda.dispatch(x, topk_idx=idx, **layout)
    check_kernels(cuda, f"{tag} dispatch")
    comb, _, _ = cuda.combine(out[0], out[4])
    check_kernels(cuda, f"{tag} combine")
    # + 0.0: a token no rank holds comes back as +0 (the sum starts from +0), never -0.
    want = (x.float() * in_rank.sum(1, keepdim=True).float() + 0.0).to(torch.bfloat16)
    assert_bitwise(f"{tag} round trip", comb, want)
    return out, in_rank


def suite_skewed_and_empty(rank: int, world: int, seed: int) -> None:
    """Routings where a rank receives or holds nothing (checked without the torch backend)."""
    cuda, _ = make_buffers(world)
    gen = rank_generator(seed, rank)
    H, K, E = 2048, 2, 16
    T = 400 + 37 * rank
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    out, in_rank = _roundtrip("one-expert", cuda, x, routing("one_expert", T, K, E, rank, gen), E, world)
    everything = _gather_rows(x, world)
    want_rows = everything if rank == 0 else everything[:0]
    assert_bitwise("one-expert recv_x", out[0], want_rows)
    if rank == 0:
        assert bool((out[1][:, 0] == 0).all()) and bool((out[1][:, 1] == -1).all()), "one-expert recv_topk_idx"
    x2 = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    cached = cuda.dispatch(x2, handle=out[4])[0]
    check_kernels(cuda, "one-expert cached")
    everything = _gather_rows(x2, world)
    assert_bitwise("one-expert cached recv_x", cached, everything if rank == 0 else everything[:0])
    out, _ = _roundtrip("no-expert", cuda, x, routing("none", T, K, E, rank, gen), E, world)
    assert out[0].shape[0] == 0, "no-expert: nothing may be received"
    T = 0 if rank == 1 else 64  # one rank holds no tokens at all
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    _roundtrip("empty-rank", cuda, x, routing("random", T, 4, E, rank, gen), E, world)
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()


def suite_worst_graph_async(rank: int, world: int, seed: int) -> None:
    cuda, ref = make_buffers(world)
    gen = rank_generator(seed, rank)
    T, H, K, E = 512 + 5 * rank, 4096, 8, 64
    worst = (T + 5 * world) * world
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    idx = routing("random", T, K, E, rank, gen)
    w = torch.rand((T, K), generator=gen).cuda()
    dr = dispatch_both(ref, ref, x, idx, w, E)[0]
    y = (dr[0].float() * (1 + rank) - 0.5).to(torch.bfloat16)
    br, wr, _ = ref.combine(y, dr[4], topk_weights=dr[2])

    def step(x_in, y_rows):
        per_rank, _, per_expert, in_rank, _ = cuda.get_dispatch_layout(idx, E)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        out = cuda.dispatch(x_in, topk_idx=idx, topk_weights=w, num_worst_tokens=worst, **layout)
        n = dr[4].num_recv_tokens
        y_pad = torch.zeros((worst, H), dtype=torch.bfloat16, device="cuda")
        y_pad[:n] = y_rows
        comb, comb_w, _ = cuda.combine(y_pad, out[4], topk_weights=out[2])
        return out, comb, comb_w

    out, comb, comb_w = step(x, y)  # eager, sync-free path
    compare_dispatch("worst", out, dr, worst=worst, cuda=cuda)
    assert out[0].shape[0] == worst and out[4].num_recv_tokens == -1
    assert_close_bf16("worst combine", comb, br)
    torch.testing.assert_close(comb_w, wr, rtol=1e-6, atol=1e-7)

    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static_x, y)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        g_out, g_comb, g_comb_w = step(static_x, y)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        compare_dispatch("graph", g_out, dr, worst=worst)
        assert_close_bf16("graph combine", g_comb, br)

    # async_finish / previous_event / allocate_on_comm_stream
    per_rank, _, per_expert, in_rank, ev = cuda.get_dispatch_layout(idx, E, async_finish=True)
    out = cuda.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                        topk_idx=idx, topk_weights=w, previous_event=ev, async_finish=True,
                        allocate_on_comm_stream=True)  # fmt: skip
    out[5].current_stream_wait()
    compare_dispatch("async", out, dr)
    comb, _, ev = cuda.combine(y, out[4], previous_event=Buffer.capture(), async_finish=True)
    ev.current_stream_wait()
    assert_close_bf16("async combine", comb, ref.combine(y, dr[4])[0])
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()


def suite_failures(rank: int, world: int, seed: int) -> None:
    """Mismatched calls end in errors on every rank, never in a hang."""
    cuda, _ = make_buffers(world, timeout_s=5.0)
    T, E = 128, 16
    idx = routing("random", T, 2, E, rank, rank_generator(seed, rank))
    H = 2048 if rank == 0 else 4096  # ranks disagree on hidden
    x = torch.randn((T, H), device="cuda").to(torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = cuda.get_dispatch_layout(idx, E)
    try:
        cuda.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                      topk_idx=idx)  # fmt: skip
    except RankMismatchError as exc:
        assert "hidden" in str(exc), str(exc)
    else:
        raise AssertionError("mismatched hidden did not raise")
    with pytest.raises(CommError):  # a failed buffer refuses later calls
        cuda.get_dispatch_layout(idx, E)
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    # A rank skips a call: the other times out (bounded) with a message naming the peer.
    cuda, _ = make_buffers(world, timeout_s=3.0)
    x = torch.randn((T, 2048), device="cuda").to(torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = cuda.get_dispatch_layout(idx, E)
    if rank == 0:
        try:
            cuda.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                          num_tokens_per_expert=per_expert, topk_idx=idx)  # fmt: skip
        except CommTimeoutError as exc:
            assert "rank 1" in str(exc), str(exc)
        else:
            raise AssertionError("a skipped call did not time out")
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    # Expert ids out of range with the host check off (the adapters' pools): the layout kernel
    # reports them, so the dispatch raises at its wait for the receive counts, naming the entry.
    cuda, _ = make_buffers(world, timeout_s=3.0, check_values=False)
    bad = idx.clone()
    bad[T // 2 + rank, 1] = E + rank
    per_rank, _, per_expert, in_rank, _ = cuda.get_dispatch_layout(bad, E)
    with pytest.raises(CommError, match=rf"topk_idx\[{T // 2 + rank}, 1\] is {E + rank}"):
        cuda.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                      topk_idx=bad)  # fmt: skip
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    # Only rank 0's ids are wrong, on the sync-free path (num_worst_tokens): rank 0's check()
    # names the entry; its peers, whose dispatch rank 0 never joined, time out (bounded).
    cuda, _ = make_buffers(world, timeout_s=3.0, check_values=False)
    bad = idx.clone()
    if rank == 0:
        bad[3, 0] = -2
    per_rank, _, per_expert, in_rank, _ = cuda.get_dispatch_layout(bad, E)

    def dispatch_and_check():  # the dispatch itself raises when the layout kernel finished first
        cuda.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                      topk_idx=bad, num_worst_tokens=world * T)  # fmt: skip
        cuda.check()

    want = (CommError, r"topk_idx\[3, 0\] is -2") if rank == 0 else (CommTimeoutError, "waiting for rank 0")
    with pytest.raises(want[0], match=want[1]):
        dispatch_and_check()
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    # The last rank never creates its Buffer: the others raise after timeout_s, naming it (the
    # creation's collectives would otherwise wait for the process group's timeout).  Last in the
    # suite: the ranks' counts of created Buffers differ afterwards.
    if rank != world - 1:
        start = time.monotonic()
        with pytest.raises(CommTimeoutError, match=rf"ranks \[{world - 1}\] of the group did not create"):
            make_buffers(world, timeout_s=3.0)
        assert time.monotonic() - start < 30, "the creation's presence check was not bounded by timeout_s"
    dist.barrier()


def suite_inputs_ready_at_previous_event(rank: int, world: int, seed: int) -> None:
    """Layout and dispatch issued inside the comm stream before the producer of topk_idx has run.

    The caller passes previous_event (how Megatron's chunked pipeline issues them): the host-side
    value check must read topk_idx after that event, not the stale memory (out of range here) it
    holds while the compute stream is still busy.  Every result must match the torch backend.
    """
    cuda, ref = make_buffers(world)
    gen = rank_generator(seed, rank)
    T, H, K, E = 256, 2048, 4, 32
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    want_idx = routing("random", T, K, E, rank, gen).cuda()
    idx = torch.full((T, K), 1 << 40, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the compute stream is busy for a while (~0.1 s) ...
    idx.copy_(want_idx)  # ... before it produces topk_idx
    ready = Buffer.capture()
    with torch.cuda.stream(cuda.get_comm_stream()):
        per_rank, _, per_expert, in_rank, ev = cuda.get_dispatch_layout(idx, E, previous_event=ready,
                                                                         async_finish=True)  # fmt: skip
        recv = cuda.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                             num_tokens_per_expert=per_expert, topk_idx=idx, previous_event=ev,
                             async_finish=True)  # fmt: skip
    recv[5].current_stream_wait()
    ref_rank, ref_expert, ref_in_rank = layout_of(ref, want_idx, E)
    want = ref.dispatch(x, num_tokens_per_rank=ref_rank, is_token_in_rank=ref_in_rank,
                        num_tokens_per_expert=ref_expert, topk_idx=want_idx)  # fmt: skip
    torch.cuda.synchronize()
    compare_dispatch("dispatch after previous_event", recv, want, cuda=cuda)
    dist.barrier()
    cuda.destroy()


def suite_autograd_fp8_after_previous_event(rank: int, world: int, seed: int) -> None:
    """ep_train.autograd.dispatch with fp8=True issued inside the comm stream before x exists.

    The FP8 quantisation runs before the Buffer's own wait: it must wait for previous_event too,
    and the dequantisation for the async result.  recv_x must equal a plain synchronous call's.
    """
    from ep_train.autograd import dispatch as ep_dispatch

    cuda, _ = make_buffers(world)
    gen = rank_generator(seed, rank)
    T, H, K, E = 256, 2048, 4, 32
    x_ready = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    idx = routing("random", T, K, E, rank, gen).cuda()
    w = torch.rand((T, K), generator=gen).cuda()
    want = ep_dispatch(cuda, x_ready, idx, w, E, fp8=True)
    x = torch.zeros_like(x_ready)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the compute stream is busy for a while before x exists
    x.copy_(x_ready)
    ready = Buffer.capture()
    with torch.cuda.stream(cuda.get_comm_stream()):
        got = ep_dispatch(cuda, x, idx, w, E, fp8=True, previous_event=ready, async_finish=True)
    got.event.current_stream_wait()
    torch.cuda.synchronize()
    assert_bitwise("FP8 recv_x after previous_event", got.recv_x, want.recv_x)
    assert_bitwise("recv_topk_idx after previous_event", got.recv_topk_idx, want.recv_topk_idx)
    dist.barrier()
    cuda.destroy()


def suite_expert_major(rank: int, world: int, seed: int) -> None:
    """Expert-major dispatch on the kernels (rows written straight to their experts' places) against
    the torch backend's dispatch followed by the permutation: bitwise; cached calls too; then the
    autograd pair against dispatch + permute + unpermute + combine on the kernels: bitwise."""
    import ep_train.autograd as A
    from ep_train.moe import grouped_mlp
    from ep_train.permute import permute_to_experts, unpermute_from_experts

    cuda, ref = make_buffers(world)
    gen = rank_generator(seed, rank)
    cases = [  # (kind, T, H, K, E, alignment, fp8)
        ("random", 512, 7168, 8, 64, 1, False),
        ("random", 300 + 37 * rank, 2048, 9, 32 * world, 16, False),
        ("random", 256, 4096, 5, 16, 1, True),
        ("one_expert", 200, 2048, 4, 8 * world, 1, False),
        ("none", 64, 2048, 3, 4 * world, 4, False),
        ("random", 0 if rank == 1 else 96, 2048, 2, 8 * world, 1, False),
    ]
    for kind, T, H, K, E, align, fp8 in cases:
        tag = f"expert-major {kind} T={T} H={H} K={K} E={E} align={align} fp8={fp8}"
        L = E // world
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
        idx = routing(kind, T, K, E, rank, gen)
        w = torch.rand((T, K), generator=gen).cuda().masked_fill(idx < 0, 0)
        xin = quantize_fp8(x) if fp8 else x
        per_rank, per_expert, in_rank = layout_of(cuda, idx, E)
        got = cuda.dispatch(xin, None, per_rank, None, in_rank, per_expert, idx, w, expert_alignment=align,
                            expert_major=True)  # fmt: skip
        check_kernels(cuda, tag)
        per_rank, per_expert, in_rank = layout_of(ref, idx, E)
        plain = ref.dispatch(xin, None, per_rank, None, in_rank, per_expert, idx, w, expert_alignment=align)
        rx = plain[0][0] if fp8 else plain[0]
        want_x, tpe, want_probs, layout = permute_to_experts(rx, plain[1], plain[2], L, align, plain[3])
        gx = got[0][0] if fp8 else got[0]
        assert_bitwise(f"{tag} rows", gx.view(torch.uint8) if fp8 else gx, want_x.view(torch.uint8) if fp8 else want_x)
        if fp8:
            want_s, *_ = permute_to_experts(plain[0][1], plain[1], plain[2], L, align, plain[3])
            assert_bitwise(f"{tag} scales", got[0][1], want_s)
        assert_bitwise(f"{tag} probs", got[2], want_probs)
        assert_bitwise(f"{tag} recv_topk_idx", got[1], plain[1])
        assert list(got[3]) == tpe.tolist(), f"{tag}: counts {got[3]} != {tpe.tolist()}"
        assert_bitwise(f"{tag} pair_pos", got[4].pair_pos_NK, layout.pos_NK)
        x2 = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
        got2, *_ = cuda.dispatch(x2, got[4], expert_major=True)
        check_kernels(cuda, tag + " cached")
        plain2, *_ = ref.dispatch(x2, plain[4])
        want2, *_ = permute_to_experts(plain2, plain[1], plain[2], L, align, plain[3])
        assert_bitwise(f"{tag} cached rows", got2, want2)
        # Combine of expert-major rows: the kernel's own pair sums = the pair-sum kernel, then combine.
        y_P = torch.randn(got2.shape, generator=gen).to(torch.bfloat16).cuda()
        w_NK = torch.rand(plain[1].shape, generator=gen).cuda()
        bias = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
        fused = cuda.combine(y_P, got[4], topk_weights=w_NK, bias=bias, expert_major=True)
        check_kernels(cuda, tag + " combine")
        y_N = unpermute_from_experts(y_P, layout)
        unfused = cuda.combine(y_N, got[4], topk_weights=w_NK, bias=bias)
        assert_bitwise(f"{tag} combine", fused[0], unfused[0])
        assert_bitwise(f"{tag} combined weights", fused[1], unfused[1])
        torch_side = ref.combine(y_N, plain[4], topk_weights=w_NK, bias=bias)
        assert_close_bf16(f"{tag} combine vs torch backend", fused[0], torch_side[0])

    # Autograd: the fused pair against the unfused path, both on the kernels (BF16, same sums).
    T, H, F, K, E = 384, 2048, 256, 8, 16 * world
    L = E // world
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    idx = routing("random", T, K, E, rank, gen)
    w = torch.rand((T, K), generator=gen).cuda().masked_fill(idx < 0, 0)
    w1 = (torch.randn(L, H, 2 * F, generator=gen) / H**0.5).to(torch.bfloat16).cuda()
    w2 = (torch.randn(L, F, H, generator=gen) / F**0.5).to(torch.bfloat16).cuda()
    gout = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()

    def unfused(x, w):
        out = A.dispatch(cuda, x, idx, w, E)
        x_P, tpe, probs, lay = permute_to_experts(out.recv_x, out.recv_topk_idx, out.recv_topk_weights, L, 1,
                                                  out.tokens_per_expert_list)  # fmt: skip
        y_P = grouped_mlp(x_P, tpe, w1, w2) * probs.unsqueeze(-1).to(x_P.dtype)
        return A.combine(cuda, unpermute_from_experts(y_P, lay), out.handle)

    def fused(x, w):
        out = A.dispatch_to_experts(cuda, x, idx, w, E)
        check_attached_offsets(out.tokens_per_expert, out.x.device)  # what grouped_mlp's GEMMs then take
        y_P = grouped_mlp(out.x, out.tokens_per_expert, w1, w2) * out.probs.unsqueeze(-1).to(out.x.dtype)
        return A.combine_from_experts(cuda, y_P, out.handle)

    results = []
    for fn in (unfused, fused):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi)
        y.backward(gout)
        results.append((y.detach(), xi.grad, wi.grad))
    check_kernels(cuda, "expert-major autograd")
    for name, a, b in zip(("output", "x.grad", "topk_weights.grad"), *results, strict=True):
        assert_bitwise(f"expert-major autograd {name}", b, a)
