"""Deterministic routing generators: every rank can rebuild every rank's routing from (seed, rank).

A test draws one seed, and each rank calls ``make_routing(kind, ..., seed, rank=r)`` for every r:
the routings of all ranks are then known everywhere, so the references can be computed locally.

Kinds (``ROUTING_KINDS``):

- ``uniform``: K distinct random experts per token (``torch.rand(T, E).topk(K)``).
- ``one_expert``: every token's first choice is expert 0 (one expert gets every token).
- ``empty_rank``: no token of any rank routes to rank ``seed % R`` (that rank receives nothing).
- ``masked``: about a quarter of the entries are -1 (the token skips that slot).
- ``dropped_rows``: about 30% of the tokens have only -1 (they go nowhere).
- ``one_rank``: all K experts of a token live on one (random) rank.

Shape legend: T tokens of the rank, E experts, K top-k, R ranks, L = E/R experts per rank.
"""

from __future__ import annotations

import torch

__all__ = [
    "ROUTING_KINDS",
    "make_routing",
    "make_all_routings",
    "rank_generator",
    "route_to_first_experts",
    "tokens_per_rank",
]

ROUTING_KINDS = ("uniform", "one_expert", "empty_rank", "masked", "dropped_rows", "one_rank")


def rank_generator(seed: int, rank: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, rank, salt): the same on every process."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 7919 + salt) % (1 << 63))


def tokens_per_rank(seed: int, num_ranks: int, low: int, high: int) -> list[int]:
    """Token counts of every rank, each in ``[low, high]``, drawn from ``seed`` (ranks may differ)."""
    g = rank_generator(seed, -1, salt=101)
    return torch.randint(low, high + 1, (num_ranks,), generator=g).tolist()


def make_routing(kind: str, num_tokens: int, num_experts: int, num_topk: int, num_ranks: int, seed: int,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Routing of rank ``rank`` for one kind.

    Args:
        kind: one of ``ROUTING_KINDS``.
        num_tokens: T of this rank (0 allowed).
        num_experts: E, divisible by ``num_ranks``; ``num_topk <= E``.
        num_topk: K (1..9 in the tests).
        seed, rank: the routing depends on these only.

    Returns:
        ``(topk_idx [T, K] int64, topk_weights [T, K] float32)``: distinct expert ids per row or -1;
        weights in (0.05, 1.05) where the id is valid and exactly 0 where it is -1.
    """
    if kind not in ROUTING_KINDS:
        raise ValueError(f"kind must be one of {ROUTING_KINDS}, got {kind!r}")
    if num_experts % num_ranks or not 1 <= num_topk <= num_experts:
        raise ValueError(f"need num_experts % num_ranks == 0 and 1 <= num_topk <= num_experts, got "
                         f"num_experts={num_experts}, num_ranks={num_ranks}, num_topk={num_topk}")  # fmt: skip
    g = rank_generator(seed, rank)
    E, T, L = num_experts, num_tokens, num_experts // num_ranks
    K = num_topk
    scores_TE = torch.rand(T, E, generator=g)
    if kind == "one_expert":
        scores_TE[:, 0] = 2.0
    elif kind == "empty_rank":
        empty = seed % num_ranks
        scores_TE[:, empty * L : (empty + 1) * L] = -1.0
        K = min(K, E - L)
    elif kind == "one_rank":
        owner_T = torch.randint(0, num_ranks, (T,), generator=g)
        own_TE = (torch.arange(E) // L).unsqueeze(0) == owner_T.unsqueeze(1)
        scores_TE = torch.where(own_TE, scores_TE + 2.0, scores_TE)
        K = min(K, L)
    idx_TK = scores_TE.topk(K, dim=-1).indices if T else torch.empty(0, K, dtype=torch.int64)
    if K < num_topk:  # the kind leaves fewer than K usable experts: pad with "no expert"
        idx_TK = torch.cat([idx_TK, torch.full((T, num_topk - K), -1, dtype=torch.int64)], dim=1)
    if kind == "masked":
        idx_TK[torch.rand(T, num_topk, generator=g) < 0.25] = -1
    elif kind == "dropped_rows":
        idx_TK[torch.rand(T, generator=g) < 0.3] = -1
    weights_TK = torch.rand(T, num_topk, generator=g) + 0.05
    weights_TK = torch.where(idx_TK >= 0, weights_TK, torch.zeros_like(weights_TK))
    return idx_TK.contiguous(), weights_TK.float().contiguous()


def make_all_routings(kind: str, num_tokens: int | list[int], num_experts: int, num_topk: int, num_ranks: int,
                      seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """``([topk_idx of rank 0..R-1], [topk_weights of rank 0..R-1])``; ``num_tokens`` per rank or one for all."""
    counts = num_tokens if isinstance(num_tokens, list) else [num_tokens] * num_ranks
    routes = [make_routing(kind, counts[r], num_experts, num_topk, num_ranks, seed, r) for r in range(num_ranks)]
    return [i for i, _ in routes], [w for _, w in routes]


def route_to_first_experts(gate_weight_EH: torch.Tensor, x: torch.Tensor, num_topk: int) -> None:
    """Steer a linear gate (in place) so every token of ``x`` picks experts 0..K-1.

    Feature 0 of every token becomes 3 and the gate reads only it for experts 0..K-1 (descending
    weights): those experts get every token, whatever its other features, and ranks holding none of
    them receive nothing.  For the frameworks' own routers, which the seeded routings above bypass.
    """
    w = gate_weight_EH
    with torch.no_grad():
        x[..., 0] = 3.0
        w.mul_(0.01)
        w[:num_topk] = 0.0
        w[:num_topk, 0] = torch.arange(num_topk, 0, -1, dtype=w.dtype, device=w.device) + 5.0
        logits = x.reshape(-1, x.shape[-1]).float() @ w.float().t()
        first = logits.topk(num_topk, dim=1).indices.sort(dim=1).values
        assert (first == torch.arange(num_topk, device=w.device)).all(), "the gate does not pick experts 0..K-1"
