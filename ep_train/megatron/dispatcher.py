"""``EPTokenDispatcher``: Megatron-Core's six dispatcher stages over ep_train's autograd ops.

Stage mapping (only ``token_dispatch`` and ``token_combine`` communicate):

====================  ==========================================================================
dispatch_preprocess   routing_map ``[T, E]`` → ``topk_idx [T, K]`` (ascending expert ids, -1
                      padding); probs ``[T, E]`` → gate weights ``[T, K]`` (differentiable gather;
                      both one kernel on CUDA, ``routing_topk``)
token_dispatch        ``ep_train.autograd.dispatch``: each token once to every rank holding one of
                      its experts → ``recv_x [N, H]``, weights ``[N, K]``.  With
                      ``EPOptions.fused_permutation`` (default) ``dispatch_to_experts`` instead:
                      rows straight into expert-major order → ``x [P, H]``, ``probs [P]``, and
                      the two permutation stages below pass their inputs through
dispatch_postprocess  ``permute_to_experts``: one row per (token, local expert), expert-major →
                      ``(x [P, H], tokens_per_expert [L] CPU int64, probs [P])``
combine_preprocess    ``unpermute_from_experts``: sum each received row's expert outputs → ``[N, H]``
token_combine         ``ep_train.autograd.combine``: rows back to their source ranks, summed
combine_postprocess   reshape to ``[S, B, H]`` and add the overlapped shared-expert output
====================  ==========================================================================

The experts see exactly the rows, order and probabilities of Megatron's ``alltoall`` dispatcher
(expert-major; within an expert by source rank, then source token), and every sum runs in the
same order (experts ascending per token); FP32 results match ``alltoall`` bit for bit up to
top-2 and within rounding beyond (this rank's experts of a token are summed before the combine).

Per-micro-batch forward state moves from stage to stage through FIFO queues and the backward
state lives in autograd contexts; the probabilities are always those passed to the stage.  So the
dispatcher also works under Megatron's EP-overlap 1F1B schedule, which detaches tensors between
stages and runs later micro-batches' forwards before earlier backwards.

Shape legend: S sequence, B micro-batch, T = S*B local tokens, H hidden, E experts, L local
experts, K top-k, N received rows, P expert-major rows.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _ext
from ..autograd.normal import combine as ep_combine
from ..autograd.normal import combine_from_experts, dispatch_to_experts
from ..autograd.normal import dispatch as ep_dispatch
from ..buffer_pool import BufferPool
from ..config import Config, get_combine_config, get_dispatch_config, solo_num_sms
from ..permute import PairLayout, permute_to_experts, unpermute_from_experts
from ._megatron import MoETokenDispatcher
from .config import check_config
from .options import EPOptions
from .streams import CommLane

__all__ = ["EPTokenDispatcher", "routing_map_to_topk", "routing_topk"]

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]


def routing_map_to_topk(routing_map_TE: torch.Tensor, num_topk: int, check: bool | None = None) -> torch.Tensor:
    """Selected experts of each token as ``[T, K]`` int64, ascending, padded with -1.

    Args:
        routing_map_TE: ``[T, E]`` bool, token t goes to expert e.  At most ``num_topk`` per row.
        check: raise if a row selects more than ``num_topk`` experts (they would not all fit).  None:
            where that is free, on CPU; on CUDA it costs a host sync, so it runs only when asked.
    """
    if check is None:
        check = not routing_map_TE.is_cuda
    if check and routing_map_TE.numel():
        per_token_T = routing_map_TE.sum(dim=1)
        worst = int(per_token_T.argmax())
        if int(per_token_T[worst]) > num_topk:
            raise ValueError(
                f"routing_map row {worst} selects {int(per_token_T[worst])} experts, more than "
                f"num_topk={num_topk}: experts past the top-k would be dropped"
            )
    num_experts = routing_map_TE.shape[1]
    k = min(num_topk, num_experts)
    # Score E - e for selected experts, 0 otherwise: topk keeps ascending expert ids first.
    # NOTES: few ops on purpose; on CUDA each costs host time before the dispatch can start.
    scores_TE = torch.where(routing_map_TE, _descending_ranks(num_experts, routing_map_TE.device), 0)
    values_TK, idx_TK = torch.topk(scores_TE, k, dim=1, sorted=True)
    idx_TK = idx_TK.masked_fill_(values_TK == 0, -1)  # int64 already
    if k < num_topk:
        idx_TK = torch.nn.functional.pad(idx_TK, (0, num_topk - k), value=-1)
    return idx_TK


@functools.lru_cache(maxsize=16)
def _descending_ranks(num_experts: int, device: torch.device) -> torch.Tensor:
    """``[E, E-1, ..., 1]`` int32 on ``device`` (made once per shape and device)."""
    return torch.arange(num_experts, 0, -1, device=device, dtype=torch.int32)


def _gather_weights(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``probs[t, topk_idx[t, k]]`` (0 where the index is -1), differentiable w.r.t. ``probs``."""
    w_TK = probs_TE.gather(1, topk_idx_TK.clamp(min=0)).to(dtype)
    return w_TK.masked_fill(topk_idx_TK < 0, 0)


