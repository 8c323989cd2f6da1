"""The differentiable dispatch's own outputs, checked directly against explicit loops.

- The gradient of ``recv_topk_weights``: a rank's received weight column k belongs to the token's
  expert k only where that expert is local (``recv_topk_idx >= 0``); every other column is a zero
  that must pass no gradient back.  So the gradient of ``topk_weights[t, k]`` is exactly the upstream
  gradient of the one received row of token t on the rank that owns expert k (bitwise: one term).
- Routing replay under ``ep_train.autograd.checkpoint``: the recomputed forward's
  ``recv_topk_weights`` are the first forward's bits (non-local weights zero), and a recomputation
  that routes differently raises ``RuntimeError``.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

import ep_train.autograd as A
from ep_train import Buffer
from ep_train.testing import assert_bitwise_equal, run_distributed
from ep_train.testing.routing import rank_generator

E, K, H = 8, 3, 4


def _buffer(R: int) -> Buffer:
    # The replay also dispatches the K gate weights as rows: size for the wider of the two.
    nvl = Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(max(H, K) * 8, R)
    return Buffer(dist.group.WORLD, num_nvl_bytes=nvl, timeout_s=60, backend="torch")


def _routing(seed: int, rank: int, num_tokens: int, salt: int = 1) -> torch.Tensor:
    """``[T, K]``: distinct experts per token, about a fifth of the slots -1."""
    g = rank_generator(seed, rank, salt)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(num_tokens)])
    return idx.masked_fill(torch.rand(num_tokens, K, generator=g) < 0.2, -1)


def _received(idxs: list[torch.Tensor], R: int) -> list[dict[tuple[int, int], int]]:
    """Per rank d: {(source rank, source token): row}, rows by source rank then token."""
    L, where = E // R, [{} for _ in range(R)]
    for s in range(R):
        for t in range(idxs[s].shape[0]):
            for d in sorted({e // L for e in idxs[s][t].tolist() if e >= 0}):
                where[d][(s, t)] = len(where[d])
    return where


def _expected_recv_weights(idxs, ws, where, d: int, R: int) -> torch.Tensor:
    """Rank d's ``recv_topk_weights``: the source's weight where expert k lives on d, else 0."""
    L = E // R
    out = torch.zeros(len(where[d]), K)
    for (s, t), n in where[d].items():
        for k in range(K):
            e = int(idxs[s][t, k])
            if e >= 0 and e // L == d:
                out[n, k] = ws[s][t, k]
    return out


def _inputs(seed, R):
    counts = [random.Random(seed + s).randint(4, 9) for s in range(R)]
    idxs = [_routing(seed, s, counts[s]) for s in range(R)]
    ws = [torch.rand(counts[s], K, generator=rank_generator(seed, s, 2)) for s in range(R)]
    xs = [torch.randn(counts[s], H, generator=rank_generator(seed, s, 3)) for s in range(R)]
    return counts, idxs, ws, xs


def _weight_grad_body(rank, R, seed):
    L = E // R
    counts, idxs, ws, xs = _inputs(seed, R)
    where = _received(idxs, R)
    grads = [torch.randn(len(where[d]), K, generator=rank_generator(seed, d, 4)) for d in range(R)]
    want = torch.zeros(counts[rank], K)  # explicit loop: the owning rank's upstream gradient
    for t in range(counts[rank]):
        for k in range(K):
            e = int(idxs[rank][t, k])
            if e >= 0:
                want[t, k] = grads[e // L][where[e // L][(rank, t)], k]
    buf = _buffer(R)
    for num_worst_tokens in (0, max(len(w) for w in where) + 3):
        tag = f"[seed {seed} rank {rank} num_worst_tokens {num_worst_tokens}]"
        x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
        out = A.dispatch(buf, x, idxs[rank], w, E, num_worst_tokens=num_worst_tokens)
        n = len(where[rank])
        assert_bitwise_equal(out.recv_topk_weights[:n], _expected_recv_weights(idxs, ws, where, rank, R), tag)
        # The upstream gradient is nonzero in every slot, local or not (and in padding rows).
        g = torch.randn(out.recv_topk_weights.shape, generator=rank_generator(seed, rank, 5))
        g[:n] = grads[rank]
        (out.recv_topk_weights * g).sum().backward()
        assert_bitwise_equal(w.grad, want, f"grad of topk_weights {tag}")
        assert_bitwise_equal(x.grad, torch.zeros_like(x), f"grad of x {tag}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_weight_gradient_is_the_owning_ranks_upstream_gradient(world_size):
    run_distributed(_weight_grad_body, world_size, random.randrange(1 << 30), timeout_s=120)


def _check_replayed_weights(rank, R, seed):
    tag = f"[seed {seed} rank {rank}]"
    counts, idxs, ws, xs = _inputs(seed, R)
    where = _received(idxs, R)
    want_w = _expected_recv_weights(idxs, ws, where, rank, R)
    scale = torch.randn(len(where[rank]), K, generator=rank_generator(seed, rank, 6))
    gout = torch.randn(counts[rank], H, generator=rank_generator(seed, rank, 7))
    buf = _buffer(R)
    seen: list[torch.Tensor] = []

    def layer(x, w):  # the rows scaled by a function of all K received weights (non-local ones too)
        out = A.dispatch(buf, x, idxs[rank], w, E)
        seen.append(out.recv_topk_weights.detach().clone())
        rows = out.recv_x * (out.recv_topk_weights * scale).sum(1, keepdim=True)
        return A.combine(buf, rows, out.handle)

    results = []
    for fn in (layer, lambda x, w: A.checkpoint(layer, x, w)):
        x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
        y = fn(x, w)
        y.backward(gout)
        results.append((y.detach(), x.grad, w.grad))
    assert len(seen) == 3, f"expected forward, checkpointed forward and its recomputation, got {len(seen)} {tag}"
    for i, name in enumerate(("first forward", "checkpointed forward", "recomputed forward")):
        assert_bitwise_equal(seen[i], want_w, f"recv_topk_weights of the {name} {tag}")
    for name, a, b in zip(("output", "grad x", "grad topk_weights"), *results, strict=True):
        assert_bitwise_equal(b, a, f"{name} with checkpoint replay vs without {tag}")


def _rerouted_body(rank, R, seed, in_place):
    counts, idxs, ws, xs = _inputs(seed, R)
    other = torch.where(idxs[rank] >= 0, (idxs[rank] + 1) % E, -1)  # every expert moved to the next one
    if torch.equal(other, idxs[rank]):  # no expert at all: give token 0 one
        other[0, 0] = 0
    buf = _buffer(R)
    routing = {"idx": idxs[rank]}

    def plain(x, w):
        out = A.dispatch(buf, x, routing["idx"], w, E)
        return A.combine(buf, out.recv_x * out.recv_topk_weights.sum(1, keepdim=True), out.handle)

    def expert_major(x, w):
        out = A.dispatch_to_experts(buf, x, routing["idx"], w, E)
        return A.combine_from_experts(buf, out.x * out.probs.unsqueeze(1), out.handle)

    for layer in (plain, expert_major):
        routing["idx"] = idxs[rank].clone()
        x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
        y = A.checkpoint(layer, x, w)
        if in_place:
            routing["idx"].copy_(other)
        else:
            routing["idx"] = other
        with pytest.raises(RuntimeError, match="routed differently"):
            y.sum().backward()
        dist.barrier()  # every rank raised at the same point, before the recomputation's collectives


def _replay_body(rank, R, seed):
    _check_replayed_weights(rank, R, seed)
    _rerouted_body(rank, R, seed, in_place=False)


def test_checkpoint_replay_keeps_recv_topk_weights_and_refuses_another_routing():
    """The recomputation's recv_topk_weights are the first forward's; then a recomputation whose
    topk_idx is another tensor with other experts raises (plain and expert-major dispatch).  One
    launch of 2 ranks: a process's first checkpoint imports torch._dynamo (1-2 s of CPU each)."""
    run_distributed(_replay_body, 2, random.randrange(1 << 30), timeout_s=120)


