"""The documented summation orders, checked bit for bit on FP32 rows whose sums depend on the order.

BF16 rows summed in FP32 are exact for a handful of terms, so any order gives the same bits there.
Here every term is a random FP32 value with a random binary exponent in [-12, 12] (sums round, and
the rounding depends on the order), and the results are compared bitwise with explicit loops that
add in the documented order (DESIGN.md §2, ``Buffer.combine``, ``ep_train.permute``):

- a received row's pair rows: FP32, ascending k (``unpermute_from_experts``, the backward of
  ``permute_to_experts``, the expert-major combine);
- a token's rows from the ranks: FP32, ascending rank (``Buffer.combine``).

Each test also checks that the reversed order gives other bits on its data, so it cannot pass by luck.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from ep_train import Buffer
from ep_train.permute import pair_layout, permute_to_experts, unpermute_from_experts
from ep_train.testing import assert_bitwise_equal, run_distributed
from ep_train.testing.routing import rank_generator

R, E, K, H = 4, 16, 6, 16  # 4 local experts per rank: rows carry up to 4 pairs, tokens reach up to 4 ranks


def _order_sensitive(shape, gen: torch.Generator) -> torch.Tensor:
    """FP32 ``±(1 + u) * 2^e``, e uniform in [-12, 12]: a sum of 3+ terms rounds differently by order."""
    sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1
    exp = torch.randint(-12, 13, shape, generator=gen, dtype=torch.float64)
    mant = 1 + torch.rand(shape, generator=gen, dtype=torch.float64)
    return (sign * mant * torch.pow(2.0, exp)).float()


def _distinct_experts(num_rows: int, num_experts: int, k: int, gen: torch.Generator, drop: float) -> torch.Tensor:
    """``[num_rows, k]`` int64: distinct experts per row, each slot -1 with probability ``drop``."""
    if num_rows == 0:
        return torch.zeros(0, k, dtype=torch.int64)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_rows)])
    return idx.masked_fill(torch.rand(num_rows, k, generator=gen) < drop, -1)


def _ascending_k(rows, pos: list[list[int]], hidden: int, reverse: bool = False) -> torch.Tensor:
    """``out[n]`` = FP32 sum of ``rows[pos[n][k]]`` over k with ``pos[n][k] >= 0``, ascending k."""
    out = torch.zeros(len(pos), hidden, dtype=torch.float32)
    for n, row_pos in enumerate(pos):
        acc = torch.zeros(hidden, dtype=torch.float32)
        for p in reversed(row_pos) if reverse else row_pos:
            if p >= 0:
                acc = acc + rows[p]
        out[n] = acc
    return out


def _expert_major_pos(idx_NK: torch.Tensor, num_local_experts: int, alignment: int) -> tuple[list[list[int]], int]:
    """Expert-major row of every pair (by local expert, then row; -1 = no pair) and the row count P."""
    n, k = idx_NK.shape
    pos, p = [[-1] * k for _ in range(n)], 0
    for e in range(num_local_experts):
        count = 0
        for row in range(n):
            for j in range(k):
                if int(idx_NK[row, j]) == e:
                    pos[row][j], p, count = p, p + 1, count + 1
        p += -count % alignment
    return pos, p


@pytest.mark.parametrize("alignment", [1, 3])
def test_pair_sums_add_in_ascending_k(alignment):
    """``unpermute_from_experts`` and the backward of ``permute_to_experts``: FP32, ascending k."""
    seed = random.randrange(1 << 30)
    tag = f"[seed {seed} alignment {alignment}]"
    gen = torch.Generator().manual_seed(seed)
    n, k, num_local, hidden = 48, 5, 6, 16
    idx = _distinct_experts(n, num_local, k, gen, drop=0.2)
    pos, p = _expert_major_pos(idx, num_local, alignment)
    w = torch.rand(n, k, generator=gen) * (idx >= 0)
    x = torch.randn(n, hidden, generator=gen, requires_grad=True)
    x_P, _, _, layout = permute_to_experts(x, idx, w, num_local, alignment)
    assert layout.pos_NK.tolist() == [[q if q >= 0 else p for q in row] for row in pos], tag

    y_P = _order_sensitive((p, hidden), gen)
    is_pair = torch.zeros(p, dtype=torch.bool)
    is_pair[[q for row in pos for q in row if q >= 0]] = True
    y_P[~is_pair] = float("nan")  # alignment padding: never read
    want = _ascending_k(y_P, pos, hidden)
    assert not torch.equal(want, _ascending_k(y_P, pos, hidden, reverse=True)), f"data cannot tell the order {tag}"
    assert_bitwise_equal(unpermute_from_experts(y_P, pair_layout(idx, num_local, alignment)), want, f"pair sums {tag}")

    # The permutation's backward is the same pair sum of the expert-major gradients.
    x_P.backward(y_P.nan_to_num(0.0))
    assert_bitwise_equal(x.grad, want, f"grad of permute_to_experts {tag}")


def _received_rows(idxs: list[torch.Tensor], num_local: int) -> list[list[tuple[int, int]]]:
    """Per rank d: (source rank, source token) of each row it receives, by source rank then token."""
    rows: list[list[tuple[int, int]]] = [[] for _ in range(R)]
    for s in range(R):
        for t in range(idxs[s].shape[0]):
            ranks = {e // num_local for e in idxs[s][t].tolist() if e >= 0}
            for d in sorted(ranks):
                rows[d].append((s, t))
    return rows


def _local(e: int, d: int) -> int:
    """Local id on rank d of global expert e, -1 if e is elsewhere or none."""
    return e - d * (E // R) if e >= 0 and e // (E // R) == d else -1


def _by_rank(parts: list[torch.Tensor], received, s: int, num_tokens: int, reverse: bool = False) -> torch.Tensor:
    """Rank s's tokens: the FP32 sum over ranks d (ascending) of ``parts[d]``'s row for that token."""
    out = torch.zeros(num_tokens, H, dtype=torch.float32)
    where = [{src: n for n, src in enumerate(received[d])} for d in range(R)]
    for t in range(num_tokens):
        acc = torch.zeros(H, dtype=torch.float32)
        for d in reversed(range(R)) if reverse else range(R):
            if (s, t) in where[d]:
                acc = acc + parts[d][where[d][(s, t)]]
        out[t] = acc
    return out


def _combine_body(rank, world_size, seed):
    tag = f"[seed {seed} rank {rank}]"
    num_local = E // R
    counts = [random.Random(seed + s).randint(16, 28) for s in range(R)]
    idxs = [_distinct_experts(counts[s], E, K, rank_generator(seed, s, 1), drop=0.15) for s in range(R)]
    received = _received_rows(idxs, num_local)
    local_idx = [  # every rank's expected recv_topk_idx
        torch.tensor([[_local(e, d) for e in idxs[s][t].tolist()] for s, t in received[d]], dtype=torch.int64).view(
            -1, K
        )
        for d in range(R)
    ]
    reach = max(len({e // num_local for e in row.tolist() if e >= 0}) for idx in idxs for row in idx)
    assert reach >= 3, f"no token reaches 3 ranks [seed {seed}]"

    nvl = Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(H * 8, R)
    buf = Buffer(dist.group.WORLD, num_nvl_bytes=nvl, timeout_s=60, backend="torch")
    idx, T = idxs[rank], counts[rank]
    x = torch.randn(T, H, generator=rank_generator(seed, rank, 2))
    w = torch.rand(T, K, generator=rank_generator(seed, rank, 3)) * (idx >= 0)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)

    # Plain rows: each rank's "experts" return order-sensitive rows; combine adds them in rank order.
    ys = [_order_sensitive((len(received[d]), H), rank_generator(seed, d, 4)) for d in range(R)]
    _, recv_idx, _, _, handle, _ = buf.dispatch(x, None, per_rank, None, in_rank, per_expert, idx, w)
    assert_bitwise_equal(recv_idx, local_idx[rank], f"recv_topk_idx {tag}")
    combined, _, _ = buf.combine(ys[rank], handle)
    want = _by_rank(ys, received, rank, T)
    assert_bitwise_equal(combined, want, f"combine, ranks added in ascending order {tag}")
    reverse_differs = not torch.equal(want, _by_rank(ys, received, rank, T, reverse=True))

    # Expert-major rows: pairs summed per row (ascending k), then the rows of the ranks (ascending).
    _, _, _, _, em_handle, _ = buf.dispatch(x, None, per_rank, None, in_rank, per_expert, idx, w, expert_major=True)
    pos_and_p = [_expert_major_pos(local_idx[d], num_local, 1) for d in range(R)]
    pos, p = pos_and_p[rank]
    assert em_handle.pair_pos_NK.tolist() == [[q if q >= 0 else p for q in row] for row in pos], tag
    ys_P = [_order_sensitive((pos_and_p[d][1], H), rank_generator(seed, d, 5)) for d in range(R)]
    partials = [_ascending_k(ys_P[d], pos_and_p[d][0], H) for d in range(R)]
    combined, _, _ = buf.combine(ys_P[rank], em_handle, expert_major=True)
    assert_bitwise_equal(combined, _by_rank(partials, received, rank, T), f"expert-major combine {tag}")
    k_reversed = [_ascending_k(ys_P[d], pos_and_p[d][0], H, reverse=True) for d in range(R)]
    return reverse_differs, any(not torch.equal(a, b) for a, b in zip(partials, k_reversed, strict=True))


def test_combine_adds_ranks_in_ascending_order_and_pairs_in_ascending_k():
    """4 ranks, top-6 of 16 experts: tokens reach 3-4 ranks, received rows carry 3-4 pairs."""
    seed = random.randrange(1 << 30)
    results = run_distributed(_combine_body, R, seed, timeout_s=120)
    assert any(rank_order for rank_order, _ in results), f"no token's sum depends on the rank order [seed {seed}]"
    assert all(k_order for _, k_order in results), f"no row's pair sum depends on the order of k [seed {seed}]"
