"""Token rows for tests: structured rows that say where they came from, plus random noise."""

from __future__ import annotations

import torch

from .routing import rank_generator

__all__ = ["structured_rows", "random_rows"]


def structured_rows(rank: int, num_tokens: int, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Row i of rank r carries r, i // 256 and i % 256 exactly in channels 0..2 (exact in BF16);
    the other channels are seeded noise."""
    g = rank_generator(seed, rank, salt=17)
    x = torch.randn(num_tokens, hidden, generator=g, dtype=torch.float64)
    i = torch.arange(num_tokens, dtype=torch.float64)
    cols = [torch.full_like(i, float(rank)), torch.div(i, 256, rounding_mode="floor"), i % 256]
    for c, col in enumerate(cols[: min(3, hidden)]):
        x[:, c] = col
    return x.to(dtype)


def random_rows(rank: int, num_tokens: int, hidden: int, dtype: torch.dtype, seed: int, salt: int = 0) -> torch.Tensor:
    g = rank_generator(seed, rank, salt=31 + salt)
    return torch.randn(num_tokens, hidden, generator=g, dtype=torch.float64).to(dtype)
