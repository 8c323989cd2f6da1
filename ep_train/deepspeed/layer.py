"""``EPMOELayer``: DeepSpeed's ``MOELayer`` with the capacity buffers and all-to-alls replaced by
ep_train dispatch/combine.

DeepSpeed's gate runs unchanged (same ``l_aux``, ``exp_counts``, noise and random token selection);
its sparse routes — expert index per (route, token), -1 where the capacity limit dropped it —
become ep_train's ``topk_idx``.  With ``drop_tokens=False`` no route is -1: the layer is dropless
and no token pays for padding.  With ``drop_tokens=True`` the gate's drops are honoured, so the
output equals DeepSpeed's capacity-factor layer.

Shape legend: S tokens of this rank, D hidden, K routes per token (top-k), E experts,
L local experts, P expert-major rows.
"""

from __future__ import annotations

import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import FIRST_ALLTOALL_TIMER, MOE_TIMER, SECOND_ALLTOALL_TIMER, MOELayer
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from ..buffer_pool import BufferPool
from ..dispatcher import MoEDispatcher
from ..permute import permute_to_experts, unpermute_from_experts
from .experts import GroupedMLPExperts, run_experts

__all__ = ["BufferPool", "EPMOELayer"]


def _check_experts(experts) -> None:
    """The layer calls each of an ``Experts``' modules on its ``[n, D]`` rows itself (see
    ``run_experts``): an ``Experts`` subclass with its own ``forward`` would be bypassed."""
    if isinstance(experts, GroupedMLPExperts):
        return
    if not isinstance(experts, Experts):
        raise TypeError(
            f"experts must be GroupedMLPExperts or deepspeed.moe.experts.Experts, got {type(experts).__name__}"
        )
    if type(experts).forward is not Experts.forward:
        raise TypeError(
            f"{type(experts).__name__} overrides Experts.forward, which EPMOELayer does not call: it runs each "
            "module of experts.deepspeed_experts on its rows [n, D]; move the logic into those modules"
        )


