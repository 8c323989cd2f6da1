"""Received rows ⇄ expert-major pair rows, on the device and without host syncs.

After a dispatch each received row carries up to K (row, local expert) pairs.  A grouped GEMM wants
one row per pair, grouped by expert, each expert's group padded to ``alignment``.  ``pair_layout``
places the pairs with one ep_train kernel on CUDA (three launches, where the extension is built) or
with a handful of torch ops (one argsort, scatters, cumsums; the CPU path and the kernel's
reference); the only host value it needs is the total row count P, which the dispatch already
returned (its per-expert counts), so the whole path has no host sync.

``permute_to_experts`` gathers rows into that order; ``unpermute_from_experts`` sums each received
row's pairs back into one row, FP32 accumulation, pairs added in ascending k (for Megatron's
routing: ascending expert id), so results are deterministic and independent of the device.  Each is
the other's backward.  On CUDA the pair sum runs as one ep_train kernel when the extension is built
(bitwise equal to the op-by-op path, which it replaces only for speed).

Shape legend: N received rows, K top-k, H hidden, L local experts, P expert-major rows (pairs +
alignment padding), Q = N*K pair slots.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _ext
from .backends.base import DispatchArgs, DispatchResult
from .validate import check_topk_idx_values

__all__ = [
    "PairLayout",
    "attach_group_offsets",
    "group_offsets",
    "pair_layout",
    "pair_layout_from_pos",
    "pair_values",
    "permute_dispatch_result",
    "permute_to_experts",
    "sum_pair_rows",
    "unpermute_from_experts",
    "values_of_pairs",
]


_OFFSETS_ATTR = "_ep_train_group_offsets"


def attach_group_offsets(tokens_per_expert_L: torch.Tensor, offs_L: torch.Tensor) -> torch.Tensor:
    """``tokens_per_expert_L`` (a CPU tensor of counts), now carrying ``offs_L``: the int32 end row of
    every expert's group, already on the rows' device, which the grouped GEMMs then take instead of
    copying the counts over.  A dispatch attaches them (computed on the GPU from its device-side
    counts, so the host does not build and copy them before the first expert GEMM); they must be
    the running sums of the counts, and the counts must not be changed in place afterwards."""
    setattr(tokens_per_expert_L, _OFFSETS_ATTR, offs_L)
    return tokens_per_expert_L


def group_offsets(counts: list[int], device: torch.device, tokens_per_expert_L=None) -> torch.Tensor:
    """``torch._grouped_mm``'s ``offs``: the int32 end row of every expert's group, on ``device``.

    The ones attached to ``tokens_per_expert_L`` (:func:`attach_group_offsets`) where there are
    (same device, one per expert), else built from ``counts`` and copied over without a host sync.
    """
    offs = getattr(tokens_per_expert_L, _OFFSETS_ATTR, None)
    if offs is not None and offs.device == device and offs.shape == (len(counts),):
        return offs
    return host_to_device(torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32), device)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU through pinned memory, so without a host sync."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


@dataclass(frozen=True)
class PairLayout:
    """Where every (received row, local expert) pair sits in expert-major order.

    Attributes:
        num_rows: N.
        num_topk: K.
        pos_NK: int64 ``[N, K]``, expert-major row of pair (n, k); P where ``recv_topk_idx`` is -1.
        row_P: int64 ``[P]``, received row of each expert-major row; N for alignment padding.
        pair_P: int64 ``[P]``, flat pair slot ``n*K + k`` of each expert-major row; Q for padding.
        tokens_per_expert: CPU int64 ``[L]``, rows of each local expert (aligned).
        has_padding: whether any expert-major row is alignment padding.
        sum_kernel: sum pairs with ep_train's CUDA kernel where it is built (False: the op-by-op
            path, same bits; for comparisons).
    """

    num_rows: int
    num_topk: int
    pos_NK: torch.Tensor
    row_P: torch.Tensor
    pair_P: torch.Tensor
    tokens_per_expert: torch.Tensor
    has_padding: bool
    sum_kernel: bool = True

    @property
    def num_pair_rows(self) -> int:
        return self.row_P.numel()


def _aligned(counts: torch.Tensor, alignment: int) -> torch.Tensor:
    return (counts + alignment - 1) // alignment * alignment


def _layout_kernel_takes(device: torch.device, num_local_experts: int) -> bool:
    """The pair-layout kernel serves this layout (CUDA, built, within its local-expert limit)."""
    return (
        device.type == "cuda"
        and _ext.is_available()
        and 1 <= num_local_experts <= _ext.load().PAIR_LAYOUT_MAX_LOCAL_EXPERTS
    )


def _count_pairs(idx_Q: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """Pairs per local expert, on ``idx_Q``'s device."""
    counts_L = torch.zeros(num_local_experts, dtype=torch.int64, device=idx_Q.device)
    return counts_L.scatter_add_(0, idx_Q.clamp_min(0), (idx_Q >= 0).long())


def _place_pairs_ops(
    idx_Q: torch.Tensor, n: int, k: int, counts_L: torch.Tensor, alignment: int, total: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pos_NK, row_P, pair_P)`` with torch ops (the CPU path, and the reference of the CUDA kernel)."""
    q, num_local_experts = n * k, counts_L.numel()
    device = idx_Q.device
    valid_Q = idx_Q >= 0
    expert_Q = idx_Q.clamp_min(0)
    aligned_L = _aligned(counts_L, alignment)
    # Pairs sorted expert-major; slots without a pair sort last (key L*Q).
    slot_Q = torch.arange(q, device=device)
    key_Q = torch.where(valid_Q, expert_Q * q + slot_Q, torch.full_like(slot_Q, num_local_experts * q))
    order_Q = torch.argsort(key_Q)
    expert_sorted = expert_Q[order_Q]
    start_L = torch.cumsum(aligned_L, 0) - aligned_L
    first_L = torch.cumsum(counts_L, 0) - counts_L
    pos_sorted = start_L[expert_sorted] + slot_Q - first_L[expert_sorted]
    pos_sorted = torch.where(valid_Q[order_Q], pos_sorted, torch.full_like(pos_sorted, total))
    pos_Q = torch.empty_like(pos_sorted).scatter_(0, order_Q, pos_sorted)
    # Inverse maps; slots without a pair all write the same sentinel into the spare entry P.
    row_Q = torch.where(valid_Q, slot_Q // max(k, 1), torch.full_like(slot_Q, n))
    pair_Q = torch.where(valid_Q, slot_Q, torch.full_like(slot_Q, q))
    row_P = torch.full((total + 1,), n, dtype=torch.int64, device=device).scatter_(0, pos_Q, row_Q)[:total]
    pair_P = torch.full((total + 1,), q, dtype=torch.int64, device=device).scatter_(0, pos_Q, pair_Q)[:total]
    return pos_Q.view(n, k), row_P, pair_P


def pair_layout(
    recv_topk_idx_NK: torch.Tensor,
    num_local_experts: int,
    alignment: int = 1,
    tokens_per_expert: Sequence[int] | torch.Tensor | None = None,
    *,
    sum_kernel: bool = True,
    layout_kernel: bool = True,
) -> PairLayout:
    """Expert-major placement of the pairs; within an expert by received row, then k.

    Args:
        recv_topk_idx_NK: ``[N, K]`` int64 local expert ids in ``[0, L)``, -1 = no pair.
        num_local_experts: L.
        alignment: pad each expert's rows to a multiple of this.
        tokens_per_expert: the per-expert pair counts when the caller already has them on the host
            (the dispatch returns them; aligned or not, they are rounded up here); without them they
            are read from the device (one host sync).
        sum_kernel: see :class:`PairLayout`.
        layout_kernel: on CUDA, place the pairs with ep_train's kernel where it is built (three
            launches; False: the op-by-op path, same numbers; for comparisons).
    """
    if recv_topk_idx_NK.dim() != 2:
        raise ValueError(f"recv_topk_idx must be [N, K], got shape {tuple(recv_topk_idx_NK.shape)}")
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")
    n, k = recv_topk_idx_NK.shape
    device = recv_topk_idx_NK.device
    idx_Q = recv_topk_idx_NK.reshape(-1).to(torch.int64)
    on_host = device.type == "cpu"  # NOTES: the value checks below are free there; on a GPU they would sync
    if on_host:
        check_topk_idx_values("recv_topk_idx", recv_topk_idx_NK, num_local_experts, "num_local_experts")
    kernel = layout_kernel and _layout_kernel_takes(device, num_local_experts)
    counts_L = aligned_L = None
    if tokens_per_expert is None or on_host or not kernel:  # the kernel counts for itself
        counts_L = _count_pairs(idx_Q, num_local_experts)
        aligned_L = _aligned(counts_L, alignment)
    if tokens_per_expert is None:
        host_L = aligned_L.cpu()
    else:
        host_L = _aligned(torch.as_tensor(tokens_per_expert, dtype=torch.int64).cpu(), alignment)
        if host_L.shape != (num_local_experts,):
            raise ValueError(
                f"tokens_per_expert must have {num_local_experts} entries (one per local expert), "
                f"got {tuple(host_L.shape)}"
            )
        if on_host and not torch.equal(host_L, aligned_L):
            e = int((host_L != aligned_L).nonzero()[0])
            raise ValueError(
                f"tokens_per_expert[{e}] is {int(host_L[e])} (aligned to {alignment}) but recv_topk_idx has "
                f"{int(counts_L[e])} pairs for that expert ({int(aligned_L[e])} aligned)"
            )
    total = int(host_L.sum())
    if kernel:
        pos_NK, row_P, pair_P = _ext.load().pair_layout(idx_Q.view(n, k), num_local_experts, alignment, total)
    else:
        pos_NK, row_P, pair_P = _place_pairs_ops(idx_Q, n, k, counts_L, alignment, total)
    has_padding = alignment > 1 and total > 0
    return PairLayout(n, k, pos_NK, row_P, pair_P, host_L, has_padding, sum_kernel)


def _gather_rows(x_NH: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """``x[row_P]``, zero rows for padding (no boolean indexing, no host sync)."""
    p = layout.num_pair_rows
    if x_NH.shape[0] == 0 or p == 0:
        return x_NH.new_zeros((p, x_NH.shape[1]))
    rows = x_NH.index_select(0, layout.row_P.clamp_max(x_NH.shape[0] - 1))
    if layout.has_padding:  # FP8 rows have no masked_fill: their zero is the all-zero byte
        bits = rows.view(torch.uint8) if rows.element_size() == 1 else rows
        bits.masked_fill_((layout.row_P >= layout.num_rows).unsqueeze(1), 0)
    return rows


def _sum_pairs_ops(y_PH: torch.Tensor, pos_NK: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    n, k = pos_NK.shape
    out = torch.zeros((n, y_PH.shape[1]), dtype=acc, device=y_PH.device)
    p = y_PH.shape[0]
    if p == 0 or n == 0:
        return out.to(y_PH.dtype)
    for j in range(k):
        pos = pos_NK[:, j]
        rows = y_PH.index_select(0, pos.clamp_max(p - 1))
        out.add_(rows.masked_fill_((pos >= p).unsqueeze(1), 0))
    return out.to(y_PH.dtype)


def sum_pair_rows(y_PH: torch.Tensor, pos_NK: torch.Tensor, use_kernel: bool = True) -> torch.Tensor:
    """``[N, H]``: ``out[n] = sum_k y[pos[n, k]]`` over the pairs of row n (``pos`` >= P: none), FP32
    (FP64 for FP64) accumulation in ascending k; no autograd.  On CUDA one ep_train kernel where it
    takes the rows (``use_kernel``), else the op-by-op path (same bits)."""
    y_PH = y_PH.contiguous()
    acc = torch.float64 if y_PH.dtype == torch.float64 else torch.float32
    kernel_rows = y_PH.dtype in (torch.bfloat16, torch.float32) and y_PH.shape[1] * y_PH.element_size() % 16 == 0
    if use_kernel and y_PH.is_cuda and kernel_rows and _ext.is_available():
        return _ext.load().sum_pairs(y_PH, pos_NK)
    return _sum_pairs_ops(y_PH, pos_NK, acc)


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NH, layout: PairLayout):
        ctx.layout = layout
        return _gather_rows(x_NH, layout)

    @staticmethod
    def backward(ctx, grad_PH):
        return sum_pair_rows(grad_PH, ctx.layout.pos_NK, ctx.layout.sum_kernel), None


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_PH, layout: PairLayout):
        ctx.layout = layout
        return sum_pair_rows(y_PH, layout.pos_NK, layout.sum_kernel)

    @staticmethod
    def backward(ctx, grad_NH):
        return _gather_rows(grad_NH.contiguous(), ctx.layout), None


def permute_to_experts(
    x_NH: torch.Tensor,
    recv_topk_idx_NK: torch.Tensor,
    recv_topk_weights_NK: torch.Tensor,
    num_local_experts: int,
    alignment: int = 1,
    tokens_per_expert: Sequence[int] | torch.Tensor | None = None,
    *,
    sum_kernel: bool = True,
    layout_kernel: bool = True,
):
    """Received rows → expert-major pair rows (differentiable w.r.t. rows and weights).

    Returns ``(x_PH, tokens_per_expert_L (CPU int64, aligned), probs_P, layout)``; padding rows are
    zero with probability 0.  Pass the dispatch's per-expert counts (``tokens_per_expert_list``) as
    ``tokens_per_expert`` to avoid the one host sync.  ``sum_kernel``, ``layout_kernel``: see
    :class:`PairLayout` and :func:`pair_layout`.
    """
    if recv_topk_weights_NK.shape != recv_topk_idx_NK.shape:
        raise ValueError(
            f"recv_topk_weights shape {tuple(recv_topk_weights_NK.shape)} != recv_topk_idx shape "
            f"{tuple(recv_topk_idx_NK.shape)}"
        )
    layout = pair_layout(
        recv_topk_idx_NK, num_local_experts, alignment, tokens_per_expert, sum_kernel=sum_kernel,
        layout_kernel=layout_kernel,
    )  # fmt: skip
    x_PH = _PermuteFn.apply(x_NH, layout)
    q = recv_topk_weights_NK.numel()
    if q == 0 or layout.num_pair_rows == 0:
        probs_P = recv_topk_weights_NK.new_zeros(layout.num_pair_rows) + 0 * recv_topk_weights_NK.sum()
    else:
        probs_P = recv_topk_weights_NK.reshape(-1).index_select(0, layout.pair_P.clamp_max(q - 1))
        if layout.has_padding:
            probs_P = probs_P.masked_fill(layout.pair_P >= q, 0)
    return x_PH, layout.tokens_per_expert, probs_P, layout


def unpermute_from_experts(y_PH: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """Expert-major pair rows → one summed row per received row ``[N, H]`` (differentiable)."""
    if y_PH.shape[0] != layout.num_pair_rows:
        raise ValueError(f"expected {layout.num_pair_rows} expert-major rows, got {y_PH.shape[0]}")
    return _UnpermuteFn.apply(y_PH, layout)


def pair_layout_from_pos(pos_NK: torch.Tensor, num_pair_rows: int, tokens_per_expert: Sequence[int]) -> PairLayout:
    """The :class:`PairLayout` whose pairs sit at ``pos_NK`` (``num_pair_rows`` = no pair), e.g. an
    expert-major dispatch's ``handle.pair_pos_NK``."""
    n, k = pos_NK.shape
    q, p = n * k, num_pair_rows
    pos_Q = pos_NK.reshape(-1)
    slot_Q = torch.arange(q, device=pos_NK.device)
    row_P = torch.full((p + 1,), n, dtype=torch.int64, device=pos_NK.device).scatter_(0, pos_Q, slot_Q // max(k, 1))
    pair_P = torch.full((p + 1,), q, dtype=torch.int64, device=pos_NK.device).scatter_(0, pos_Q, slot_Q)
    counts = torch.as_tensor(list(tokens_per_expert), dtype=torch.int64)
    return PairLayout(n, k, pos_NK, row_P[:p], pair_P[:p], counts, has_padding=p > 0)


def pair_values(values_NK: torch.Tensor, pos_NK: torch.Tensor, num_pair_rows: int) -> torch.Tensor:
    """``[P]``: the value of every expert-major row's pair (0 for padding) from ``[N, K]`` values."""
    out = values_NK.new_zeros(num_pair_rows + 1)
    return out.scatter_(0, pos_NK.reshape(-1), values_NK.reshape(-1))[:num_pair_rows]


def values_of_pairs(values_P: torch.Tensor, pos_NK: torch.Tensor) -> torch.Tensor:
    """``[N, K]``: each pair's value from the ``[P]`` expert-major values (0 where no pair)."""
    padded = torch.cat([values_P, values_P.new_zeros(1)])
    return padded.index_select(0, pos_NK.reshape(-1).clamp_max(values_P.shape[0])).view(pos_NK.shape)


def permute_dispatch_result(res: DispatchResult, args: DispatchArgs) -> DispatchResult:
    """An expert-major dispatch's result from a backend's plain one: the received rows permuted to
    expert-major order (for backends whose kernels do not write that order themselves)."""
    if args.handle is None:
        handle = res.handle
        layout = pair_layout(
            res.recv_topk_idx_NK, handle.num_local_experts, args.expert_alignment, res.num_recv_tokens_per_expert_list
        )
        probs_P = None
        if res.recv_topk_weights_NK is not None:
            probs_P = pair_values(res.recv_topk_weights_NK, layout.pos_NK, layout.num_pair_rows)
        extras = {**handle.extras, "pair_layout": layout}
        handle = dataclasses.replace(
            handle, extras=extras, pair_pos_NK=layout.pos_NK, num_pair_rows=layout.num_pair_rows
        )
    else:
        handle, probs_P = args.handle, None
        layout = handle.extras.get("pair_layout")
        if layout is None:  # the handle of a dispatch whose kernels wrote expert-major rows
            layout = pair_layout_from_pos(handle.pair_pos_NK, handle.num_pair_rows, res.num_recv_tokens_per_expert_list)
    x_PH = _gather_rows(res.recv_x_NH, layout)
    scales_PS = None if res.recv_x_scales_NS is None else _gather_rows(res.recv_x_scales_NS, layout)
    return dataclasses.replace(res, recv_x_NH=x_PH, recv_x_scales_NS=scales_PS, handle=handle, pair_probs_P=probs_P)
