"""Differentiable normal dispatch/combine: the backward of dispatch is a combine, the backward of
combine is a cached-handle dispatch.

Shape legend: T local tokens, H hidden, K top-k, N received rows, L local experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..buffer import Buffer
from ..config import Config
from ..event import EventOverlap
from ..fp8 import dequantize_fp8, quantize_fp8
from ..handle import DispatchHandle
from ..permute import attach_group_offsets, pair_values, values_of_pairs
from ..validate import split_bias
from . import replay

__all__ = ["DispatchOutput", "ExpertMajorOutput", "combine", "combine_from_experts", "dispatch", "dispatch_to_experts"]


class DispatchOutput(NamedTuple):
    """Result of :func:`dispatch`.

    recv_x: ``[N, H]`` rows received (dtype of ``x``), ordered by source rank then source token.
    recv_topk_idx: ``[N, K]`` int64 local expert ids, -1 where the expert lives elsewhere.
    recv_topk_weights: ``[N, K]`` float32 (0 where recv_topk_idx is -1); differentiable.
    tokens_per_expert: ``[L]`` int32 (token, local expert) pairs received, aligned.
    handle: pass to :func:`combine`.
    event: with ``async_finish=True`` the outputs are ready only after ``event.current_stream_wait()``.
    tokens_per_expert_list: the same counts on the host when the dispatch had them there (every
        path but ``num_worst_tokens`` on the CUDA kernels), else None.
    """

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    handle: DispatchHandle
    event: EventOverlap
    tokens_per_expert_list: list[int] | None = None


@dataclass(frozen=True)
class _Replay:
    kind: str
    handle: DispatchHandle
    recv_topk_idx: torch.Tensor
    topk_idx: torch.Tensor
    per_expert_list: list[int] | None


@dataclass
class _DispatchOpts:
    num_experts: int
    expert_alignment: int
    num_worst_tokens: int
    fp8: bool
    config: Config | None
    previous_event: EventOverlap | None
    async_finish: bool
    grad_config: Config | None = None


def _rows_as_payload(buffer: Buffer, t: torch.Tensor) -> torch.Tensor:
    """Float32 ``[T, K]`` rows in a dtype the buffer's backend moves (bit-exact view if needed)."""
    if t.dtype in buffer.supported_dtypes:
        return t.contiguous()
    k = t.shape[1]
    padded = torch.nn.functional.pad(t, (0, (-k) % 4)) if k % 4 else t  # 16-byte rows
    return padded.contiguous().view(torch.bfloat16)


