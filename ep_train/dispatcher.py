"""``MoEDispatcher``: framework-neutral dispatch → expert-major rows → combine.

The dispatcher is what the Megatron and DeepSpeed adapters build on.  ``dispatch`` moves tokens to
the ranks of their experts (differentiable) and permutes the received rows into expert-major order
— one row per (token, local expert) pair, each expert's group padded to ``expert_alignment`` — the
layout a grouped GEMM wants.  ``combine`` sums each token's pair rows back into one row and returns
them to the source ranks.  Gate weights are not applied here: the experts multiply by ``probs``.

The permutation runs on the device with no host sync (see ``ep_train.permute``); every reduction
adds a row's pairs in ascending k with FP32 accumulation, so results are deterministic.  By default
(``fused_permutation``) it runs inside the communication: ``dispatch_to_experts`` /
``combine_from_experts``, whose CUDA kernels write and read expert-major rows directly (same bits).

Shape legend: T local tokens, D hidden, K top-k, N received rows, P expert-major rows (pairs +
alignment padding), L local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .autograd.normal import combine as ep_combine
from .autograd.normal import combine_from_experts, dispatch_to_experts
from .autograd.normal import dispatch as ep_dispatch
from .buffer import Buffer
from .config import Config
from .handle import DispatchHandle
from .permute import PairLayout, permute_to_experts, unpermute_from_experts
from .validate import check_bool, check_int

__all__ = ["MoEDispatcher", "MoEHandle", "PairLayout", "permute_to_experts", "unpermute_from_experts"]


@dataclass(frozen=True)
class MoEHandle:
    """Routing of one :meth:`MoEDispatcher.dispatch`, consumed by :meth:`MoEDispatcher.combine`.

    dispatch: the ep_train dispatch handle.
    layout: where each received row's pairs sit in expert-major order (None after an expert-major
        dispatch: the dispatch handle's ``pair_pos_NK`` holds it).
    """

    dispatch: DispatchHandle
    layout: PairLayout | None


class MoEDispatcher:
    """Dispatch tokens to experts and combine the expert outputs back, for any MoE layer.

    Args:
        buffer: the :class:`ep_train.Buffer` of the expert-parallel group.
        num_experts: E (global), divisible by the group size; rank r owns experts [r*L, (r+1)*L).
        expert_alignment: pad each local expert's rows to a multiple of this (grouped GEMM tiles).
        num_worst_tokens: fixed receive size (see ``Buffer.dispatch``).
        fp8: transfer the dispatch in FP8 (e4m3, per-128 scales).
        dispatch_config, combine_config: kernel configs of every dispatch and combine, the
            backward's included (the dispatch's backward is a combine, and so on); None: the
            buffer's defaults.
        fused_permutation: dispatch straight into expert-major order and combine from it
            (``ep_train.autograd.dispatch_to_experts``); needs ``num_worst_tokens=0`` (otherwise
            the rows are permuted after the dispatch).
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
        fused_permutation: bool = True,
    ):
        if not isinstance(buffer, Buffer):
            raise TypeError(f"buffer must be an ep_train.Buffer, got {type(buffer).__name__}")
        num_experts = check_int("num_experts", num_experts, 1)
        if num_experts % buffer.group_size != 0:
            raise ValueError(f"num_experts={num_experts} must be divisible by the EP size {buffer.group_size}")
        expert_alignment = check_int("expert_alignment", expert_alignment, 1)
        num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, 0)
        self.buffer = buffer
        self.num_experts = num_experts
        self.num_local_experts = num_experts // buffer.group_size
        self.expert_alignment = expert_alignment
        self.num_worst_tokens = num_worst_tokens
        self.fp8 = check_bool("fp8", fp8)
        self.dispatch_config, self.combine_config = dispatch_config, combine_config
        self.fused_permutation = check_bool("fused_permutation", fused_permutation) and num_worst_tokens == 0

    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor):
        """→ ``(x_PD expert-major, tokens_per_expert_L CPU int64, probs_P, handle)``.

        Args:
            x_TD: ``[T, D]`` tokens.  topk_idx_TK: ``[T, K]`` int64 global expert ids, -1 = none.
            topk_weights_TK: ``[T, K]`` float32 gate weights (gradients flow back to them via probs_P).
        """
        if self.fused_permutation:
            fused = dispatch_to_experts(self.buffer, x_TD, topk_idx_TK, topk_weights_TK, self.num_experts,
                                        expert_alignment=self.expert_alignment, fp8=self.fp8,
                                        config=self.dispatch_config, grad_config=self.combine_config)  # fmt: skip
            return fused.x, fused.tokens_per_expert, fused.probs, MoEHandle(fused.handle, None)
        out = ep_dispatch(
            self.buffer,
            x_TD,
            topk_idx_TK,
            topk_weights_TK,
            self.num_experts,
            num_worst_tokens=self.num_worst_tokens,
            fp8=self.fp8,
            config=self.dispatch_config,
            grad_config=self.combine_config,
        )
        x_PD, tokens_per_expert, probs_P, layout = permute_to_experts(
            out.recv_x, out.recv_topk_idx, out.recv_topk_weights, self.num_local_experts, self.expert_alignment,
            out.tokens_per_expert_list,
        )  # fmt: skip
        return x_PD, tokens_per_expert, probs_P, MoEHandle(out.handle, layout)

    def combine(self, y_PD: torch.Tensor, handle: MoEHandle) -> torch.Tensor:
        """Expert outputs ``[P, D]`` (already multiplied by probs) → ``[T, D]`` on the source ranks."""
        if not isinstance(handle, MoEHandle):
            raise TypeError(f"handle must be the MoEHandle of MoEDispatcher.dispatch, got {type(handle).__name__}")
        if handle.layout is None:
            return combine_from_experts(self.buffer, y_PD, handle.dispatch, config=self.combine_config,
                                        grad_config=self.dispatch_config)  # fmt: skip
        y_ND = unpermute_from_experts(y_PD, handle.layout)
        return ep_combine(self.buffer, y_ND, handle.dispatch, config=self.combine_config,
                          grad_config=self.dispatch_config)  # fmt: skip
