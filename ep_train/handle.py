"""Routing handles returned by dispatch and consumed by combine (and cached-handle dispatch).

Shape legend: T local tokens, R ranks, N received rows, L local experts, K top-k,
M ``num_max_dispatch_tokens_per_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DispatchHandle", "LowLatencyHandle"]


@dataclass(frozen=True)
class DispatchHandle:
    """Everything a normal combine or a cached dispatch needs to replay one routing.

    Attributes:
        rank, num_ranks, num_experts: the group and model the routing belongs to.
        num_tokens: T, rows of the ``x`` that was dispatched.
        hidden: H of the dispatched ``x`` (combine may use any hidden; cached dispatch must match).
        num_recv_tokens: N, received rows that carry a token (``-1`` when it is only known on the
            device: the ``num_worst_tokens`` path of the CUDA backend).
        num_recv_rows: rows of ``recv_x`` (N, or ``num_worst_tokens`` when that was given).
        is_token_in_rank_TR: bool, token t goes to rank r.
        send_pos_TR: int32, row of token t in rank r's ``recv_x``; -1 where not sent.
        rank_prefix_matrix_RR: int32, ``[i, j]`` = tokens ranks 0..i send to rank j (inclusive).
        recv_src_idx_N: int32, source token index of each received row (rows ordered by source
            rank, then source token index).
        num_recv_tokens_per_expert_L: int32 on the device, (token, local expert) pairs received,
            rounded up to ``expert_alignment``.
        expert_alignment: the alignment the counts above were rounded to.
        dispatch_seq: call number (on its buffer) of the dispatch that made the handle; combine and
            cached dispatch send it in their call header, so ranks using different handles disagree.
        extras: backend-private tensors (e.g. the CUDA kernels' channel prefix matrices).
        pair_pos_NK: int64 ``[N, K]`` for an expert-major dispatch (``Buffer.dispatch(...,
            expert_major=True)``): the expert-major row of each (received row, top-k column) pair,
            ``num_pair_rows`` where the column has no local expert; None otherwise.
        num_pair_rows: P, expert-major rows (pairs plus alignment padding) of that dispatch.
    """

    rank: int
    num_ranks: int
    num_experts: int
    num_tokens: int
    hidden: int
    num_recv_tokens: int
    num_recv_rows: int
    is_token_in_rank_TR: torch.Tensor
    send_pos_TR: torch.Tensor
    rank_prefix_matrix_RR: torch.Tensor
    recv_src_idx_N: torch.Tensor
    num_recv_tokens_per_expert_L: torch.Tensor
    expert_alignment: int = 1
    dispatch_seq: int = 0
    extras: dict[str, Any] = field(default_factory=dict, compare=False)
    pair_pos_NK: torch.Tensor | None = field(default=None, compare=False)
    num_pair_rows: int = 0

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_recv_tokens_per_rank_R(self) -> torch.Tensor:
        """Rows received from each source rank (int32, on the handle's device)."""
        col = self.rank_prefix_matrix_RR[:, self.rank]
        return torch.diff(col, prepend=col.new_zeros(1))


@dataclass(frozen=True)
class LowLatencyHandle:
    """State a low-latency combine needs to send expert outputs back.

    Attributes:
        rank, num_ranks, num_experts, hidden: group and model.
        num_max_dispatch_tokens_per_rank: M, slots per (local expert, source rank).
        num_tokens: T of the dispatching rank.
        recv_src_info_LS: int32 ``[L, R*M]``, source token index of each received slot (-1 unused).
        recv_topk_pos_LS: int32 ``[L, R*M]``, which top-k column of its token the slot is (-1 unused).
        recv_topk_weights_LS: float32 ``[L, R*M]``, the gate weight of the slot when the dispatch was
            given ``topk_weights`` (0 otherwise and in unused slots).
        recv_layout_range_LR: int64 ``[L, R]``, ``(offset << 32) | count`` of each source's rows
            inside the local expert's slots.
        recv_count_L: int32, rows received per local expert.
        buffer_half: which half of the double-buffered low-latency area the call used, or -1 when
            the device picks it as the call runs (CUDA kernels: from a device-side call counter, so
            the replays of a captured graph alternate halves like eager calls).
        topk_weights_ref: the ``topk_weights`` the dispatch was given (kept alive) and its version
            counter then, or None: a combine with ``sum_per_rank`` weights with the slot weights
            and so needs that same tensor, unchanged.
        topk_idx_ref: the ``topk_idx`` the dispatch was given and its version counter then: a
            combine given that tensor after an in-place write to it raises.
    """

    rank: int
    num_ranks: int
    num_experts: int
    hidden: int
    num_max_dispatch_tokens_per_rank: int
    num_tokens: int
    recv_src_info_LS: torch.Tensor
    recv_topk_pos_LS: torch.Tensor
    recv_topk_weights_LS: torch.Tensor
    recv_layout_range_LR: torch.Tensor
    recv_count_L: torch.Tensor
    topk_idx_TK: torch.Tensor
    buffer_half: int = 0
    extras: dict[str, Any] = field(default_factory=dict, compare=False)
    topk_weights_ref: tuple | None = field(default=None, compare=False, repr=False)
    topk_idx_ref: tuple | None = field(default=None, compare=False, repr=False)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks
