"""Differentiable low-latency pair.

``low_latency_dispatch`` is differentiable w.r.t. ``x``: its backward sends the slot gradients
back and sums them per token (an unweighted low-latency combine).  ``low_latency_combine`` is
weighted by ``topk_weights`` and differentiable w.r.t. the expert outputs and the weights: its
backward low-latency-dispatches the output gradient, with the combine's weights, into the same
slots, scales it by each slot's weight, and returns each slot's weight gradient to its token
through a combine of one-hot rows (each (token, k) receives exactly one value).

Shape legend: T tokens, H hidden, K top-k, L local experts, S = R*M slots per local expert.
"""

from __future__ import annotations

import dataclasses

import torch

from ..buffer import Buffer
from ..fp8 import dequantize_fp8
from ..handle import LowLatencyHandle

__all__ = ["low_latency_dispatch", "low_latency_combine"]


class _LowLatencyDispatchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, buffer, topk_idx_TK, topk_weights_TK, num_max_tokens, num_experts, use_fp8, per_rank, out):
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            x_TH, topk_idx_TK, num_max_tokens, num_experts, use_fp8=use_fp8, topk_weights=topk_weights_TK
        )
        if use_fp8:
            recv_x = dequantize_fp8(recv_x[0], recv_x[1], x_TH.dtype)
        ctx.buffer, ctx.handle, ctx.sum_per_rank = buffer, handle, per_rank
        ctx.save_for_backward(topk_idx_TK)
        out["handle"], out["recv_count"] = handle, recv_count
        return recv_x

    @staticmethod
    def backward(ctx, grad_LSH):
        (topk_idx_TK,) = ctx.saved_tensors
        if ctx.sum_per_rank:  # the plain sum, summed on the expert ranks first
            grad_x, _, _ = ctx.buffer.low_latency_combine(
                grad_LSH.contiguous(), topk_idx_TK, None, ctx.handle, sum_per_rank=True
            )
        else:
            ones = torch.ones(topk_idx_TK.shape, dtype=torch.float32, device=topk_idx_TK.device)
            grad_x, _, _ = ctx.buffer.low_latency_combine(grad_LSH.contiguous(), topk_idx_TK, ones, ctx.handle)
        return grad_x, None, None, None, None, None, None, None, None


class _LowLatencyCombineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_LSH, topk_weights_TK, buffer: Buffer, topk_idx_TK, handle: LowLatencyHandle, sum_per_rank):
        combined, _, _ = buffer.low_latency_combine(
            x_LSH, topk_idx_TK, topk_weights_TK.detach(), handle, sum_per_rank=sum_per_rank
        )
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(x_LSH, topk_idx_TK, topk_weights_TK.detach())
        return combined

    @staticmethod
    def backward(ctx, grad_TH):
        x_LSH, topk_idx_TK, topk_weights_TK = ctx.saved_tensors
        h: LowLatencyHandle = ctx.handle
        buffer: Buffer = ctx.buffer
        # The combine's own weights travel with the gradient into the same slots (they may differ
        # from those the dispatch carried, e.g. renormalised after it).
        grad_slots, _, grad_handle, _, _ = buffer.low_latency_dispatch(
            grad_TH.contiguous(), topk_idx_TK, h.num_max_dispatch_tokens_per_rank, h.num_experts, use_fp8=False,
            topk_weights=topk_weights_TK.float(),
        )  # fmt: skip
        # Unused slots hold whatever the buffer had (the CUDA kernels do not clear them): mask, not
        # multiply, so that stale NaN/Inf there cannot leak into the gradients.
        valid = h.recv_topk_pos_LS >= 0
        zero = torch.zeros((), dtype=grad_slots.dtype, device=grad_slots.device)
        grad_slots = torch.where(valid.unsqueeze(-1), grad_slots, zero)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weights_LS = grad_handle.recv_topk_weights_LS.unsqueeze(-1)
            wide = torch.promote_types(grad_slots.dtype, weights_LS.dtype)  # one rounding to the grad's dtype
            grad_x = (grad_slots.to(wide) * weights_LS.to(wide)).to(grad_slots.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grads(buffer, h, topk_idx_TK, x_LSH, grad_slots, valid).to(topk_weights_TK.dtype)
        return grad_x, grad_w, None, None, None, None


def _weight_grads(buffer: Buffer, h: LowLatencyHandle, topk_idx_TK, x_LSH, grad_slots, valid) -> torch.Tensor:
    """``[T, K]``: each slot's ``<grad, x>`` back to its (token, k), in FP32 (FP64 for FP64 inputs).

    A low-latency combine of one-hot rows: each (token, k) receives exactly one value.  Where the
    backend moves only 16-bit rows, each value travels as two, ``hi = bf16(v)`` and ``lo = bf16(v -
    hi)``, added in FP32 on arrival (16 significant bits instead of 8).
    """
    acc = torch.float64 if x_LSH.dtype == torch.float64 else torch.float32
    x_valid = torch.where(valid.unsqueeze(-1), x_LSH.to(acc), torch.zeros((), dtype=acc, device=x_LSH.device))
    grad_w_LS = (grad_slots.to(acc) * x_valid).sum(dim=-1) * valid
    k = topk_idx_TK.shape[1]
    onehot = torch.nn.functional.one_hot(h.recv_topk_pos_LS.clamp_min(0).long(), k).to(acc)
    values_LSK = onehot * grad_w_LS.unsqueeze(-1)
    ones = torch.ones(topk_idx_TK.shape, dtype=torch.float32, device=topk_idx_TK.device)
    if acc in buffer.supported_dtypes:
        out, _, _ = buffer.low_latency_combine(values_LSK.contiguous(), topk_idx_TK, ones,
                                               dataclasses.replace(h, hidden=k))  # fmt: skip
        return out
    wire = grad_slots.dtype
    hi = values_LSK.to(wire)
    lo = (values_LSK - hi.to(acc)).to(wire)
    out, _, _ = buffer.low_latency_combine(torch.cat([hi, lo], dim=-1).contiguous(), topk_idx_TK, ones,
                                           dataclasses.replace(h, hidden=2 * k))  # fmt: skip
    return out[:, :k].to(acc) + out[:, k:].to(acc)


def _require_weights(topk_weights) -> None:
    """The differentiable pair weights the slots (the combine's backward reads the dispatch's slot
    weights), so it takes a weights tensor where ``Buffer`` also takes None."""
    if not isinstance(topk_weights, torch.Tensor):
        raise TypeError(
            f"topk_weights must be a [T, K] float32 tensor (the pair's backward weights the slots with it), "
            f"got {type(topk_weights).__name__}"
        )


def low_latency_dispatch(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    *,
    use_fp8: bool = False,
    sum_per_rank: bool = False,
):
    """Differentiable low-latency dispatch (w.r.t. ``x``).

    Args:
        x: ``[T, H]``; topk_idx: ``[T, K]`` int64 (-1 = none); topk_weights: ``[T, K]`` float32,
            carried to the slots for the backward of :func:`low_latency_combine` and for its forward
            with ``sum_per_rank`` (which then needs this same tensor); not differentiated here.
        use_fp8: transfer in e4m3; ``recv_x`` comes back dequantised to ``x``'s dtype.
        sum_per_rank: the backward's combine sums each token's slot gradients on their rank first
            (see :meth:`Buffer.low_latency_combine`).

    Returns:
        ``(recv_x [L, R*M, H], recv_count [L] int32, handle)``.
    """
    _require_weights(topk_weights)
    if sum_per_rank:  # said now rather than in the backward
        buffer._check_sum_per_rank_hidden(x.shape[-1])
    out: dict = {}
    recv_x = _LowLatencyDispatchFn.apply(
        x,
        buffer,
        topk_idx,
        topk_weights.detach(),
        num_max_dispatch_tokens_per_rank,
        num_experts,
        use_fp8,
        bool(sum_per_rank),
        out,
    )
    return recv_x, out["recv_count"], out["handle"]


def low_latency_combine(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
    *,
    sum_per_rank: bool = False,
) -> torch.Tensor:
    """Differentiable weighted low-latency combine (w.r.t. ``x`` and ``topk_weights``) → ``[T, H]``.

    ``handle`` must come from :func:`low_latency_dispatch` of this module (it carries the slot weights).
    ``sum_per_rank``: see :meth:`Buffer.low_latency_combine` (``topk_weights`` then must be the
    dispatch's); the backward is the same either way.
    """
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle must be a LowLatencyHandle, got {type(handle).__name__}")
    _require_weights(topk_weights)
    return _LowLatencyCombineFn.apply(x, topk_weights, buffer, topk_idx, handle, bool(sum_per_rank))
