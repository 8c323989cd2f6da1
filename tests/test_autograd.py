"""Autograd pairs: gradients against a single-process dense float64 MoE, gradcheck, checkpoint replay."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

import ep_train.autograd as A
from ep_train import Buffer, MoEDispatcher
from ep_train.fp8 import dequantize_fp8, quantize_fp8
from ep_train.moe import dense_moe_reference, grouped_mlp
from ep_train.testing import make_routing, run_distributed
from ep_train.testing.routing import rank_generator

E, F = 8, 3
DT = torch.float64


def _buffer(R, hidden, max_tokens, backend="auto"):
    nvl = Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(hidden * 8, R)
    rdma = Buffer.get_low_latency_rdma_size_hint(max_tokens, max(hidden, 16) * 4, R, E)
    return Buffer(dist.group.WORLD, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True, timeout_s=60,
                  backend=backend)  # fmt: skip


def _device(rank: int) -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU (gloo)."""
    return torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def _model(R, T, H, K, kind, seed, device=torch.device("cpu")):
    """Shared expert weights and every rank's routing, tokens and output gradient; ``T`` is one token
    count for every rank or a list of per-rank counts (0 allowed)."""
    Ts = [T] * R if isinstance(T, int) else list(T)
    g = rank_generator(seed, 999)
    w1, w2 = torch.randn(E, H, 2 * F, generator=g, dtype=DT), torch.randn(E, F, H, generator=g, dtype=DT)
    routes = [make_routing(kind, Ts[r], E, K, R, seed, r) for r in range(R)]
    xs = [torch.randn(Ts[r], H, generator=rank_generator(seed, r, 3), dtype=DT) for r in range(R)]
    grads = [torch.randn(Ts[r], H, generator=rank_generator(seed, r, 4), dtype=DT) for r in range(R)]
    idxs, ws = [i for i, _ in routes], [w.double() for _, w in routes]
    return tuple(
        [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for v in (w1, w2, idxs, ws, xs, grads)
    )


def _layer(dispatcher, idx, lw1, lw2):
    def run(x, w):
        x_pd, tpe, probs, h = dispatcher.dispatch(x, idx, w)
        return dispatcher.combine(grouped_mlp(x_pd, tpe, lw1, lw2) * probs.unsqueeze(-1), h)

    return run


def _count_buffer_calls(buffer) -> list[str]:
    """Record this Buffer's layout and dispatch calls (``new`` or ``cached`` by the handle) from now on."""
    calls, layout, dispatch = [], buffer.get_dispatch_layout, buffer.dispatch

    def counted_layout(*args, **kwargs):
        calls.append("layout")
        return layout(*args, **kwargs)

    def counted_dispatch(x, handle=None, *args, **kwargs):
        calls.append("new dispatch" if handle is None else "cached dispatch")
        return dispatch(x, handle, *args, **kwargs)

    buffer.get_dispatch_layout, buffer.dispatch = counted_layout, counted_dispatch
    return calls


def _grads_body(rank, R, seed, kind, K, backend="auto", tokens=None, fp8=False, **dispatcher_options):
    """One MoE layer through MoEDispatcher against the dense float64 reference of all ranks' tokens.

    ``tokens``: per-rank token counts (default 5 each).  ``fp8``: the dispatch moves e4m3 rows; the
    reference then runs on the rows as the receiver dequantises them, and gradients pass straight
    through the quantisation.  ``dispatcher_options``: more ``MoEDispatcher`` arguments.
    """
    H = 4
    T = tokens if tokens is not None else 5
    L = E // R
    w1, w2, idxs, ws, xs, gouts = _model(R, T, H, K, kind, seed, _device(rank))
    # Checkpoint replay also dispatches the K gate weights as a row: size the buffer for both.
    disp = MoEDispatcher(_buffer(R, max(H, K), max(xs[r].shape[0] for r in range(R)) or 1, backend), E,
                         expert_alignment=2, fp8=fp8, **dispatcher_options)  # fmt: skip
    seen = [dequantize_fp8(*quantize_fp8(a), DT) if fp8 else a for a in xs]  # what the experts see
    lw1 = w1[rank * L : (rank + 1) * L].clone().requires_grad_()
    lw2 = w2[rank * L : (rank + 1) * L].clone().requires_grad_()
    layer = _layer(disp, idxs[rank], lw1, lw2)
    x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
    y = layer(x, w)
    y.backward(gouts[rank])
    X = [a.clone().requires_grad_() for a in seen]
    W = [a.clone().requires_grad_() for a in ws]
    W1, W2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    total = sum((dense_moe_reference(X[r], idxs[r], W[r], W1, W2) * gouts[r]).sum() for r in range(R))
    total.backward()
    tag = f"[seed {seed} kind {kind} K {K} tokens {T} fp8 {fp8}]"
    y_ref = dense_moe_reference(seen[rank], idxs[rank], ws[rank], w1, w2)
    for name, a, b in (
        ("output", y, y_ref),
        ("grad x", x.grad, X[rank].grad),
        ("grad topk_weights", w.grad, W[rank].grad),
        ("grad w1", lw1.grad, W1.grad[rank * L : (rank + 1) * L]),
        ("grad w2", lw2.grad, W2.grad[rank * L : (rank + 1) * L]),
    ):
        b = torch.zeros_like(a) if b is None else b  # the reference's graph misses an input of no rows
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n} {tag}: {m}")

    # Activation checkpointing replays the routing: bitwise-equal gradients, and the recomputation
    # dispatches with the recorded handle (no layout, no count exchange).
    lw1.grad = lw2.grad = None
    x2, w2_ = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
    calls = _count_buffer_calls(disp.buffer)
    y2 = A.checkpoint(layer, x2, w2_)
    forward = list(calls)
    y2.backward(gouts[rank])
    assert torch.equal(y2, y) and torch.equal(x2.grad, x.grad) and torch.equal(w2_.grad, w.grad), tag
    assert forward.count("layout") == 1 and forward.count("new dispatch") == 1, (forward, tag)
    recomputed = calls[len(forward) :]
    # The recomputation's (rows, and the gate weights with them) and the combine's backward: cached
    # dispatches only, at least two (the backward alone makes one).
    assert recomputed.count("cached dispatch") >= 2 and set(recomputed) == {"cached dispatch"}, (recomputed, tag)

    if fp8:  # finite differences see the quantisation steps, the straight-through gradient does not
        return
    if len({a.shape[0] for a in xs}) > 1:  # gradcheck calls the layer once per local element: ranks must match
        return
    # gradcheck w.r.t. x and topk_weights (expert weights fixed: they are shared across ranks).
    ok = torch.autograd.gradcheck(
        layer, (xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()), eps=1e-6, atol=1e-5, rtol=1e-4
    )
    assert ok, tag


