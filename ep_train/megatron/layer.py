"""``EPMoELayer``: Megatron's ``MoELayer`` that builds registered token dispatchers.

Megatron's ``MoELayer.__init__`` accepts only "allgather", "alltoall" and "flex".  For a name in
ep_train's registry (``"deepep"``), ``EPMoELayer`` lets the base class build with a placeholder
dispatcher, then installs the registered one; every other name behaves exactly as ``MoELayer``.
With ``EPOptions(num_chunks > 1)`` the layer runs dispatch → experts → combine as a chunked
pipeline; the routing, shared experts, post-processing and Megatron's own features (recompute,
padding masks, CUDA-graph hooks) are the base class's.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from ..buffer_pool import BufferPool
from ._megatron import MoELayer, get_default_pg_collection
from .options import EPOptions
from .registry import get_token_dispatcher

__all__ = ["EPMoELayer"]

# Placeholder the base class builds while a registered dispatcher's name is configured: the
# cheapest of Megatron's dispatchers (no streams, no communication at construction).
_PLACEHOLDER = "allgather"


@contextlib.contextmanager
def _dispatcher_name(config, name: str):
    original = config.moe_token_dispatcher_type
    config.moe_token_dispatcher_type = name
    try:
        yield
    finally:
        config.moe_token_dispatcher_type = original


class EPMoELayer(MoELayer):
    """``MoELayer`` whose token dispatcher may come from ``ep_train.megatron``'s registry.

    Args:
        config, submodules, layer_number, pg_collection, **kwargs: as ``MoELayer``.
        ep_options: :class:`EPOptions` for a registered dispatcher (ignored for Megatron's own).
        ep_buffers: the :class:`BufferPool` shared by the model's MoE layers (a private one if None).
    """

    def __init__(self, config, submodules=None, layer_number: int | None = None, pg_collection=None, *,
                 ep_options: EPOptions | None = None, ep_buffers: BufferPool | None = None, **kwargs: Any):  # fmt: skip
        name = config.moe_token_dispatcher_type
        factory = get_token_dispatcher(name)
        self.ep_options = ep_options if ep_options is not None else EPOptions()
        if factory is None:
            super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                             **kwargs)  # fmt: skip
            if self.ep_options.num_chunks > 1:
                warnings.warn(
                    f"EPOptions.num_chunks={self.ep_options.num_chunks} is ignored with Megatron's own "
                    f"dispatcher {name!r}: only a registered dispatcher such as 'deepep' pipelines chunks",
                    stacklevel=2,
                )
            return
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        with _dispatcher_name(config, _PLACEHOLDER):
            super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                             **kwargs)  # fmt: skip
        self.token_dispatcher = factory(
            self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pg_collection,
            options=self.ep_options, buffers=ep_buffers,
        )  # fmt: skip
        if hasattr(self, "_training_token_dispatcher"):
            # 0.19, transformer_impl="inference_optimized": the base class kept the placeholder as the
            # dispatcher its forward switches back to outside inference.
            self._training_token_dispatcher = self.token_dispatcher
        if self.use_shared_expert and self.shared_expert_overlap:
            self.token_dispatcher.set_shared_experts(self.shared_experts)
        if (self.ep_options.num_chunks > 1 and not config.overlap_moe_expert_parallel_comm
                and getattr(config, "overlap_dispatch_backward_with_experts_wgrad", False)):  # fmt: skip
            raise ValueError(
                f"EPOptions.num_chunks={self.ep_options.num_chunks} cannot be combined with "
                "overlap_dispatch_backward_with_experts_wgrad=True: the chunked pipeline runs the experts "
                "itself, outside the hooks that compute their delayed weight gradients; use num_chunks=1"
            )
        if self.ep_options.num_chunks > 1 and config.overlap_moe_expert_parallel_comm:
            warnings.warn(
                "EPOptions.num_chunks is ignored under overlap_moe_expert_parallel_comm: the EP-overlap schedule "
                "runs the dispatcher stages itself and overlaps whole micro-batches",
                stacklevel=2,
            )

    @property
    def _num_chunks(self) -> int:
        """Chunks of the pipelined path for this forward (1: Megatron's stage-by-stage path)."""
        if not hasattr(self.token_dispatcher, "chunked_dispatch_experts_combine"):
            return 1
        if self.config.overlap_moe_expert_parallel_comm:
            return 1
        return self.ep_options.num_chunks

    def dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        if self._num_chunks == 1:
            return super().dispatch(hidden_states, probs)
        return hidden_states, probs  # the pipeline in routed_experts_compute dispatches chunk by chunk

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        num_chunks = self._num_chunks
        if num_chunks == 1:
            return super().routed_experts_compute(hidden_states, probs)
        # Experts that can run per chunk with one weight-gradient GEMM per layer say so (for_chunks).
        experts = self.experts.for_chunks() if hasattr(self.experts, "for_chunks") else self.experts
        output = self.token_dispatcher.chunked_dispatch_experts_combine(hidden_states, probs, experts, num_chunks)
        return output, None

    def combine(self, output: torch.Tensor):
        if self._num_chunks == 1:
            return super().combine(output)
        return output  # already combined by the pipeline