class _RoutingTopkFn(torch.autograd.Function):
    """``routing_map_to_topk`` and ``_gather_weights`` (FP32) in one ep_train kernel; the backward
    is the gather's (an index-add of the weight gradients into ``[T, E]``)."""

    @staticmethod
    def forward(ctx, routing_map_TE, probs_TE, num_topk: int):
        topk_idx_TK, weights_TK = _ext.load().routing_topk(routing_map_TE, probs_TE.detach(), num_topk)
        ctx.save_for_backward(topk_idx_TK)
        ctx.probs_shape, ctx.probs_dtype = probs_TE.shape, probs_TE.dtype
        ctx.mark_non_differentiable(topk_idx_TK)
        return topk_idx_TK, weights_TK

    @staticmethod
    def backward(ctx, _grad_idx, grad_w_TK):
        (topk_idx_TK,) = ctx.saved_tensors
        grad_TE = torch.zeros(ctx.probs_shape, dtype=ctx.probs_dtype, device=topk_idx_TK.device)
        src_TK = grad_w_TK.masked_fill(topk_idx_TK < 0, 0).to(ctx.probs_dtype)
        return None, grad_TE.scatter_add_(1, topk_idx_TK.clamp(min=0), src_TK), None


def routing_topk(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, num_topk: int,
                 weight_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(topk_idx [T, K], weights [T, K])``: :func:`routing_map_to_topk` of the map and each
    selected expert's probability in ``weight_dtype`` (0 for -1), differentiable w.r.t. ``probs``.

    On CUDA with ep_train's extension, FP32 or BF16 probs and FP32 weights: one kernel (a warp
    per token reads its map row) instead of a top-k over ``[T, E]`` and five more ops, with the
    same results bit for bit.  Elsewhere those torch ops.
    """
    if (routing_map_TE.is_cuda and probs_TE.dtype in (torch.float32, torch.bfloat16) and weight_dtype == torch.float32
            and routing_map_TE.is_contiguous() and probs_TE.is_contiguous() and _ext.is_available()):  # fmt: skip
        return _RoutingTopkFn.apply(routing_map_TE, probs_TE, num_topk)
    with torch.no_grad():
        topk_idx_TK = routing_map_to_topk(routing_map_TE, num_topk)
    return topk_idx_TK, _gather_weights(probs_TE, topk_idx_TK, weight_dtype)


def _in_backward() -> bool:
    """True inside an autograd backward (where activation checkpointing recomputes forwards)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _clear(queues: dict[str, collections.deque]) -> None:
    for queue in queues.values():
        queue.clear()


@dataclass
class _MicroBatch:
    """Forward state of one micro-batch between the stages (backward state is in autograd ctx)."""

    hidden_shape: torch.Size
    topk_idx_TK: torch.Tensor
    probs_dtype: torch.dtype
    handle: Any = None
    recv_topk_idx_NK: torch.Tensor | None = None
    tokens_per_expert_list: list[int] | None = None
    layout: PairLayout | None = None
    #: set by an expert-major dispatch (``fused_permutation``): CPU int64 rows per local expert.
    fused_tokens_per_expert: torch.Tensor | None = None
    #: the Buffer of the dispatch, which its handle belongs to (the combine must use it too).
    buffer: Any = None
    extras: dict = field(default_factory=dict)


class EPTokenDispatcher(MoETokenDispatcher):
    """Megatron-Core token dispatcher over ep_train (``moe_token_dispatcher_type="deepep"``).

    Args:
        num_local_experts, local_expert_indices, config, pg_collection: as Megatron's dispatchers.
        options: :class:`EPOptions` (chunking, alignment, FP8 dispatch, kernel configs).
        buffers: the :class:`BufferPool` shared by the model's MoE layers (a private one if None).
    """

    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config, pg_collection=None, *,
                 options: EPOptions | None = None, buffers: BufferPool | None = None):  # fmt: skip
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection)
        check_config(config)  # also for a config built without make_config or changed after it
        if self.tp_size > 1:
            raise ValueError(
                f"the 'deepep' dispatcher does not support expert tensor parallelism (expert_tensor_parallel_size="
                f"{self.tp_size}); set expert_tensor_parallel_size=1"
            )
        if config.num_moe_experts is None or config.num_moe_experts % self.ep_size:
            raise ValueError(
                f"num_moe_experts={config.num_moe_experts} must be divisible by the EP size {self.ep_size}"
            )
        # The Buffer routes expert e to EP rank e // L: this rank must hold exactly those experts.
        first = self.ep_group.rank() * (config.num_moe_experts // self.ep_size)
        expected = list(range(first, first + config.num_moe_experts // self.ep_size))
        if list(local_expert_indices) != expected or num_local_experts != len(expected):
            raise ValueError(
                f"num_local_experts={num_local_experts}, local_expert_indices={list(local_expert_indices)}: EP rank "
                f"{self.ep_group.rank()} of {self.ep_size} must hold experts {expected[0]}..{expected[-1]}"
            )
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.num_experts = config.num_moe_experts
        self.router_topk = config.moe_router_topk
        self.options = options if options is not None else EPOptions()
        self.buffers = buffers if buffers is not None else BufferPool(
            backend=self.options.backend, num_sms=self.options.num_sms,
            dispatch_config=self.options.dispatch_config, combine_config=self.options.combine_config,
        )  # fmt: skip
        self.shared_experts = None
        # Create the group's buffer now (collectively, while every rank builds its layers) so that
        # observers such as a CommTimer can attach to ``self.buffer`` before the first forward.
        self.dispatch_config, self.combine_config = self._kernel_configs()
        hidden = getattr(config, "moe_latent_size", None) or config.hidden_size
        self.buffer = self.buffers.get(self.ep_group, hidden, config.params_dtype.itemsize, self._configs())
        stages = ("token_dispatch", "dispatch_postprocess", "combine_preprocess", "token_combine",
                  "combine_postprocess")  # fmt: skip
        self._queues: dict[str, collections.deque[_MicroBatch]] = {stage: collections.deque() for stage in stages}
        # A recomputed forward (activation checkpointing) runs inside a backward, and a non-reentrant
        # checkpoint stops it after its last saved tensor, before the last stages: its own queues.
        self._recompute_queues: dict[str, collections.deque[_MicroBatch]] = {
            stage: collections.deque() for stage in stages
        }

    # ------------------------------------------------------------------ helpers
    def set_shared_experts(self, shared_experts) -> None:
        """Overlap the shared experts (Megatron's staged ``SharedExpertMLP`` API) with the dispatch."""
        if not self.config.moe_shared_expert_overlap:
            raise ValueError("set_shared_experts needs config.moe_shared_expert_overlap=True")
        self.shared_experts = shared_experts

    def reset(self) -> None:
        """Drop the state of forwards that did not reach ``combine_postprocess`` (e.g. after an error)."""
        _clear(self._queues)
        _clear(self._recompute_queues)

    def _stage_queues(self) -> dict[str, collections.deque[_MicroBatch]]:
        """The queues of the forward being run: a recomputation's (inside a backward) or the first."""
        return self._recompute_queues if _in_backward() else self._queues

    def _drop_unfinished(self) -> None:
        """Outside the EP-overlap schedule one forward runs all six stages before the next begins, so
        state left in a queue when a forward starts is that of a forward an exception ended: drop it
        (otherwise every later forward would take the stages of the one before).  A recomputation's
        leftovers are expected (a checkpoint that stopped early) and dropped in silence."""
        if _in_backward():
            _clear(self._recompute_queues)
            return
        stale = sum(len(queue) for queue in self._queues.values())
        if stale and not self.config.overlap_moe_expert_parallel_comm:
            warnings.warn(
                f"EPTokenDispatcher: dropping the state of {stale} forward stage(s) that did not complete "
                "(a forward ended by an exception)",
                stacklevel=3,
            )
            self.reset()

    def _push(self, stage: str, mb: _MicroBatch) -> None:
        self._stage_queues()[stage].append(mb)

    def _pop(self, stage: str) -> _MicroBatch:
        queue = self._stage_queues()[stage]
        if not queue:
            raise RuntimeError(
                f"EPTokenDispatcher.{stage} was called with no micro-batch waiting for it: the six stages must "
                "run in order (dispatch_preprocess, token_dispatch, dispatch_postprocess, combine_preprocess, "
                "token_combine, combine_postprocess)"
            )
        return queue.popleft()

    def _kernel_configs(self) -> tuple[Config | None, Config | None]:
        """The configs of this layer's dispatches and combines (None: the Buffer's defaults).

        Kernels that nothing overlaps (one chunk, no shared-expert overlap, outside the EP-overlap
        schedule, no expert weight gradients beside the dispatch's backward) take ``solo_num_sms``
        of this GPU's SMs instead of the 24 left to them beside compute, unless the options or the
        pool name an SM count (a config the options name is kept; the other direction then still
        gets the solo count).  Decided when the dispatcher is built, from its config."""
        o, config = self.options, self.config
        overlapped = (o.num_chunks > 1 or config.moe_shared_expert_overlap or config.overlap_moe_expert_parallel_comm
                      or getattr(config, "overlap_dispatch_backward_with_experts_wgrad", False))  # fmt: skip
        device_sms = _ext.device_sms()
        if o.num_sms is not None or self.buffers.num_sms is not None or overlapped or device_sms is None:
            return o.dispatch_config, o.combine_config
        n = solo_num_sms(device_sms)
        return (o.dispatch_config or dataclasses.replace(get_dispatch_config(self.ep_size), num_sms=n),
                o.combine_config or dataclasses.replace(get_combine_config(self.ep_size), num_sms=n))  # fmt: skip

    def _configs(self) -> tuple[Config, ...]:
        return tuple(c for c in (self.dispatch_config, self.combine_config) if c is not None)

    def _buffer(self, x: torch.Tensor):
        self.buffer = self.buffers.get(self.ep_group, x.shape[-1], x.element_size(), self._configs())
        return self.buffer

    def _weight_dtype(self, buffer, probs_dtype: torch.dtype) -> torch.dtype:
        if probs_dtype == torch.float64 and torch.float64 in buffer.supported_dtypes:
            return torch.float64
        return torch.float32

    def _dispatch(self, buffer, x_TH, topk_idx_TK, weights_TK, previous_event=None, async_finish=False):
        o = self.options
        return ep_dispatch(buffer, x_TH, topk_idx_TK, weights_TK, self.num_experts, fp8=o.fp8_dispatch,
                           config=self.dispatch_config, grad_config=self.combine_config,
                           previous_event=previous_event, async_finish=async_finish)  # fmt: skip

    def _issue_combine(self, lane: CommLane, buffer, y_NH: torch.Tensor, handle):
        """Combine on the comm stream once ``y_NH`` is ready → ``y_TH`` or ``(y_TH, event)``."""
        cfg, grad_cfg = self.combine_config, self.dispatch_config
        return lane.issue(
            lambda ev, fin: ep_combine(buffer, y_NH, handle, config=cfg, grad_config=grad_cfg, previous_event=ev,
                                       async_finish=fin),
            lane.ready_event(),
        )  # fmt: skip

    def _permute(self, mb: _MicroBatch, recv_x_NH, recv_weights_NK):
        x_PH, tokens_per_expert_L, probs_P, mb.layout = permute_to_experts(
            recv_x_NH, mb.recv_topk_idx_NK, recv_weights_NK, self.num_local_experts, self.options.expert_alignment,
            mb.tokens_per_expert_list,
        )  # fmt: skip
        return x_PH, tokens_per_expert_L, probs_P.to(mb.probs_dtype)

    def _shared_experts_launch(self) -> None:
        """Queue the shared experts' GEMMs on their side stream before the tokens leave."""
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act()
            self.shared_experts.linear_fc2_forward()

    # ------------------------------------------------------------------ the six stages
    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """``[S, B, H]`` tokens, ``[T, E]`` bool routing map and probs → ``([T, H], weights [T, K])``."""
        if routing_map.dim() != 2 or routing_map.dtype != torch.bool:
            raise ValueError(
                f"routing_map must be a [T, E] bool tensor, got {routing_map.dtype} {tuple(routing_map.shape)}"
            )
        if probs.shape != routing_map.shape:
            raise ValueError(
                f"probs must have the routing map's shape {tuple(routing_map.shape)}, got {tuple(probs.shape)}"
            )
        self._drop_unfinished()
        hidden_shape = tokens.shape
        x_TH = tokens.reshape(-1, hidden_shape[-1])
        if x_TH.shape[0] != routing_map.shape[0]:
            raise ValueError(
                f"tokens {tuple(hidden_shape)} hold {x_TH.shape[0]} tokens, routing_map has {routing_map.shape[0]} rows"
            )
        if self.config.overlap_moe_expert_parallel_comm:
            # The EP-overlap schedule frees a stage's inputs after its forward; the router's backward
            # still needs the layernorm output this would otherwise be a view of.
            x_TH = x_TH.clone()
        weight_dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
        topk_idx_TK, weights_TK = routing_topk(routing_map, probs, self.router_topk, weight_dtype)
        mb = _MicroBatch(hidden_shape, topk_idx_TK, probs.dtype)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(tokens)
        self._push("token_dispatch", mb)
        return x_TH, weights_TK

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Send tokens to their experts' ranks → ``(recv_x [N, H], recv_weights [N, K])``."""
        mb = self._pop("token_dispatch")
        buffer = mb.buffer = self._buffer(hidden_states)
        self._shared_experts_launch()
        weights_TK = probs.to(self._weight_dtype(buffer, probs.dtype))
        # NOTES: not under the EP-overlap schedule: it frees each stage's inputs after the stage's
        # forward, and the pass-through stages would hand the experts' saved rows to it.
        if self.options.fused_permutation and not self.config.overlap_moe_expert_parallel_comm:
            o = self.options
            fused = dispatch_to_experts(buffer, hidden_states, mb.topk_idx_TK, weights_TK, self.num_experts,
                                        expert_alignment=o.expert_alignment, fp8=o.fp8_dispatch,
                                        config=self.dispatch_config, grad_config=self.combine_config)  # fmt: skip
            mb.handle, mb.fused_tokens_per_expert = fused.handle, fused.tokens_per_expert
            self._push("dispatch_postprocess", mb)
            return fused.x, fused.probs
        out = self._dispatch(buffer, hidden_states, mb.topk_idx_TK, weights_TK)
        mb.handle, mb.recv_topk_idx_NK, mb.tokens_per_expert_list = (
            out.handle,
            out.recv_topk_idx,
            out.tokens_per_expert_list,
        )
        self._push("dispatch_postprocess", mb)
        return out.recv_x, out.recv_topk_weights

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """→ ``(x [P, H] expert-major, tokens_per_expert [L] CPU int64, probs [P])``."""
        mb = self._pop("dispatch_postprocess")
        if mb.fused_tokens_per_expert is not None:
            self._push("combine_preprocess", mb)
            return hidden_states, mb.fused_tokens_per_expert, probs.to(mb.probs_dtype)
        out = self._permute(mb, hidden_states, probs)
        self._push("combine_preprocess", mb)
        return out

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Expert outputs ``[P, H]`` → one summed row per received row ``[N, H]``."""
        mb = self._pop("combine_preprocess")
        if mb.fused_tokens_per_expert is not None:  # token_combine sums each token's rows inside the combine
            self._push("token_combine", mb)
            return hidden_states
        y_NH = unpermute_from_experts(hidden_states, mb.layout)
        self._push("token_combine", mb)
        return y_NH

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Rows back to their source ranks, summed per token → ``[T, H]``."""
        mb = self._pop("token_combine")
        buffer = mb.buffer
        if mb.fused_tokens_per_expert is not None:
            y_TH = combine_from_experts(buffer, hidden_states, mb.handle, config=self.combine_config,
                                        grad_config=self.dispatch_config)  # fmt: skip
        else:
            y_TH = ep_combine(buffer, hidden_states, mb.handle, config=self.combine_config,
                              grad_config=self.dispatch_config)  # fmt: skip
        if self.shared_experts is not None:
            self.shared_experts.post_forward_comm()
        self._push("combine_postprocess", mb)
        return y_TH

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[T, H]`` → ``[S, B, H]`` (+ the overlapped shared-expert output)."""
        mb = self._pop("combine_postprocess")
        output = hidden_states.view(mb.hidden_shape)
        if self.shared_experts is not None:
            output = output + self.shared_experts.get_output()
        return output

    # ------------------------------------------------------------------ chunked pipeline
    def chunked_dispatch_experts_combine(self, hidden_states: torch.Tensor, probs: torch.Tensor,
                                         experts: ExpertsFn, num_chunks: int) -> torch.Tensor:  # fmt: skip
        """token_dispatch → experts → token_combine over ``num_chunks`` pipelined token chunks.

        Replaces the four middle stages for one micro-batch (called between ``dispatch_preprocess``
        and ``combine_postprocess``).  Chunk i's experts run while chunk i+1 is dispatched and chunk
        i-1 combined on the Buffer's comm stream; the backward mirrors it (see ``streams``).

        Args:
            hidden_states: ``[T, H]`` from ``dispatch_preprocess``.  probs: its ``[T, K]`` weights.
            experts: ``experts(x [P, H], tokens_per_expert [L], probs [P]) -> (y [P, H], bias)``.
            num_chunks: number of chunks (the same on every rank); chunks may be empty.

        Returns:
            ``[T, H]``: the combined expert output, for ``combine_postprocess``.
        """
        mb = self._pop("token_dispatch")
        buffer = self._buffer(hidden_states)
        lane = CommLane(buffer)
        weights_TK = probs.to(self._weight_dtype(buffer, probs.dtype))
        ready = lane.ready_event()
        self._shared_experts_launch()
        x_chunks = torch.tensor_split(hidden_states, num_chunks)
        w_chunks = torch.tensor_split(weights_TK, num_chunks)
        idx_chunks = torch.tensor_split(mb.topk_idx_TK, num_chunks)

        def issue_dispatch(i: int):
            return lane.issue(lambda ev, fin: self._dispatch(buffer, x_chunks[i], idx_chunks[i], w_chunks[i], ev, fin),
                              ready)  # fmt: skip

        pending = issue_dispatch(0)
        combined: list[tuple[torch.Tensor, Any]] = []
        for i in range(num_chunks):
            out, pending = pending, None
            CommLane.wait(out.event, (out.recv_x, out.recv_topk_idx, out.recv_topk_weights))
            part = _MicroBatch(mb.hidden_shape, idx_chunks[i], mb.probs_dtype, out.handle, out.recv_topk_idx,
                               out.tokens_per_expert_list)  # fmt: skip
            x_PH, tokens_per_expert_L, probs_P = self._permute(part, out.recv_x, out.recv_topk_weights)
            y_PH, bias = experts(x_PH, tokens_per_expert_L, probs_P)
            if bias is not None:
                raise ValueError("experts returning a separate bias are not supported by the 'deepep' dispatcher")
            y_NH = unpermute_from_experts(y_PH, part.layout)
            if i + 1 < num_chunks:  # queued after chunk i's experts, so it overlaps them
                pending = issue_dispatch(i + 1)
            combined.append(self._issue_combine(lane, buffer, y_NH, out.handle))
        outputs = []
        for result in combined:
            y_TH, event = result if isinstance(result, tuple) else (result, None)
            CommLane.wait(event, (y_TH,))
            outputs.append(y_TH)
        if self.shared_experts is not None:
            self.shared_experts.post_forward_comm()
        self._push("combine_postprocess", mb)
        return torch.cat(outputs, dim=0)
