"""``MoEDispatcher``: framework-neutral dispatch → expert-major rows → combine.

The dispatcher is what the Megatron and DeepSpeed adapters build on.  ``dispatch`` moves tokens to
the ranks of their experts (differentiable) and permutes the received rows into expert-major order
— one row per (token, local expert) pair, each expert's group padded to ``expert_alignment`` — the
layout a grouped GEMM wants.  ``combine`` sums each token's pair rows back into one row and returns
them to the source ranks.  Gate weights are not applied here: the experts multiply by ``probs``.

Every reduction runs in a fixed order (round j adds the j-th pair of every row, rows unique within
a round), so results are deterministic on every device.

Shape legend: T local tokens, D hidden, K top-k, N received rows, P expert-major rows (pairs +
alignment padding), L local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .autograd.normal import combine as ep_combine
from .autograd.normal import dispatch as ep_dispatch
from .buffer import Buffer
from .config import Config
from .handle import DispatchHandle

__all__ = ["MoEDispatcher", "MoEHandle", "permute_to_experts", "unpermute_from_experts"]


@dataclass(frozen=True)
class MoEHandle:
    """Routing of one :meth:`MoEDispatcher.dispatch`, consumed by :meth:`MoEDispatcher.combine`.

    dispatch: the ep_train dispatch handle.
    num_rows: N, received rows.
    row_P: recv row of each expert-major row, -1 for alignment padding.
    rounds: ``(positions, rows)`` pairs; within a round every recv row appears at most once.
    """

    dispatch: DispatchHandle
    num_rows: int
    row_P: torch.Tensor
    rounds: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def _pair_layout(recv_topk_idx_NK: torch.Tensor, num_local_experts: int, alignment: int):
    """Expert-major placement of the (row, k) pairs with a local expert.

    Returns ``(row_P, pair_k_P, tokens_per_expert_L (aligned, CPU int64), rounds)``.
    """
    n, k = recv_topk_idx_NK.shape
    device = recv_topk_idx_NK.device
    row_Q, k_Q = (recv_topk_idx_NK >= 0).nonzero(as_tuple=True)  # pairs, ordered by row then k
    expert_Q = recv_topk_idx_NK[row_Q, k_Q]
    order = torch.argsort(expert_Q * max(n, 1) + row_Q, stable=True)  # expert-major, rows ascending
    row_Q, k_Q, expert_Q = row_Q[order], k_Q[order], expert_Q[order]
    counts_L = torch.bincount(expert_Q, minlength=num_local_experts).cpu()
    aligned_L = (counts_L + alignment - 1) // alignment * alignment
    start_L = torch.cumsum(aligned_L, 0) - aligned_L
    first_Q = torch.repeat_interleave(torch.cumsum(counts_L, 0) - counts_L, counts_L)
    pos_Q = torch.repeat_interleave(start_L, counts_L) + (torch.arange(row_Q.numel()) - first_Q)
    pos_Q = pos_Q.to(device)
    total = int(aligned_L.sum())
    row_P = torch.full((total,), -1, dtype=torch.int64, device=device)
    pair_k_P = torch.full((total,), -1, dtype=torch.int64, device=device)
    row_P[pos_Q], pair_k_P[pos_Q] = row_Q, k_Q
    # Round j holds the j-th pair (in k order) of every row.
    by_row = torch.argsort(row_Q * k + k_Q)
    occurrence = torch.empty_like(by_row)
    sorted_rows = row_Q[by_row]
    run_start = torch.ones_like(sorted_rows, dtype=torch.bool)
    run_start[1:] = sorted_rows[1:] != sorted_rows[:-1]
    idx = torch.arange(sorted_rows.numel(), device=device)
    first_of_run = torch.cummax(torch.where(run_start, idx, torch.zeros_like(idx)), 0).values
    occurrence[by_row] = idx - first_of_run
    rounds = []
    max_occ = int(occurrence.max()) + 1 if occurrence.numel() else 0
    for j in range(max_occ):
        sel = occurrence == j
        rounds.append((pos_Q[sel], row_Q[sel]))
    return row_P, pair_k_P, aligned_L, tuple(rounds)


def _gather_rows(x_NH: torch.Tensor, row_P: torch.Tensor) -> torch.Tensor:
    """Rows ``x[row]`` (zeros where row is -1) without a host sync: no boolean indexing."""
    rows = x_NH.index_select(0, row_P.clamp_min(0)) if x_NH.shape[0] else x_NH.new_zeros((row_P.numel(), x_NH.shape[1]))
    return torch.where((row_P >= 0).unsqueeze(1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def _sum_rows(y_PH: torch.Tensor, rounds, num_rows: int) -> torch.Tensor:
    acc = torch.float64 if y_PH.dtype == torch.float64 else torch.float32
    out = torch.zeros((num_rows, y_PH.shape[1]), dtype=acc, device=y_PH.device)
    for pos, rows in rounds:
        out.index_add_(0, rows, y_PH[pos].to(acc))
    return out.to(y_PH.dtype)


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NH, row_P, rounds):
        ctx.rounds, ctx.num_rows = rounds, x_NH.shape[0]
        return _gather_rows(x_NH, row_P)

    @staticmethod
    def backward(ctx, grad_PH):
        return _sum_rows(grad_PH.contiguous(), ctx.rounds, ctx.num_rows), None, None


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_PH, row_P, rounds, num_rows):
        ctx.save_for_backward(row_P)
        return _sum_rows(y_PH, rounds, num_rows)

    @staticmethod
    def backward(ctx, grad_NH):
        (row_P,) = ctx.saved_tensors
        return _gather_rows(grad_NH.contiguous(), row_P), None, None, None


def permute_to_experts(x_NH, recv_topk_idx_NK, recv_topk_weights_NK, num_local_experts: int, alignment: int = 1):
    """Received rows → expert-major pair rows (differentiable w.r.t. rows and weights).

    Returns ``(x_PH, tokens_per_expert_L (CPU int64, aligned), probs_P, row_P, rounds)``; padding
    rows are zero with probability 0.
    """
    row_P, k_P, tokens_per_expert, rounds = _pair_layout(recv_topk_idx_NK, num_local_experts, alignment)
    x_PH = _PermuteFn.apply(x_NH, row_P, rounds)
    valid = row_P >= 0
    flat = torch.where(valid, row_P * recv_topk_idx_NK.shape[1] + k_P, torch.zeros_like(row_P))
    probs_P = recv_topk_weights_NK.reshape(-1)[flat] * valid.to(recv_topk_weights_NK.dtype)
    return x_PH, tokens_per_expert, probs_P, row_P, rounds


def unpermute_from_experts(y_PH: torch.Tensor, row_P: torch.Tensor, rounds, num_rows: int) -> torch.Tensor:
    """Expert-major pair rows → one summed row per received row (differentiable)."""
    return _UnpermuteFn.apply(y_PH, row_P, rounds, num_rows)


class MoEDispatcher:
    """Dispatch tokens to experts and combine the expert outputs back, for any MoE layer.

    Args:
        buffer: the :class:`ep_train.Buffer` of the expert-parallel group.
        num_experts: E (global), divisible by the group size; rank r owns experts [r*L, (r+1)*L).
        expert_alignment: pad each local expert's rows to a multiple of this (grouped GEMM tiles).
        num_worst_tokens: fixed receive size (see ``Buffer.dispatch``).
        fp8: transfer the dispatch in FP8 (e4m3, per-128 scales).
    """

    def __init__(
        self,
        buffer: Buffer,
        num_experts: int,
        *,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        fp8: bool = False,
        dispatch_config: Config | None = None,
        combine_config: Config | None = None,
    ):
        if not isinstance(buffer, Buffer):
            raise TypeError(f"buffer must be an ep_train.Buffer, got {type(buffer).__name__}")
        if num_experts % buffer.group_size != 0:
            raise ValueError(f"num_experts={num_experts} must be divisible by the EP size {buffer.group_size}")
        self.buffer = buffer
        self.num_experts = num_experts
        self.num_local_experts = num_experts // buffer.group_size
        self.expert_alignment = expert_alignment
        self.num_worst_tokens = num_worst_tokens
        self.fp8 = fp8
        self.dispatch_config, self.combine_config = dispatch_config, combine_config

    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor):
        """→ ``(x_PD expert-major, tokens_per_expert_L CPU int64, probs_P, handle)``.

        Args:
            x_TD: ``[T, D]`` tokens.  topk_idx_TK: ``[T, K]`` int64 global expert ids, -1 = none.
            topk_weights_TK: ``[T, K]`` float32 gate weights (gradients flow back to them via probs_P).
        """
        out = ep_dispatch(
            self.buffer,
            x_TD,
            topk_idx_TK,
            topk_weights_TK,
            self.num_experts,
            num_worst_tokens=self.num_worst_tokens,
            fp8=self.fp8,
            config=self.dispatch_config,
        )
        x_PD, tokens_per_expert, probs_P, row_P, rounds = permute_to_experts(
            out.recv_x, out.recv_topk_idx, out.recv_topk_weights, self.num_local_experts, self.expert_alignment
        )
        handle = MoEHandle(out.handle, out.recv_x.shape[0], row_P, rounds)
        return x_PD, tokens_per_expert, probs_P, handle

    def combine(self, y_PD: torch.Tensor, handle: MoEHandle) -> torch.Tensor:
        """Expert outputs ``[P, D]`` (already multiplied by probs) → ``[T, D]`` on the source ranks."""
        y_ND = unpermute_from_experts(y_PD, handle.row_P, handle.rounds, handle.num_rows)
        return ep_combine(self.buffer, y_ND, handle.dispatch, config=self.combine_config)
