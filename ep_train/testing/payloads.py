"""Token rows for tests: structured rows that say where they came from, random rows, FP8 rows.

Structured rows find routing bugs fastest: row i of rank r carries r, i // 256 and i % 256 in
channels 0..2 (integers below 256 are exact in BF16, FP16 and FP32), so any received row names its
source.  The other channels are seeded noise, so a row that is right in channels 0..2 but mixed up
elsewhere still fails a bitwise comparison.  Every function depends only on its arguments:
rank r's rows can be rebuilt on every rank.

Shape legend: T tokens, H hidden, S = ceil(H/128) FP8 scales.
"""

from __future__ import annotations

import torch

from ..fp8 import quantize_fp8
from .routing import rank_generator

__all__ = ["NUM_TAG_CHANNELS", "structured_rows", "random_rows", "fp8_rows", "row_origin"]

#: channels 0..2 of a structured row: source rank, token index // 256, token index % 256.
NUM_TAG_CHANNELS = 3


def structured_rows(rank: int, num_tokens: int, hidden: int, dtype: torch.dtype, seed: int,
                    salt: int = 0) -> torch.Tensor:  # fmt: skip
    """``[T, H]`` of ``dtype``: row i carries (rank, i // 256, i % 256) exactly in channels 0..2
    (fewer when H < 3), seeded N(0, 1) noise elsewhere.  ``salt`` draws other noise for the same rank."""
    g = rank_generator(seed, rank, salt=17 + salt)
    x = torch.randn(num_tokens, hidden, generator=g, dtype=torch.float64)
    i = torch.arange(num_tokens, dtype=torch.float64)
    tags = [torch.full_like(i, float(rank)), torch.div(i, 256, rounding_mode="floor"), i % 256]
    for c in range(min(NUM_TAG_CHANNELS, hidden)):
        x[:, c] = tags[c]
    return x.to(dtype)


def row_origin(row: torch.Tensor) -> tuple[int, int]:
    """``(source rank, source token index)`` of one structured row (for failure messages)."""
    r, hi, lo = (int(v) for v in row[:NUM_TAG_CHANNELS].double().tolist())
    return r, hi * 256 + lo


def random_rows(rank: int, num_tokens: int, hidden: int, dtype: torch.dtype, seed: int, salt: int = 0) -> torch.Tensor:
    """``[T, H]`` of ``dtype`` with seeded N(0, 1) entries."""
    g = rank_generator(seed, rank, salt=31 + salt)
    return torch.randn(num_tokens, hidden, generator=g, dtype=torch.float64).to(dtype)


def fp8_rows(rank: int, num_tokens: int, hidden: int, seed: int, round_scale: bool = False,
             salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(e4m3 [T, H], float32 scales [T, S])``: ``quantize_fp8`` of BF16 structured rows whose
    channel blocks are scaled by different powers of ten (so the per-block scales differ)."""
    x = structured_rows(rank, num_tokens, hidden, torch.float64, seed, salt).clone()
    block_scale = 10.0 ** ((torch.arange(hidden) // 128) % 5 - 2).double()
    return quantize_fp8((x * block_scale).to(torch.bfloat16), round_scale=round_scale)
