"""The cuda backend's low-latency kernels against the torch backend on 2, 4 or 8 GPUs of one node
(and two ranks as processes sharing GPU 0; ranks claiming separate nodes take the across-nodes path).

Dispatch is a permutation into fixed slots, so recv_x (BF16, or FP8 + scales: the kernel must quantise
exactly like ``ep_train.fp8`` on CUDA), the counts and every handle tensor must be bitwise equal.
Combine sums w[t, k] * row in FP32 in ascending k: bitwise equal to that loop computed here, and
within one BF16 rounding of the torch backend (whose FP32 reduction order differs).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from ep_train import Buffer, _ext, layout
from ep_train.errors import CommError, CommTimeoutError, RankMismatchError
from ep_train.fp8 import dequantize_fp8, quantize_fp8

from ._scenarios import assert_bitwise, assert_close_bf16, rank_generator, routing, run_seeded

pytestmark = pytest.mark.gpu

M_MAX, H_MAX, E = 64, 7168, 32  # buffers are sized for the largest case of every worker


def _buffers(world: int, timeout_s: float = 20.0, transport: str = "auto") -> tuple[Buffer, Buffer]:
    """The cuda Buffer under test (its low-latency memory from ``transport``; ``nvshmem-rma``: NVSHMEM
    memory with every rank reached by device puts) and the torch reference."""
    rma = transport == "nvshmem-rma"
    memory = "nvshmem" if rma else transport
    os.environ["EP_TRAIN_LL_TRANSPORT"] = memory  # this rank's process only
    os.environ["EP_TRAIN_LL_RMA"] = "1" if rma else "0"
    rdma = Buffer.get_low_latency_rdma_size_hint(M_MAX, H_MAX, world, E, rma_staging=rma)
    cuda = Buffer(None, 0, rdma, low_latency_mode=True, backend="cuda", timeout_s=timeout_s)
    if transport != "auto":
        assert cuda.low_latency_transport == memory, cuda.low_latency_transport
    assert cuda.low_latency_rma == rma
    return cuda, Buffer(None, 0, rdma, low_latency_mode=True, backend="torch")


@pytest.fixture(params=["nvshmem", "ipc", "nvshmem-rma"])
def transport(request):
    """Both memories of the low-latency buffer, NVSHMEM where this machine has it; and NVSHMEM with
    every rank reached by device puts (the path to other nodes) where the build has it."""
    if request.param == "nvshmem-rma" and _ext.is_available() and not _ext.load().NVSHMEM_DEVICE:
        pytest.skip("ep_train._C built without NVSHMEM's device library (EP_TRAIN_NVSHMEM_DEVICE=1 adds it)")
    if request.param != "ipc" and _ext.is_available():
        from ep_train import nvshmem

        reason = nvshmem.unavailable_reason(load=False)
        if reason is not None:
            pytest.skip(f"NVSHMEM: {reason}")
    return request.param


def _expert_out(recv_x, rank: int, world: int) -> torch.Tensor:
    """Local expert l returns its rows times (global expert id + 1), in BF16."""
    dense = dequantize_fp8(*recv_x, torch.float32) if isinstance(recv_x, tuple) else recv_x.float()
    L = E // world
    scale = (torch.arange(L, device=dense.device) + rank * L + 1).float().view(-1, 1, 1)
    return (dense * scale).to(torch.bfloat16)


def _ascending_combine(x, idx, w, fp8: bool, round_scale: bool) -> torch.Tensor:
    """What combine must return for _expert_out: FP32 sum over k ascending of w * row, one rounding per op."""
    dense = dequantize_fp8(*quantize_fp8(x, round_scale=round_scale), torch.float32) if fp8 else x.float()
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(idx.shape[1]):
        e = idx[:, k]
        row = (dense * (e.clamp_min(0) + 1).float().unsqueeze(1)).to(torch.bfloat16).float()
        acc = acc + torch.where((e >= 0).unsqueeze(1), w[:, k : k + 1] * row, torch.zeros_like(row))
    return acc.to(torch.bfloat16)


def _per_rank_combine(x, idx, w, fp8: bool, round_scale: bool, world: int) -> torch.Tensor:
    """What combine with ``sum_per_rank`` must return for _expert_out: per expert rank, the
    ascending-k sum of its experts' terms rounded to BF16; those partials summed in FP32 in rank
    order (a token without experts on a rank adds +0 there, which changes no sum)."""
    total, L = torch.zeros(x.shape, dtype=torch.float32, device=x.device), E // world
    for r in range(world):
        on_r = torch.where(idx // L == r, idx, -1)
        total = total + _ascending_combine(x, on_r, w, fp8, round_scale).float()
    return total.to(torch.bfloat16)


def _compare_dispatch(tag: str, got, ref) -> None:
    (gx, gcount, gh), (rx, rcount, rh) = got, ref
    assert_bitwise(f"{tag} recv_count", gcount, rcount)
    gx, gs = gx if isinstance(gx, tuple) else (gx, None)
    rx, rs = rx if isinstance(rx, tuple) else (rx, None)
    for l, n in enumerate(rcount.tolist()):  # noqa: E741 - l is the local expert
        assert_bitwise(f"{tag} recv_x expert {l}", gx[l, :n], rx[l, :n])
        if rs is not None:
            assert_bitwise(f"{tag} recv_x scales expert {l}", gs[l, :n], rs[l, :n])
    for name in ("recv_src_info_LS", "recv_topk_pos_LS", "recv_topk_weights_LS", "recv_layout_range_LR"):
        assert_bitwise(f"{tag} handle.{name}", getattr(gh, name), getattr(rh, name))


def _run_case(cuda: Buffer, ref: Buffer, rank: int, world: int, c: dict, gen: torch.Generator) -> None:
    tag = "[" + " ".join(f"{k}={v}" for k, v in c.items()) + "]"
    T, H, K, M = c["T"], c["H"], c["K"], c["M"]
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    idx = routing(c["kind"], T, K, E, rank, gen)
    w = torch.rand((T, K), generator=gen).cuda()
    stats_c = torch.full((E // world,), 3, dtype=torch.int32, device="cuda")
    stats_r = stats_c.clone()
    kw = dict(use_fp8=c["fp8"], round_scale=c["round_scale"], topk_weights=w if c["weights"] else None)
    rx, rcount, rh, _, rhook = ref.low_latency_dispatch(x, idx, M, E, cumulative_local_expert_recv_stats=stats_r,
                                                        **kw)  # fmt: skip
    if rhook is not None:
        rhook()
    gx, gcount, gh, _, ghook = cuda.low_latency_dispatch(x, idx, M, E, cumulative_local_expert_recv_stats=stats_c,
                                                         return_recv_hook=c["hook"], **kw)  # fmt: skip
    assert (ghook is not None) == c["hook"], tag
    if ghook is not None:
        ghook()
        with pytest.raises(RuntimeError, match="receive hook was already called"):
            ghook()  # a second receive would set the peers' acknowledgements back
    torch.cuda.synchronize()
    _compare_dispatch(tag, (gx, gcount, gh), (rx, rcount, rh))
    assert_bitwise(f"{tag} cumulative stats", stats_c, stats_r)

    y = _expert_out(rx, rank, world)
    # Slots no row landed in hold NaN: a combine that reads one poisons its token.
    y = torch.where((rh.recv_topk_pos_LS >= 0).unsqueeze(-1), y, torch.full((), float("nan"), dtype=y.dtype,
                                                                             device=y.device))  # fmt: skip
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device="cuda") if c["out"] else None
    got, _, chook = cuda.low_latency_combine(y, idx, w, gh, return_recv_hook=c["hook"], out=out)
    if chook is not None:
        chook()
    want, _, _ = ref.low_latency_combine(y, idx, w, rh)
    torch.cuda.synchronize()
    if out is not None:
        assert got.data_ptr() == out.data_ptr(), f"{tag}: combine must write into out"
    assert_bitwise(f"{tag} combine vs ascending-k FP32", got, _ascending_combine(x, idx, w, c["fp8"], c["round_scale"]))
    assert_close_bf16(f"{tag} combine vs torch backend", got, want)
    # Sums per rank, the same arithmetic on both backends: weighted with the dispatch's weights where
    # it had them, else the plain sum.
    sum_w = w if c["weights"] else None
    summed, _, shook = cuda.low_latency_combine(y, idx, sum_w, gh, return_recv_hook=c["hook"], out=out,
                                                sum_per_rank=True)  # fmt: skip
    if shook is not None:
        shook()
    want_sum, _, _ = ref.low_latency_combine(y, idx, sum_w, rh, sum_per_rank=True)
    loop = _per_rank_combine(x, idx, w if c["weights"] else torch.ones_like(w), c["fp8"], c["round_scale"], world)
    torch.cuda.synchronize()
    assert_bitwise(f"{tag} sum_per_rank vs loop", summed, loop)
    assert_bitwise(f"{tag} sum_per_rank vs torch backend", summed, want_sum)


def suite_matches_torch(rank: int, world: int, seed: int, transport: str = "auto") -> None:
    cuda, ref = _buffers(world, transport=transport)
    gen = rank_generator(seed, rank)
    pick = torch.Generator().manual_seed(seed)  # the same case list on every rank
    cases = []
    for i in range(24):
        H = (2048, 4096, 7168)[i % 3]
        M = (16, 64)[i % 2]
        fp8 = i % 4 >= 2
        cases.append({
            "H": H, "M": M, "K": 1 + i % 9, "fp8": fp8, "round_scale": fp8 and i % 8 >= 4,
            # kind independent of fp8 (i % 4), so BF16 rows meet every routing too
            "kind": ("random", "random", "one_expert", "none")[(i // 2) % 4] if i % 5 else "random",
            "hook": bool(torch.randint(2, (1,), generator=pick)), "weights": i % 3 != 1, "out": i % 5 == 2,
            # tokens differ per rank, from 0 to M
            "T": int(torch.randint(0 if i % 6 == 0 else 1, M + 1, (world,), generator=pick)[rank]),
        })  # fmt: skip
    for c in cases:
        _run_case(cuda, ref, rank, world, c, gen)
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()


def suite_two_in_flight(rank: int, world: int, seed: int, transport: str = "auto") -> None:
    """Two dispatches sent before either is received (the two buffer halves), then both combines."""
    cuda, ref = _buffers(world, transport=transport)
    gen = rank_generator(seed, rank)
    T, H, K, M = 48, 4096, 6, 64
    calls = []  # (x, topk_idx, use_fp8) of the two calls
    for fp8 in (False, True):
        calls.append(
            (torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda(), routing("random", T, K, E, rank, gen), fp8)
        )
    w = torch.rand((T, K), generator=gen).cuda()
    refs = [ref.low_latency_dispatch(x, i, M, E, use_fp8=f, topk_weights=w) for x, i, f in calls]
    sent = [
        cuda.low_latency_dispatch(x, i, M, E, use_fp8=f, topk_weights=w, return_recv_hook=True) for x, i, f in calls
    ]
    for s in sent:
        s[4]()  # both halves hold a call before the first receive
    torch.cuda.synchronize()
    for n in range(2):
        _compare_dispatch(f"in flight #{n}", sent[n][:3], refs[n][:3])
    combined = []
    for n, (_, i, _) in enumerate(calls):
        y = _expert_out(refs[n][0], rank, world)
        combined.append(cuda.low_latency_combine(y, i, w, sent[n][2], return_recv_hook=True))
    for c in combined:
        c[2]()
    torch.cuda.synchronize()
    for n, (x, i, f) in enumerate(calls):
        assert_bitwise(f"in flight combine #{n}", combined[n][0], _ascending_combine(x, i, w, f, False))

    # Rows K channels wide (what the weight gradient of the autograd pair sends): the unvectorised path.
    h, idx = sent[0][2], calls[0][1]
    code_LS = (h.recv_src_info_LS * 16 + h.recv_topk_pos_LS).clamp_min(0).float()
    rows = code_LS.unsqueeze(-1).expand(-1, -1, K).to(torch.bfloat16).contiguous()
    got = cuda.low_latency_combine(rows, idx, w, dataclasses.replace(h, hidden=K))[0]
    acc = torch.zeros((T, K), dtype=torch.float32, device="cuda")
    for k in range(K):
        val = (torch.arange(T, device="cuda") * 16 + k).float().to(torch.bfloat16).float().unsqueeze(1).expand(T, K)
        acc = acc + torch.where((idx[:, k] >= 0).unsqueeze(1), w[:, k : k + 1] * val, torch.zeros_like(val))
    torch.cuda.synchronize()
    assert_bitwise("combine of K-wide rows", got, acc.to(torch.bfloat16))
    dist.barrier()
    cuda.destroy()


def suite_graph(rank: int, world: int, seed: int, transport: str = "auto") -> None:
    """dispatch (FP8, hook inside the graph) + combine (and with sums per rank) captured once, replayed
    on changing x and routing."""
    cuda, ref = _buffers(world, transport=transport)
    gen = rank_generator(seed, rank)
    T, H, K, M = 40 + rank, 7168, 8, 64
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    idx = routing("random", T, K, E, rank, gen)
    w = torch.rand((T, K), generator=gen).cuda()
    static_y = torch.zeros((E // world, world * M, H), dtype=torch.bfloat16, device="cuda")

    def step():
        recv, count, handle, _, hook = cuda.low_latency_dispatch(x, idx, M, E, use_fp8=True, topk_weights=w,
                                                                 return_recv_hook=True)  # fmt: skip
        hook()
        combined, _, _ = cuda.low_latency_combine(static_y, idx, w, handle)
        summed, _, _ = cuda.low_latency_combine(static_y, idx, w, handle, sum_per_rank=True)
        return recv, count, handle, combined, summed

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_recv, g_count, g_handle, g_combined, g_summed = step()
    for it in range(12):
        x.copy_(torch.randn((T, H), generator=gen).to(torch.bfloat16))
        idx.copy_(routing("random" if it % 3 else "one_expert", T, K, E, rank, gen))
        w.copy_(torch.rand((T, K), generator=gen))
        r = ref.low_latency_dispatch(x, idx, M, E, use_fp8=True, topk_weights=w)
        static_y.copy_(_expert_out(r[0], rank, world))
        graph.replay()
        torch.cuda.synchronize()
        tag = f"rank {rank} seed {seed} graph replay {it}"
        cuda.check()  # a failure a kernel reported (timeout, mismatch) by name, not as differing outputs
        _compare_dispatch(tag, (g_recv, g_count, g_handle), r[:3])
        assert_bitwise(f"{tag} combine", g_combined, _ascending_combine(x, idx, w, True, False))
        # The slot map is never cleared: entries of the routing of earlier replays must be ignored.
        assert_bitwise(f"{tag} sums per rank", g_summed, _per_rank_combine(x, idx, w, True, False, world))
    dist.barrier()
    cuda.destroy()


def _expect_error(kind, fn, *words) -> None:
    try:
        fn()
        torch.cuda.synchronize()
        fn()  # the failure is raised at the latest by the next call
    except kind as exc:
        for word in words:
            assert word in str(exc), f"{word!r} not in {exc}"
    else:
        raise AssertionError(f"no {kind.__name__}")


def suite_failures(rank: int, world: int, seed: int, transport: str = "auto") -> None:
    """Ranks that disagree raise RankMismatchError; a rank that skips a call makes its peers time out."""
    T, H, K = 16, 2048, 2
    gen = rank_generator(seed, rank)
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    idx = routing("random", T, K, E, rank, gen)
    odd = rank == world - 1
    cuda, _ = _buffers(world, timeout_s=5.0, transport=transport)
    M = 2 * T if odd else T
    _expect_error(RankMismatchError, lambda: cuda.low_latency_dispatch(x, idx, M, E, use_fp8=False),
                  "num_max_dispatch_tokens_per_rank")  # fmt: skip
    with pytest.raises(CommError):  # a failed buffer refuses later calls
        cuda.low_latency_dispatch(x, idx, T, E)
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    cuda, _ = _buffers(world, timeout_s=5.0, transport=transport)
    recv, _, handle, _, _ = cuda.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    y = _expert_out(recv, rank, world)
    w = torch.rand((T, K), generator=gen).cuda()
    if odd:
        _expect_error(RankMismatchError, lambda: cuda.low_latency_combine(y, idx, w, handle), "op is")
    else:
        _expect_error(RankMismatchError, lambda: cuda.low_latency_dispatch(x, idx, T, E, use_fp8=False), "op is")
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    # Sums per rank: weighted on every rank but the last, which asks for the plain sum.
    cuda, _ = _buffers(world, timeout_s=5.0, transport=transport)
    recv, _, handle, _, _ = cuda.low_latency_dispatch(x, idx, T, E, use_fp8=False, topk_weights=w)
    y = _expert_out(recv, rank, world)
    _expect_error(RankMismatchError,
                  lambda: cuda.low_latency_combine(y, idx, None if odd else w, handle, sum_per_rank=True),
                  "plain sum without topk_weights")  # fmt: skip
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    cuda, _ = _buffers(world, timeout_s=3.0, transport=transport)
    if rank == 0:
        _expect_error(CommTimeoutError, lambda: cuda.low_latency_dispatch(x, idx, T, E), "timed out")
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    # Buffer.check: waits for the kernels and raises what they reported, without a next call.
    cuda, _ = _buffers(world, timeout_s=3.0, transport=transport)
    if rank == 0:
        cuda.low_latency_dispatch(x, idx, T, E)  # returns at once; its kernel times out
        with pytest.raises(CommTimeoutError, match="timed out"):
            cuda.check()
        with pytest.raises(CommError, match="unusable after an earlier failure"):
            cuda.check()
    else:
        cuda.check()  # nothing failed here
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    # Ranks whose low-latency grids differ (GPUs with other SM counts): every rank reports the grid
    # size; the rank that waits for more blocks than its source runs must not end in a timeout.
    cuda, _ = _buffers(world, timeout_s=20.0, transport=transport)
    if odd:
        runtime = cuda._backend._ll
        runtime.set_num_sms(runtime.num_sms() - 4)
    _expect_error(RankMismatchError, lambda: cuda.low_latency_dispatch(x, idx, T, E, use_fp8=False), "grid size")
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()

    # An expert id out of range is skipped like -1 but reported, never dropped in silence.
    cuda, _ = _buffers(world, timeout_s=3.0, transport=transport)
    bad = idx.clone()
    bad[T // 2, 0] = E
    cuda.low_latency_dispatch(x, bad, T, E, use_fp8=False)
    with pytest.raises(CommError, match=rf"topk_idx\[{T // 2}, 0\] is {E}"):
        cuda.check()
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()


@pytest.mark.parametrize("rma_staging", [False, True])
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("hidden", [128, 2048, 7168])
@pytest.mark.parametrize("max_tokens,num_experts", [(1, 8), (128, 256), (256, 64)])
def test_layout_matches_kernels(num_ranks, hidden, max_tokens, num_experts, rma_staging):
    if not _ext.is_available():
        pytest.skip(str(_ext.unavailable_reason()))
    got = _ext.load().low_latency_bytes(max_tokens, hidden, num_ranks, num_experts, rma_staging)
    assert got == layout.low_latency_buffer_bytes(max_tokens, hidden, num_ranks, num_experts, rma_staging)


def test_dispatch_combine_match_torch(num_gpus, transport):
    """BF16/FP8 (+ round_scale), hidden 2048/4096/7168, top-k 1..9, -1 entries, T from 0 to M, hooks, out=."""
    run_seeded(suite_matches_torch, num_gpus, transport)


def test_two_calls_in_flight(num_gpus, transport):
    run_seeded(suite_two_in_flight, num_gpus, transport)


def test_graph_replay_on_changing_data(num_gpus, transport):
    run_seeded(suite_graph, num_gpus, transport)


def test_mismatched_calls_raise(num_gpus, transport):
    """Also, with NVSHMEM, three buffers one after another: each reuses the block the last one freed."""
    run_seeded(suite_failures, num_gpus, transport)


@pytest.mark.parametrize("suite", [suite_matches_torch, suite_two_in_flight, suite_graph, suite_failures],
                         ids=lambda f: f.__name__.removeprefix("suite_"))  # fmt: skip
def test_two_processes_on_one_gpu(kernels, transport, suite):
    """Two ranks as two processes sharing GPU 0: separate CUDA contexts (time-sliced), and with NVSHMEM
    two PEs of one job; with ``nvshmem-rma`` every row, count and signal an NVSHMEM device call
    between the two PEs.  What a machine with one GPU can check of the protocol between processes."""
    run_seeded(suite, 2, transport, one_gpu=True)


def suite_ranks_on_separate_nodes(rank: int, world: int, seed: int, transport: str) -> None:
    """Every rank claims a node of its own (this process's node id patched): the Buffer takes the
    path of a group across nodes (low-latency calls only, NVSHMEM memory, NVSHMEM's device library;
    the peers NVSHMEM cannot map reached by puts), refuses what that path cannot serve with the
    reason on every rank, and its low-latency calls match the torch backend."""
    from ep_train.backends import cuda as cuda_backend

    cuda_backend.node_id = lambda: f"node {rank}"
    rdma = Buffer.get_low_latency_rdma_size_hint(M_MAX, H_MAX, world, E, rma_staging=True)
    with pytest.raises(ValueError, match="normal dispatch/combine need every rank on one node"):
        Buffer(None, 1 << 20, rdma, low_latency_mode=True, backend="cuda")
    if transport == "ipc" or not _ext.load().NVSHMEM_DEVICE:
        why = "EP_TRAIN_LL_TRANSPORT=ipc" if transport == "ipc" else "NVSHMEM's device library"
        with pytest.raises(ValueError, match=why):
            _buffers(world, transport=transport)
        dist.barrier()
        return
    cuda, _ = _buffers(world, transport=transport)
    assert cuda._backend.num_nodes == world and not cuda._backend.serves_normal_calls
    gen = rank_generator(seed, rank)
    idx = routing("random", 8, 2, E, rank, gen)
    per_rank, _, per_expert, in_rank, _ = cuda.get_dispatch_layout(idx, E)
    x = torch.randn((8, 2048), generator=gen).to(torch.bfloat16).cuda()
    with pytest.raises(ValueError, match="spans nodes"):
        cuda.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                      topk_idx=idx, topk_weights=torch.rand((8, 2), device="cuda"))  # fmt: skip
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()
    suite_matches_torch(rank, world, seed, transport)
    suite_graph(rank, world, seed, transport)


def test_ranks_on_separate_nodes(kernels, transport):
    """Two processes on GPU 0 (or the first two GPUs), each rank claiming its own node."""
    run_seeded(suite_ranks_on_separate_nodes, 2, transport, one_gpu=torch.cuda.device_count() == 1)


def suite_transport_choice(rank: int, world: int, seed: int) -> None:
    """``auto`` takes NVSHMEM where it is usable, and a new group of the same ranks shares its job."""
    from ep_train import nvshmem

    cuda, _ = _buffers(world)
    want = "nvshmem" if nvshmem.unavailable_reason() is None else "ipc"
    assert cuda.low_latency_transport == want, (cuda.low_latency_transport, nvshmem.unavailable_reason())
    cuda.destroy()
    if want == "nvshmem":
        # The job's PEs are the world group; a new group of the same ranks reuses the job, and the
        # next buffer reuses the freed block (same address).
        block = nvshmem.heap_for(dist.group.WORLD).blocks[0]
        other = dist.new_group(list(range(world)))
        rdma = Buffer.get_low_latency_rdma_size_hint(M_MAX, H_MAX, world, E)
        again = Buffer(other, 0, rdma, low_latency_mode=True, backend="cuda")
        assert again.low_latency_transport == "nvshmem" and block.in_use
        again.destroy()
        assert not block.in_use
    dist.barrier()


def test_transport_choice(num_gpus):
    run_seeded(suite_transport_choice, num_gpus)


def suite_phase_trace(rank: int, world: int, seed: int) -> None:
    """The diagnostic phase trace: every boundary recorded, in order, results unchanged, off again."""
    cuda, _ = _buffers(world)
    points = _ext.load().LOW_LATENCY_TRACE_POINTS
    with pytest.raises(ValueError, match="trace"):
        cuda._backend.set_low_latency_trace(torch.zeros((2, points), dtype=torch.int32, device="cuda"))
    gen = rank_generator(seed, rank)
    T, H, K, M = 24 + rank, 2048, 4, 32
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).cuda()
    idx = routing("random", T, K, E, rank, gen)
    w = torch.rand((T, K), generator=gen).cuda()

    def step():
        recv, count, handle, _, _ = cuda.low_latency_dispatch(x, idx, M, E, use_fp8=False, topk_weights=w)
        combined, _, _ = cuda.low_latency_combine(_expert_out(recv, rank, world), idx, w, handle)
        torch.cuda.synchronize()
        return recv.clone(), count.clone(), combined.clone()

    plain = step()
    trace = torch.zeros((2, points), dtype=torch.int64, device="cuda")
    cuda._backend.set_low_latency_trace(trace)
    traced = step()
    cuda._backend.set_low_latency_trace(None)
    assert_bitwise("traced recv_count", traced[1], plain[1])
    assert_bitwise("traced combine", traced[2], plain[2])
    for l, n in enumerate(plain[1].tolist()):  # noqa: E741 - l is the local expert; filled slots only
        assert_bitwise(f"traced recv_x expert {l}", traced[0][l, :n], plain[0][l, :n])
    for op, row in zip(("dispatch", "combine"), trace.tolist(), strict=True):
        assert all(t > 0 for t in row), f"{op}: a boundary was not recorded: {row}"
        assert row == sorted(row), f"{op}: block 0's boundaries out of order: {row}"
    trace.zero_()
    step()
    assert int(trace.count_nonzero()) == 0, "tracing off must write nothing"
    dist.barrier()
    cuda.destroy()


def test_phase_trace(num_gpus):
    run_seeded(suite_phase_trace, num_gpus)


def suite_nvshmem_puts_one_pe(rank: int, world: int, seed: int) -> None:
    """The low-latency matrix with every row, header, count and signal an NVSHMEM device call (one PE:
    every put goes to itself), on an NVSHMEM symmetric block."""
    from ep_train import nvshmem

    from .test_one_gpu_group import low_latency_matrix, low_latency_matrix_bytes

    heap = nvshmem.heap_for(dist.group.WORLD)
    assert not isinstance(heap, str), heap
    block = heap.alloc(dist.group.WORLD, low_latency_matrix_bytes(1, rma_staging=True))
    low_latency_matrix(1, 1, _ext.load().LOW_LATENCY_RMA_NVSHMEM, [block.ptr], seed)


def test_low_latency_nvshmem_puts_one_pe():
    if not _ext.is_available():
        pytest.skip(str(_ext.unavailable_reason()))
    if not _ext.load().NVSHMEM_DEVICE:
        pytest.skip("ep_train._C built without NVSHMEM's device library (EP_TRAIN_NVSHMEM_DEVICE=1 adds it)")
    from ep_train import nvshmem

    reason = nvshmem.unavailable_reason(load=False)
    if reason is not None:
        pytest.skip(f"NVSHMEM: {reason}")
    run_seeded(suite_nvshmem_puts_one_pe, 1)


def suite_autograd_pair(rank: int, world: int, seed: int, transport: str) -> None:
    """The differentiable low-latency pair on the kernels against the torch backend, BF16: output,
    the input gradient and the weight gradient, with the combine weighted by the dispatch's weights
    and by weights of its own (renormalised after the dispatch).  The weight gradients cross the
    kernels as BF16 pairs (hi, lo): they must agree with the torch backend's FP32 ones to ~1e-4."""
    import ep_train.autograd as A

    cuda, ref = _buffers(world, transport=transport)
    gen = rank_generator(seed, rank)
    T, H, K, M = 48, 512, 4, 64
    idx = routing("random", T, K, E, rank, gen)
    w0 = torch.rand(T, K, generator=gen).cuda()
    x0 = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    gout = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    for own_weights in (False, True):
        results = []
        for buf in (cuda, ref):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            recv, _, h = A.low_latency_dispatch(buf, x, idx, w, M, E)
            y = _expert_out(recv, rank, world)
            out = A.low_latency_combine(buf, y, idx, 2 * w + 0.1 if own_weights else w, h)
            out.backward(gout)
            results.append((out.detach().float(), x.grad.float(), w.grad.double()))
        tag = f"[rank {rank} seed {seed} own weights {own_weights}]"
        for name, got, want, tol in zip(("output", "grad x", "grad topk_weights"), *results, (1e-2, 1e-2, 1e-4),
                                        strict=True):  # fmt: skip
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
            assert err <= tol, f"{name} {tag}: max error {err:.3g} of the largest value (tolerance {tol:g})"
    torch.cuda.synchronize()
    dist.barrier()
    cuda.destroy()


def test_autograd_pair_matches_torch_backend(num_gpus, transport):
    run_seeded(suite_autograd_pair, num_gpus, transport)


def test_autograd_pair_two_processes_on_one_gpu(kernels, transport):
    run_seeded(suite_autograd_pair, 2, transport, one_gpu=True)