def test_replay_refuses_topk_idx_changed_in_place():
    """The caller's topk_idx changed in place between the forward and its recomputation: refused."""
    run_distributed(_rerouted_body, 2, random.randrange(1 << 30), True, timeout_s=120)


def _config_flow(rank: int, world: int, seed: int) -> int:
    """Each differentiable op's ``config`` reaches its forward call and ``grad_config`` its backward
    call (a combine for the dispatches, a dispatch for the combines); None leaves the buffer's."""
    from ep_train import Config
    from ep_train.testing.spy import record_configs

    buf = _buffer(world)
    calls = record_configs(buf)
    fwd, bwd = Config(6, 2, 8), Config(4, 1, 4)
    g = rank_generator(seed, rank, 7)
    idx = _routing(seed, rank, 5)
    checks = 0
    for grad_config in (bwd, None):
        x = torch.randn(5, H, generator=g, requires_grad=True)
        w = torch.rand(5, K, generator=g, requires_grad=True)
        calls.clear()
        out = A.dispatch(buf, x, idx, w, E, config=fwd, grad_config=grad_config)
        y = A.combine(buf, out.recv_x * 2, out.handle, config=fwd, grad_config=grad_config)
        (y.sum() + out.recv_topk_weights.sum()).backward()
        assert calls == [("dispatch", fwd), ("combine", fwd), ("dispatch", grad_config), ("combine", grad_config)], (
            calls
        )
        calls.clear()
        x.grad = w.grad = None
        em = A.dispatch_to_experts(buf, x, idx, w, E, config=fwd, grad_config=grad_config)
        y = A.combine_from_experts(buf, em.x * 2, em.handle, config=fwd, grad_config=grad_config)
        (y.sum() + em.probs.sum()).backward()
        assert calls == [("dispatch", fwd), ("combine", fwd), ("dispatch", grad_config), ("combine", grad_config)], (
            calls
        )
        checks += 2
    # Under activation checkpointing the recomputation replays the dispatch with the forward's
    # config (its gate weights travel as extra rows of a cached dispatch on the buffer's default).
    for expert_major in (False, True):
        x = torch.randn(5, H, generator=g, requires_grad=True)
        w = torch.rand(5, K, generator=g, requires_grad=True)

        def layer(x, w, expert_major=expert_major):
            if expert_major:
                em = A.dispatch_to_experts(buf, x, idx, w, E, config=fwd, grad_config=bwd)
                return A.combine_from_experts(buf, em.x * em.probs.unsqueeze(1), em.handle, config=fwd,
                                              grad_config=bwd)  # fmt: skip
            out = A.dispatch(buf, x, idx, w, E, config=fwd, grad_config=bwd)
            return A.combine(buf, out.recv_x * out.recv_topk_weights.sum(1, keepdim=True), out.handle, config=fwd,
                             grad_config=bwd)  # fmt: skip

        calls.clear()
        A.checkpoint(layer, x, w).sum().backward()
        # The combine's backward needs no recomputation; the dispatch's backward does (the
        # recomputation stops after the dispatch, the last op whose saved tensors it needs).
        first, replayed = [("dispatch", fwd), ("combine", fwd)], [("dispatch", fwd), ("dispatch", None)]
        assert calls == first + [("dispatch", bwd)] + replayed + [("combine", bwd)], (expert_major, calls)
        checks += 1
    # MoEDispatcher: its two configs serve every call of their direction, the backward's included.
    from ep_train import MoEDispatcher

    dc, cc = Config(6, 2, 8), Config(8, 1, 4)
    for fused in (True, False):
        x = torch.randn(5, H, generator=g, requires_grad=True)
        w = torch.rand(5, K, generator=g, requires_grad=True)
        disp = MoEDispatcher(buf, E, dispatch_config=dc, combine_config=cc, fused_permutation=fused)
        calls.clear()
        x_P, _, probs_P, handle = disp.dispatch(x, idx, w)
        y = disp.combine(x_P * probs_P.unsqueeze(1), handle)
        y.sum().backward()
        assert calls == [("dispatch", dc), ("combine", cc)] * 2, (fused, calls)
        checks += 1
    buf.destroy()
    return checks


def test_config_and_grad_config_reach_forward_and_backward_calls():
    assert run_distributed(_config_flow, 2, random.randrange(1 << 30), timeout_s=120) == [8, 8]