def _low_latency_body(rank, R, seed, kind, K, backend="auto", sum_per_rank=False, own_weights=False):
    """``own_weights``: the combine weights with ``2 w + 0.1`` (a function of the dispatch's weights,
    so both paths of their gradient count), not with the weights the dispatch carried."""
    T, H, M = 4, 3, 6
    _, _, idxs, ws, xs, gouts = _model(R, T, H, K, kind, seed, _device(rank))
    buf = _buffer(R, H, M, backend)
    idx = idxs[rank]

    L = E // R
    # Expert e computes (e + 1) * x + x**2: a gradient sent to another expert's (or column's) slot
    # changes the result.
    scale_L = torch.arange(rank * L + 1, (rank + 1) * L + 1, dtype=DT, device=xs[rank].device).view(L, 1, 1)

    def combine_weights(w):
        return 2 * w + 0.1 if own_weights else w

    def ll(x, w):
        recv, _, h = A.low_latency_dispatch(buf, x, idx, w, M, E, sum_per_rank=sum_per_rank)
        return A.low_latency_combine(buf, recv * scale_L + recv**2, idx, combine_weights(w), h,
                                     sum_per_rank=sum_per_rank)  # fmt: skip

    x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
    y = ll(x, w)
    want = torch.zeros(T, H, dtype=DT, device=x.device)
    for t in range(T):
        for k in range(K):
            if idx[t, k] >= 0:
                weight = combine_weights(ws[rank][t, k])
                want[t] += weight * (xs[rank][t] * (int(idx[t, k]) + 1) + xs[rank][t] ** 2)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ll, (x, w), eps=1e-6, atol=1e-5, rtol=1e-4), f"[seed {seed} kind {kind} K {K}]"


