"""Deterministic routing generators: every rank can rebuild every rank's routing from (seed, rank).

Kinds (``ROUTING_KINDS``):
- ``uniform``: K distinct random experts per token.
- ``one_expert``: every token's first choice is expert 0 (one expert gets everything).
- ``empty_rank``: no token routes to the last rank.
- ``masked``: about a quarter of the entries are -1.
- ``dropped_rows``: some tokens have only -1 (they go nowhere).
- ``one_rank``: all K experts of a token live on one rank.
"""

from __future__ import annotations

import torch

__all__ = ["ROUTING_KINDS", "make_routing", "rank_generator"]

ROUTING_KINDS = ("uniform", "one_expert", "empty_rank", "masked", "dropped_rows", "one_rank")


def rank_generator(seed: int, rank: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919 + salt)


def _distinct(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1).indices


def make_routing(kind: str, num_tokens: int, num_experts: int, num_topk: int, num_ranks: int, seed: int,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(topk_idx [T, K] int64, topk_weights [T, K] float32)`` of rank ``rank`` for a routing kind."""
    if kind not in ROUTING_KINDS:
        raise ValueError(f"kind must be one of {ROUTING_KINDS}, got {kind!r}")
    g = rank_generator(seed, rank)
    E, K, T, L = num_experts, num_topk, num_tokens, num_experts // num_ranks
    scores = torch.rand(T, E, generator=g)
    if kind == "one_expert":
        scores[:, 0] = 2.0
    elif kind == "empty_rank":
        scores[:, (num_ranks - 1) * L :] = -1.0
        K = min(K, E - L)
    elif kind == "one_rank":
        owner = torch.randint(0, num_ranks, (T,), generator=g)
        own = (torch.arange(E) // L).unsqueeze(0) == owner.unsqueeze(1)
        scores = torch.where(own, scores + 2.0, scores)
        K = min(K, L)
    idx = _distinct(scores, K)
    if K < num_topk:
        idx = torch.cat([idx, torch.full((T, num_topk - K), -1, dtype=torch.int64)], dim=1)
    if kind == "masked":
        idx[torch.rand(T, num_topk, generator=g) < 0.25] = -1
    elif kind == "dropped_rows":
        idx[torch.rand(T, generator=g) < 0.3] = -1
    weights = torch.rand(T, num_topk, generator=g) + 0.05
    weights = torch.where(idx >= 0, weights, torch.zeros_like(weights))
    return idx.contiguous(), weights.float().contiguous()