class EPMOELayer(MOELayer):
    """Drop-in for ``deepspeed.moe.sharded_moe.MOELayer``: gate → ep_train dispatch → local experts →
    combine.

    Subclasses ``MOELayer`` so the DeepSpeed engine finds it (wall-clock breakdown timers:
    ``time_moe``, ``time_falltoall`` = dispatch, ``time_salltoall`` = combine).  ``l_aux`` and
    ``exp_counts`` are set by every forward, as in DeepSpeed.

    Args:
        gate: the ``TopKGate`` (kept as is; its ``drop_tokens`` decides dropless vs capacity mode).
        experts: ``deepspeed.moe.experts.Experts`` (per-expert loop) or
            :class:`~ep_train.deepspeed.GroupedMLPExperts` (grouped GEMM); parameters keep their tags.
        ep_group_name, ep_size, num_local_experts: as for ``MOELayer``.
        buffers: the :class:`BufferPool` shared by the model's layers (None: a pool of this layer).
        expert_alignment: pad each local expert's row group to a multiple of this (grouped GEMM tiles).
        combine_dtype: dtype of the rows combine moves (None: the experts' output dtype).  float32
            keeps the weighted routes in FP32 until summed, as DeepSpeed's decode does, at twice the
            bytes of BF16; the CUDA kernels move BF16 only.
    """

    def __init__(self, gate, experts, ep_group_name, ep_size, num_local_experts, *, buffers: BufferPool | None = None,
                 expert_alignment: int = 1, combine_dtype: torch.dtype | None = None):  # fmt: skip
        super().__init__(gate, experts, ep_group_name, ep_size, num_local_experts, use_tutel=False)
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise ValueError(f"expert_alignment must be an int >= 1, got {expert_alignment!r}")
        if combine_dtype is not None and not (
            isinstance(combine_dtype, torch.dtype) and combine_dtype.is_floating_point
        ):
            raise TypeError(f"combine_dtype must be a floating torch.dtype or None, got {combine_dtype!r}")
        _check_experts(experts)
        self.buffers = buffers if buffers is not None else BufferPool()
        self.expert_alignment = expert_alignment
        self.combine_dtype = combine_dtype
        self.num_experts = num_local_experts * ep_size

    @classmethod
    def from_moe_layer(cls, layer: MOELayer, **kwargs) -> EPMOELayer:
        """An ``EPMOELayer`` sharing ``layer``'s gate, experts and process group (parameters unchanged)."""
        if getattr(layer, "use_tutel", False):
            raise ValueError(
                "the MOELayer uses Tutel; ep_train replaces its dispatch, build the MoE with use_tutel=False"
            )
        new = cls(layer.gate, layer.experts, layer.ep_group_name, layer.ep_size, layer.num_local_experts, **kwargs)
        new.ep_group = layer.ep_group
        new.wall_clock_breakdown = layer.wall_clock_breakdown
        new.train(layer.training)
        return new

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group
        if self.gate.ep_group is None:
            self.gate._set_ep_group(ep_group)
        elif self.gate.ep_group is not ep_group:
            raise ValueError("the gate already belongs to another expert-parallel group")

    def _dispatcher(self, x_SD: torch.Tensor) -> MoEDispatcher:
        if self.ep_group is None:
            raise RuntimeError(
                "the expert-parallel group is not set: build the model, call use_ep_train() and then "
                "deepspeed.initialize() (or MoE.set_deepspeed_parallelism()) before the first forward"
            )
        size = max(x_SD.element_size(), (self.combine_dtype or x_SD.dtype).itemsize)
        buffer = self.buffers.get(self.ep_group, x_SD.shape[-1], size)
        return MoEDispatcher(buffer, self.num_experts, expert_alignment=self.expert_alignment)

    def _weighted(self, y_PD: torch.Tensor, probs_P: torch.Tensor) -> torch.Tensor:
        # The product is formed in FP32 like DeepSpeed's decode, then cast to the combine dtype.
        return (y_PD.float() * probs_P.float().unsqueeze(-1)).to(self.combine_dtype or y_PD.dtype)

    def _start(self, name: str) -> None:
        if self.wall_clock_breakdown:
            self.timers(name).start()

    def _stop(self, name: str) -> float:
        if not self.wall_clock_breakdown:
            return 0.0
        self.timers(name).stop()
        return self.timers(name).elapsed(reset=False)

    def forward(self, *input: torch.Tensor, **kwargs) -> torch.Tensor:
        """``input[0]``: ``[..., D]`` tokens; ``input[1]``: optional ``[S]`` used-token mask (top-1)."""
        self._start(MOE_TIMER)
        hidden = input[0]
        used_token = input[1] if len(input) > 1 else None
        if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
            raise NotImplementedError("EPMOELayer does not support tensor-parallel non-expert layers (mpu with TP > 1)")
        x_SD = hidden.reshape(-1, hidden.shape[-1])
        self.l_aux, _, _, idx_KS, _, gates_KS, self.exp_counts = self.gate(x_SD, used_token, True, False)
        topk_idx_SK = idx_KS.t().to(torch.int64).contiguous()
        topk_weights_SK = gates_KS.t().float().contiguous()

        self._start(FIRST_ALLTOALL_TIMER)
        if self.ep_size == 1:
            x_PD, tokens_per_expert, probs_P, layout = permute_to_experts(
                x_SD, topk_idx_SK, topk_weights_SK, self.num_local_experts, self.expert_alignment
            )
        else:
            dispatcher = self._dispatcher(x_SD)
            x_PD, tokens_per_expert, probs_P, handle = dispatcher.dispatch(x_SD, topk_idx_SK, topk_weights_SK)
        self.time_falltoall = self._stop(FIRST_ALLTOALL_TIMER)

        expert_out_PD = run_experts(self.experts, x_PD, tokens_per_expert)
        y_PD = self._weighted(expert_out_PD, probs_P)

        self._start(SECOND_ALLTOALL_TIMER)
        if self.ep_size == 1:
            y_SD = unpermute_from_experts(y_PD, layout)
        else:
            y_SD = dispatcher.combine(y_PD, handle)
        self.time_salltoall = self._stop(SECOND_ALLTOALL_TIMER)

        out = y_SD.to(expert_out_PD.dtype).reshape(hidden.shape)
        self.time_moe = self._stop(MOE_TIMER)
        return out
