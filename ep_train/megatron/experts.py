"""``GroupedGemmMLP``: a Megatron experts module on ``torch._grouped_mm`` (no TransformerEngine).

Megatron's fast expert paths need TransformerEngine (``TEGroupedMLP``) or the ``grouped_gemm``
package (legacy ``GroupedMLP``); without them only ``SequentialMLP`` (one GEMM pair per expert)
is left.  This module stores the L local experts as two stacked weights and runs each layer as a
single ``torch._grouped_mm`` on CUDA BF16 (rows of each expert contiguous, as every dispatcher
produces them); elsewhere it loops over experts with the same math.

Math per row (as Megatron's expert MLP): ``fc2(act(fc1(x)) * prob)``; ``act`` is
``activation_func`` or, with ``gated_linear_unit``, ``activation_func(a) * (b + glu_linear_offset)``
of the two halves, each first clamped when ``activation_func_clamp_value`` is set (``a`` from above,
``b`` on both sides).

Shape legend: P expert-major rows, H hidden, F ``moe_ffn_hidden_size``, N fc1 outputs (F or 2F),
L local experts.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from torch.nn import Parameter

from ..moe import ChunkedExperts, gemm_offsets, grouped_matmul, row_counts, swiglu

__all__ = ["GroupedGemmMLP", "grouped_matmul"]


def _check_config(config) -> None:
    """Refuse, naming the setting, what these BF16 grouped GEMMs would silently not do."""
    for name in ("fp8", "fp4"):
        if getattr(config, name, None):
            raise ValueError(f"GroupedGemmMLP runs BF16/FP32 GEMMs: config.{name}={getattr(config, name)!r} needs "
                             "TransformerEngine's TEGroupedMLP")  # fmt: skip
    if getattr(config, "moe_latent_size", None):
        raise ValueError(f"GroupedGemmMLP does not support moe_latent_size={config.moe_latent_size}")
    if config.moe_apply_probs_on_input and config.moe_router_topk != 1:
        raise ValueError(
            f"moe_apply_probs_on_input needs moe_router_topk=1 (as Megatron's experts), got {config.moe_router_topk}"
        )


class GroupedGemmMLP(MegatronModule):
    """Experts of one rank as stacked weights ``weight1 [L, H, N]`` and ``weight2 [L, F, H]``.

    Built like Megatron's experts modules: ``GroupedGemmMLP(num_local_experts, config,
    pg_collection=...)`` (``submodules`` and ``name`` are accepted and unused).  Needs
    ``add_bias_linear=False`` and expert tensor parallel size 1.
    """

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, name: str | None = None,
                 **unused):  # fmt: skip
        super().__init__(config=config)
        if config.add_bias_linear:
            raise ValueError("GroupedGemmMLP has no biases: set add_bias_linear=False")
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        if pg_collection.expt_tp.size() != 1:
            raise ValueError(f"GroupedGemmMLP needs expert tensor parallel size 1, got {pg_collection.expt_tp.size()}")
        _check_config(config)
        self.num_local_experts = num_local_experts
        self.ep_group, self.dp_group = pg_collection.ep, pg_collection.expt_dp
        # Plain SwiGLU (gated SiLU, no offset, no clamp) runs as ep_train.moe.swiglu: one kernel each
        # way on CUDA BF16.
        self._swiglu = (
            bool(config.gated_linear_unit)
            and config.activation_func is torch.nn.functional.silu
            and not getattr(config, "glu_linear_offset", 0.0)
            and getattr(config, "activation_func_clamp_value", None) is None
        )
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        fc1_out = 2 * ffn if config.gated_linear_unit else ffn
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = Parameter(
            torch.empty(num_local_experts, hidden, fc1_out, dtype=config.params_dtype, device=device)
        )
        self.weight2 = Parameter(torch.empty(num_local_experts, ffn, hidden, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            self._initialize(config)
        expert_parallel = config.expert_model_parallel_size > 1
        for p in (self.weight1, self.weight2):
            p.allreduce = not expert_parallel  # Megatron's marker for expert-parallel parameters

    @torch.no_grad()
    def _initialize(self, config) -> None:
        """Each expert's layers as Megatron's ``[out, in]`` linear weights, stored transposed."""
        from contextlib import nullcontext

        from megatron.core.tensor_parallel import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

        fork = nullcontext() if config.use_cpu_initialization else get_cuda_rng_tracker().fork(
            get_expert_parallel_rng_tracker_name()
        )  # fmt: skip
        with fork:
            for weight, init in ((self.weight1, config.init_method), (self.weight2, config.output_layer_init_method)):
                for e in range(self.num_local_experts):
                    linear = torch.empty(weight.shape[2], weight.shape[1], dtype=weight.dtype, device=weight.device)
                    init(linear)
                    weight[e].copy_(linear.t())

    def _activation(self, h_PN: torch.Tensor) -> torch.Tensor:
        config = self.config
        act = config.activation_func
        if config.gated_linear_unit:
            a, b = torch.chunk(h_PN, 2, dim=-1)
            if (clamp := getattr(config, "activation_func_clamp_value", None)) is not None:
                a, b = a.clamp(max=clamp), b.clamp(min=-clamp, max=clamp)
            return act(a) * (b + getattr(config, "glu_linear_offset", 0.0))
        return act(h_PN)

    def _activation_probs(self, h_PN: torch.Tensor, probs_P: torch.Tensor) -> torch.Tensor:
        """``activation(h) * probs`` per row, in h's dtype."""
        if self._swiglu:
            return swiglu(h_PN, probs_P)
        return (self._activation(h_PN) * probs_P.unsqueeze(-1)).to(h_PN.dtype)

    def _inputs(self, x_PH: torch.Tensor, tokens_per_expert, probs_P: torch.Tensor):
        if self.config.moe_apply_probs_on_input:
            x_PH = (probs_P.unsqueeze(-1) * x_PH).to(x_PH.dtype)
            probs_P = torch.ones_like(probs_P)
        counts = row_counts(tokens_per_expert)
        if sum(counts) != x_PH.shape[0]:
            raise ValueError(f"tokens_per_expert sums to {sum(counts)}, but there are {x_PH.shape[0]} rows")
        return x_PH, counts, probs_P

    def for_chunks(self):
        """The experts as the chunked pipeline calls them, one forward pass's chunks at a time.

        Same math as ``forward``; the weight gradients of all chunks are computed together (see
        :class:`ep_train.moe.ChunkedExperts`), not once per chunk.
        """
        scope = ChunkedExperts(self.weight1, self.weight2, self._activation, self._activation_probs)

        def run(x_PH: torch.Tensor, tokens_per_expert, probs_P: torch.Tensor, **unused):
            x_PH, _, probs_P = self._inputs(x_PH, tokens_per_expert, probs_P)
            return scope(x_PH, tokens_per_expert, probs_P), None  # the counts with any offsets attached

        return run

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor, **unused):  # fmt: skip
        """``x [P, H]`` (expert-major), ``tokens_per_expert [L]``, ``probs [P]`` → ``(y [P, H], None)``."""
        x_PH, counts, probs_P = self._inputs(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        # One offsets tensor for both GEMMs (their backward keeps it): the dispatch's, when it attached them.
        offs = gemm_offsets(x_PH, self.weight1, counts, tokens_per_expert)
        h_PN = grouped_matmul(x_PH, self.weight1, counts, offs)
        a_PF = self._activation_probs(h_PN, probs_P)
        return grouped_matmul(a_PF, self.weight2, counts, offs), None

    def backward_dw(self) -> None:
        """Weight gradients are computed in the ordinary backward (nothing is delayed)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Both weights sharded along the expert axis over the EP group (global ``[E, ...]``)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        dp_rank = self.dp_group.rank()
        out = {}
        for name in ("weight1", "weight2"):
            tensor = getattr(self, name)
            key = f"{prefix}{name}"
            out[key] = ShardedTensor.from_rank_offsets(
                key, tensor, *sharded_offsets, (len(sharded_offsets), ep_rank, ep_size),
                replica_id=(0, 0, dp_rank), prepend_axis_num=len(sharded_offsets),
            )  # fmt: skip
        return out