CASES = [("uniform", 2), ("masked", 3), ("one_expert", 1), ("empty_rank", 2), ("dropped_rows", 8)]
# Every routing kind at EP2, each with its own per-rank token counts (a rank without tokens included).
SKEWED = [("uniform", 2, (5, 0)), ("masked", 3, (5, 5)), ("one_expert", 1, (0, 4)), ("empty_rank", 2, (5, 5)),
          ("dropped_rows", 8, (4, 5)), ("one_rank", 3, (5, 2))]  # fmt: skip


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_dispatch_combine_gradients_match_dense_reference(world_size):
    seed = random.randrange(1 << 30)
    kind, K = random.Random(seed).choice(CASES)
    run_distributed(_grads_body, world_size, seed, kind, K, timeout_s=600)


@pytest.mark.parametrize("kind,K,tokens", SKEWED)
def test_dispatch_combine_gradients_skewed_routing(kind, K, tokens):
    run_distributed(_grads_body, 2, random.randrange(1 << 30), kind, K, tokens=tokens, timeout_s=600)


@pytest.mark.parametrize("options", [{"fused_permutation": False}, {"num_worst_tokens": 16}],
                         ids=["dispatch then permute", "fixed receive size"])  # fmt: skip
@pytest.mark.parametrize("kind,K,tokens", [("masked", 3, (5, 0)), ("one_expert", 2, (4, 6))])
def test_dispatch_combine_gradients_other_dispatcher_paths(kind, K, tokens, options):
    """The dispatcher's unfused path and its fixed-size (num_worst_tokens, padding rows) path."""
    run_distributed(_grads_body, 2, random.randrange(1 << 30), kind, K, tokens=tokens, timeout_s=600, **options)


@pytest.mark.parametrize("world_size, kind, K, tokens", [(2, "uniform", 3, (5, 4)), (4, "empty_rank", 2, (3, 0, 5, 4))])
def test_fp8_dispatch_gradients_match_dense_reference_on_dequantised_rows(world_size, kind, K, tokens):
    run_distributed(_grads_body, world_size, random.randrange(1 << 30), kind, K, tokens=tokens, fp8=True,
                    timeout_s=600)  # fmt: skip


@pytest.mark.parametrize("sum_per_rank", [False, True])
@pytest.mark.parametrize("world_size", [2, 4])
def test_low_latency_pair_gradcheck(world_size, sum_per_rank):
    seed = random.randrange(1 << 30)
    kind, K = random.Random(seed).choice(CASES)
    run_distributed(_low_latency_body, world_size, seed, kind, K, sum_per_rank=sum_per_rank, timeout_s=600)


@pytest.mark.parametrize("kind, K", [("uniform", 2), ("masked", 3), ("dropped_rows", 8)])
def test_low_latency_combine_with_its_own_weights_gradcheck(kind, K):
    """The combine's weights are not the dispatch's: the expert-output gradient uses the combine's."""
    run_distributed(_low_latency_body, 2, random.randrange(1 << 30), kind, K, own_weights=True, timeout_s=600)


def _low_latency_bf16_weight_grads(rank, R, seed):
    """BF16 rows on a backend that moves only BF16 (as the CUDA kernels): the weight gradients
    still come back to FP32 precision of their BF16 inputs, not rounded to BF16."""
    T, H, M, K = 6, 64, 8, 3
    _, _, idxs, ws, xs, gouts = _model(R, T, H, K, "masked", seed)
    buf = _buffer(R, H, M)
    buf._backend.supported_dtypes = (torch.bfloat16,)
    idx, w = idxs[rank], ws[rank].float().requires_grad_()
    x = xs[rank].to(torch.bfloat16)
    recv, _, h = A.low_latency_dispatch(buf, x, idx, w.detach(), M, E)
    y = A.low_latency_combine(buf, recv, idx, w, h)  # experts: identity
    gout = gouts[rank].to(torch.bfloat16)
    y.backward(gout)
    want = torch.where(idx >= 0, (gout.double() @ x.double().T).diagonal().unsqueeze(-1).expand(T, K), 0.0)
    got = w.grad.double()
    assert torch.allclose(got, want, rtol=2e-5, atol=1e-5 * want.abs().max().item()), (got - want).abs().max()


def test_low_latency_weight_grads_keep_fp32_precision_over_bf16_rows():
    run_distributed(_low_latency_bf16_weight_grads, 2, random.randrange(1 << 30), timeout_s=600)