def _payload_as_rows(payload: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    if payload.dtype == dtype:
        return payload
    return payload.view(dtype)[:, :k]


def _zero_padding_rows(rows: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Rows past the received ones (``num_worst_tokens`` padding) carry no token: zero them."""
    if handle.num_recv_rows == 0:
        return rows
    if handle.num_recv_tokens >= 0:
        if handle.num_recv_tokens < handle.num_recv_rows:
            rows = rows.clone()
            rows[handle.num_recv_tokens :] = 0
        return rows
    count = handle.extras["num_recv_tokens_t"]  # device scalar: no host sync
    valid = torch.arange(rows.shape[0], device=rows.device) < count
    return rows * valid.unsqueeze(1).to(rows.dtype)


def _check_buffer(buffer) -> None:
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer must be an ep_train.Buffer, got {type(buffer).__name__}")


def _check_topk_weights(topk_weights) -> None:
    if not isinstance(topk_weights, torch.Tensor):
        raise TypeError(
            f"topk_weights must be a [T, K] float tensor (the gate weights, differentiable), got "
            f"{type(topk_weights).__name__}"
        )


def _handle_for_rows(handle: DispatchHandle, rows: torch.Tensor) -> DispatchHandle:
    """``handle`` for a cached dispatch of ``rows`` (a backward's gradients may be wider or narrower)."""
    return handle if rows.shape[1] == handle.hidden else dataclasses.replace(handle, hidden=rows.shape[1])


def _routing_record(topk_idx_TK: torch.Tensor) -> torch.Tensor:
    """What a replay compares its routing with: a copy where it is compared (on CPU; an in-place
    change of the caller's tensor must not change the record), the tensor itself on CUDA (only its
    shape is compared there: the values would cost a host sync)."""
    return topk_idx_TK if topk_idx_TK.is_cuda else topk_idx_TK.clone()


def _replayed_routing(entry: _Replay, topk_idx_TK: torch.Tensor):
    """``(handle, recv_topk_idx, per_expert_list)`` of the first forward, checked against this one's routing."""
    if entry.topk_idx.shape != topk_idx_TK.shape or (
        not topk_idx_TK.is_cuda and not torch.equal(entry.topk_idx, topk_idx_TK)
    ):
        raise RuntimeError("recomputed forward routed differently from the first forward (topk_idx changed)")
    return entry.handle, entry.recv_topk_idx, entry.per_expert_list


def _replayed_weights(buffer: Buffer, handle: DispatchHandle, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` received gate weights of a replayed dispatch: the weights travel as rows of a cached dispatch."""
    w_payload = _rows_as_payload(buffer, topk_weights_TK.detach())
    recv_w_payload, *_ = buffer.dispatch(w_payload, _handle_for_rows(handle, w_payload))
    return _payload_as_rows(recv_w_payload, topk_weights_TK.shape[1], topk_weights_TK.dtype)


class _DispatchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, topk_weights_TK, buffer: Buffer, topk_idx_TK, opts: _DispatchOpts, out: dict):
        # NOTES: the inputs are ready at previous_event, which need not be on the current stream (a
        # pipeline issues this op inside the comm stream): the work done here before the Buffer's
        # calls (FP8 quantisation, the weight rows of a replay) must wait for it too.
        if opts.previous_event is not None and opts.previous_event.event is not None:
            torch.cuda.current_stream().wait_event(opts.previous_event.event)
        x_in = quantize_fp8(x_TH) if opts.fp8 else x_TH
        entry = replay.next_replay("normal")
        if entry is None:
            per_rank, _, per_expert, in_rank, layout_event = buffer.get_dispatch_layout(
                topk_idx_TK, opts.num_experts, previous_event=opts.previous_event, async_finish=opts.async_finish
            )
            recv_x, recv_idx, recv_w, per_expert_list, handle, event = buffer.dispatch(
                x_in,
                None,
                per_rank,
                None,
                in_rank,
                per_expert,
                topk_idx_TK,
                topk_weights_TK.detach(),
                opts.expert_alignment,
                opts.num_worst_tokens,
                opts.config,
                layout_event if opts.async_finish else None,
                opts.async_finish,
            )
            per_expert_list = list(per_expert_list) if len(per_expert_list) == handle.num_local_experts else None
            replay.record(_Replay("normal", handle, recv_idx, _routing_record(topk_idx_TK), per_expert_list))
        else:
            handle, recv_idx, per_expert_list = _replayed_routing(entry, topk_idx_TK)
            recv_x, _, _, _, _, event = buffer.dispatch(
                x_in, handle, config=opts.config, previous_event=opts.previous_event, async_finish=opts.async_finish
            )
            recv_w = _replayed_weights(buffer, handle, topk_weights_TK)
            recv_w = torch.where(recv_idx >= 0, recv_w, torch.zeros_like(recv_w))
        if opts.fp8:
            if event is not None and event.event is not None:  # async_finish: rows exist once the comm stream is there
                torch.cuda.current_stream().wait_event(event.event)
            recv_x = dequantize_fp8(recv_x[0], recv_x[1], x_TH.dtype)
        ctx.buffer, ctx.handle, ctx.grad_config = buffer, handle, opts.grad_config
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        out["handle"], out["event"], out["per_expert_list"] = handle, event, per_expert_list
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_recv_idx, grad_recv_w):
        (recv_idx,) = ctx.saved_tensors
        handle: DispatchHandle = ctx.handle
        if grad_recv_x is None:
            grad_recv_x = torch.zeros((handle.num_recv_rows, handle.hidden), device=recv_idx.device)
        grad_w_in = None
        if grad_recv_w is not None and ctx.needs_input_grad[1]:
            grad_w_in = torch.where(recv_idx >= 0, grad_recv_w, torch.zeros_like(grad_recv_w)).contiguous()
        grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x.contiguous(), handle, topk_weights=grad_w_in,
                                               config=ctx.grad_config)  # fmt: skip
        return grad_x, grad_w, None, None, None, None


class _CombineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NH, bias0, bias1, buffer: Buffer, handle: DispatchHandle, opts: dict, out: dict):
        bias = tuple(b for b in (bias0, bias1) if b is not None) or None
        combined, _, event = buffer.combine(
            x_NH,
            handle,
            bias=bias,
            config=opts["config"],
            previous_event=opts["previous_event"],
            async_finish=opts["async_finish"],
        )
        ctx.buffer, ctx.handle, ctx.grad_config = buffer, handle, opts["grad_config"]
        ctx.has_bias = (bias0 is not None, bias1 is not None)
        out["event"] = event
        return combined

    @staticmethod
    def backward(ctx, grad_TH):
        handle: DispatchHandle = ctx.handle
        grad_TH = grad_TH.contiguous()
        grad_x, *_ = ctx.buffer.dispatch(grad_TH, _handle_for_rows(handle, grad_TH), config=ctx.grad_config)
        grad_x = _zero_padding_rows(grad_x, handle)
        g0 = grad_TH if ctx.has_bias[0] else None
        g1 = grad_TH if ctx.has_bias[1] else None
        return grad_x, g0, g1, None, None, None, None


def dispatch(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    *,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    fp8: bool = False,
    config: Config | None = None,
    previous_event: EventOverlap | None = None,
    async_finish: bool = False,
    grad_config: Config | None = None,
) -> DispatchOutput:
    """Differentiable dispatch (w.r.t. ``x`` and ``topk_weights``).

    Args:
        x: ``[T, H]`` floating rows (BF16 on the CUDA kernels).
        topk_idx: ``[T, K]`` int64 global expert ids, -1 = none.
        topk_weights: ``[T, K]`` float32 gate weights; their gradient comes back through the
            backward combine's ``combined_topk_weights``.
        fp8: quantise ``x`` to e4m3 (per-128 scales) for the transfer; ``recv_x`` is dequantised to
            ``x``'s dtype and the backward runs in that dtype (straight-through).
        previous_event / async_finish: see :class:`ep_train.Buffer`; with ``async_finish`` wait on
            ``event`` before using the outputs, and run independent compute in between.
        config: the kernels' config of this call; ``grad_config``: of the backward's combine (None:
            the buffer's default for each).
    """
    _check_buffer(buffer)
    _check_topk_weights(topk_weights)
    opts = _DispatchOpts(num_experts, expert_alignment, num_worst_tokens, fp8, config, previous_event, async_finish,
                         grad_config)  # fmt: skip
    out: dict = {}
    recv_x, recv_idx, recv_w = _DispatchFn.apply(x, topk_weights, buffer, topk_idx, opts, out)
    handle: DispatchHandle = out["handle"]
    return DispatchOutput(
        recv_x, recv_idx, recv_w, handle.num_recv_tokens_per_expert_L, handle, out["event"], out["per_expert_list"]
    )


def combine(
    buffer: Buffer,
    x: torch.Tensor,
    handle: DispatchHandle,
    *,
    bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    config: Config | None = None,
    previous_event: EventOverlap | None = None,
    async_finish: bool = False,
    grad_config: Config | None = None,
):
    """Differentiable combine (w.r.t. ``x`` and ``bias``): sums the rows of each token.

    Args:
        x: ``[N, H]`` expert outputs in ``recv_x`` order (already weighted by the caller if wanted).
        handle: from :func:`dispatch`.
        bias: optional ``[T, H]`` tensor or pair added to the result.
        config: the kernels' config of this call; ``grad_config``: of the backward's dispatch (None:
            the buffer's default for each).

    Returns:
        ``combined_x [T, H]``; with ``async_finish=True`` the pair ``(combined_x, event)``.
    """
    _check_buffer(buffer)
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle must be the DispatchHandle of a dispatch, got {type(handle).__name__}")
    biases = split_bias(bias)
    b0 = biases[0] if len(biases) > 0 else None
    b1 = biases[1] if len(biases) > 1 else None
    opts = {"config": config, "previous_event": previous_event, "async_finish": async_finish,
            "grad_config": grad_config}  # fmt: skip
    out: dict = {}
    combined = _CombineFn.apply(x, b0, b1, buffer, handle, opts, out)
    return (combined, out["event"]) if async_finish else combined


class ExpertMajorOutput(NamedTuple):
    """Result of :func:`dispatch_to_experts`.

    x: ``[P, H]`` one row per (received token, local expert) pair, grouped by local expert (then
        source rank, then source token), each expert's rows padded with zero rows to the alignment;
        the input to a grouped GEMM.
    probs: ``[P]`` float32 gate weight of each row (0 for padding); differentiable.
    tokens_per_expert: CPU int64 ``[L]``, rows of each local expert (aligned; they add up to P).
    recv_topk_idx: ``[N, K]`` int64 local expert ids of the received tokens, -1 elsewhere.
    handle: pass to :func:`combine_from_experts`.
    """

    x: torch.Tensor
    probs: torch.Tensor
    tokens_per_expert: torch.Tensor
    recv_topk_idx: torch.Tensor
    handle: DispatchHandle


class _DispatchExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, topk_weights_TK, buffer: Buffer, topk_idx_TK, opts: _DispatchOpts, out: dict):
        x_in = quantize_fp8(x_TH) if opts.fp8 else x_TH
        entry = replay.next_replay("expert_major")
        if entry is None:
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx_TK, opts.num_experts)
            x_P, recv_idx, probs_P, per_expert_list, handle, _ = buffer.dispatch(
                x_in, None, per_rank, None, in_rank, per_expert, topk_idx_TK, topk_weights_TK.detach(),
                opts.expert_alignment, config=opts.config, expert_major=True,
            )  # fmt: skip
            per_expert_list = list(per_expert_list)
            replay.record(_Replay("expert_major", handle, recv_idx, _routing_record(topk_idx_TK), per_expert_list))
        else:
            handle, recv_idx, per_expert_list = _replayed_routing(entry, topk_idx_TK)
            x_P, *_ = buffer.dispatch(x_in, handle, config=opts.config, expert_major=True)
            recv_w = _replayed_weights(buffer, handle, topk_weights_TK)
            probs_P = pair_values(recv_w, handle.pair_pos_NK, handle.num_pair_rows)
        if opts.fp8:
            x_P = dequantize_fp8(x_P[0], x_P[1], x_TH.dtype)
        if probs_P is None:
            probs_P = torch.zeros(handle.num_pair_rows, dtype=torch.float32, device=x_TH.device)
        ctx.buffer, ctx.handle, ctx.grad_config = buffer, handle, opts.grad_config
        ctx.mark_non_differentiable(recv_idx)
        out["handle"], out["per_expert_list"] = handle, per_expert_list
        return x_P, recv_idx, probs_P

    @staticmethod
    def backward(ctx, grad_x_P, _grad_recv_idx, grad_probs_P):
        handle: DispatchHandle = ctx.handle
        pos_NK = handle.pair_pos_NK
        if grad_x_P is None:
            grad_x_P = torch.zeros((handle.num_pair_rows, handle.hidden), device=pos_NK.device)
        grad_w_NK = None
        if grad_probs_P is not None and ctx.needs_input_grad[1]:
            grad_w_NK = values_of_pairs(grad_probs_P, pos_NK).contiguous()
        grad_x, grad_w, _ = ctx.buffer.combine(grad_x_P.contiguous(), handle, topk_weights=grad_w_NK,
                                               config=ctx.grad_config, expert_major=True)  # fmt: skip
        return grad_x, grad_w, None, None, None, None


class _CombineExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_P, buffer: Buffer, handle: DispatchHandle, config: Config | None,
                grad_config: Config | None):  # fmt: skip
        combined, _, _ = buffer.combine(y_P.contiguous(), handle, config=config, expert_major=True)
        ctx.buffer, ctx.handle, ctx.grad_config = buffer, handle, grad_config
        return combined

    @staticmethod
    def backward(ctx, grad_TH):
        grad_TH = grad_TH.contiguous()
        grad_P, *_ = ctx.buffer.dispatch(grad_TH, _handle_for_rows(ctx.handle, grad_TH), config=ctx.grad_config,
                                         expert_major=True)  # fmt: skip
        return grad_P, None, None, None, None


def dispatch_to_experts(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    *,
    expert_alignment: int = 1,
    fp8: bool = False,
    config: Config | None = None,
    grad_config: Config | None = None,
) -> ExpertMajorOutput:
    """Differentiable dispatch straight into grouped-GEMM order (w.r.t. ``x`` and ``topk_weights``).

    The same rows, order and weights as :func:`dispatch` followed by
    ``ep_train.permute.permute_to_experts``, in one step: the CUDA kernels write every received
    row to its experts' places, so there is no separate permutation pass (forward, and the
    backward of :func:`combine_from_experts`).  The backward sums each received row's pair
    gradients (FP32, ascending k) and combines them, with the weight gradients.

    Args: as :func:`dispatch`.  ``x`` is ``[T, H]``, ``topk_idx`` / ``topk_weights`` ``[T, K]``.
    """
    _check_buffer(buffer)
    _check_topk_weights(topk_weights)
    opts = _DispatchOpts(num_experts, expert_alignment, 0, fp8, config, None, False, grad_config)
    out: dict = {}
    x_P, recv_idx, probs_P = _DispatchExpertsFn.apply(x, topk_weights, buffer, topk_idx, opts, out)
    handle: DispatchHandle = out["handle"]
    tokens_per_expert = torch.tensor(out["per_expert_list"], dtype=torch.int64)
    # The grouped GEMMs' offsets from the device-side counts: no host copy before the first GEMM.
    attach_group_offsets(tokens_per_expert, torch.cumsum(handle.num_recv_tokens_per_expert_L, 0, dtype=torch.int32))
    return ExpertMajorOutput(x_P, probs_P, tokens_per_expert, recv_idx, handle)


def combine_from_experts(
    buffer: Buffer,
    y: torch.Tensor,
    handle: DispatchHandle,
    *,
    config: Config | None = None,
    grad_config: Config | None = None,
) -> torch.Tensor:
    """Differentiable combine of expert-major rows (w.r.t. ``y``): each received token's rows are
    summed (FP32, ascending k, rounded once) and sent back to its source, where the ranks' sums add
    up (FP32, rank order) - the same bits as ``unpermute_from_experts`` then :func:`combine`.

    Args:
        y: ``[P, H]`` expert outputs in :func:`dispatch_to_experts` order (weighted by the caller).
        handle: from :func:`dispatch_to_experts`.
        config: the kernels' config of this call; ``grad_config``: of the backward's dispatch (None:
            the buffer's default for each).
    Returns:
        ``[T, H]``.
    """
    _check_buffer(buffer)
    if not isinstance(handle, DispatchHandle) or handle.pair_pos_NK is None:
        raise TypeError("handle must be the handle of dispatch_to_experts (an expert-major dispatch)")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a [P, H] tensor (the expert-major rows), got {type(y).__name__}")
    if y.dim() != 2 or y.shape[0] != handle.num_pair_rows:
        raise ValueError(f"y must be [{handle.num_pair_rows}, H] (the expert-major rows), got {tuple(y.shape)}")
    return _CombineExpertsFn.apply(y, buffer, handle, config, grad_config)
