"""Build the Megatron-Core GPT model with MoE layers that a recipe describes.

The dispatcher comes from ``moe.dispatcher``: Megatron's own ``alltoall`` / ``allgather`` / ``flex``
or ep_train's ``deepep`` (through :mod:`ep_train.megatron`).  On CPU the whole run happens inside
:func:`ep_train.megatron.cpu_compat.cpu_compat`, which :meth:`BuiltModel.close` leaves.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .optim import is_expert_param
from .recipe import Recipe

__all__ = ["BuiltModel", "Groups", "build_model"]


@dataclass
class Groups:
    dp: dist.ProcessGroup  # dense parameters' gradient reduction
    expert_dp: dist.ProcessGroup  # expert parameters' gradient reduction
    ep: dist.ProcessGroup  # expert-parallel group (expert shards)


@dataclass
class BuiltModel:
    model: torch.nn.Module
    groups: Groups
    seq_length: int
    device: torch.device
    comm_timers: list = field(default_factory=list)
    #: the BufferPools of the model's MoE layers (deepep) or of the flex backend
    buffer_pools: list = field(default_factory=list)
    _counts: list = field(default_factory=list)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _aux_loss_scale: float | None = None

    def forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a micro-batch (MoE aux losses act through the router)."""
        s = tokens.shape[1]
        position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand_as(tokens)
        # An explicit causal mask (True = hidden): Megatron's default one is built on a CUDA device.
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), diagonal=1)[None, None]
        per_token = self.model(tokens, position_ids, mask, labels=labels)
        return per_token.to(torch.promote_types(per_token.dtype, torch.float32)).mean()  # FP32, or FP64

    def set_aux_loss_scale(self, scale: float) -> None:
        """The factor on the MoE aux losses' gradients, the main loss's (1 / micro-batches per step),
        as Megatron's schedules set it (unset, each micro-batch's aux loss counts in full)."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        if scale != self._aux_loss_scale:  # once per run, not per step (a host-to-device copy)
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale, device=self.device))
            self._aux_loss_scale = scale

    def reset_step_stats(self) -> None:
        self._counts.clear()
        for timer in self.comm_timers:
            timer.totals(reset=True)

    def step_stats(self) -> tuple[float | None, int, int]:
        """(communication seconds of dispatch/combine this step, or None where they are not timed:
        Megatron's own dispatchers; min and max tokens per expert)."""
        comm = sum(sum(t.totals(reset=True).values()) for t in self.comm_timers) if self.comm_timers else None
        if not self._counts:
            return comm, 0, 0
        counts = torch.stack(self._counts).to(self.device)
        dist.all_reduce(counts, group=self.groups.dp)
        return comm, int(counts.min()), int(counts.max())

    def check_comm(self) -> None:
        """Raise what a dispatch/combine kernel of this step reported (before its outputs are used
        by an optimizer step or a checkpoint)."""
        for pool in self.buffer_pools:
            pool.check()

    def close(self) -> None:
        self._stack.close()


def _transformer_config(recipe: Recipe, device: torch.device, dtype: torch.dtype):
    from megatron.core.transformer import TransformerConfig

    m, p, moe = recipe.model, recipe.parallel, recipe.moe
    # ep_train's dispatcher is selected as "deepep"; Megatron builds the layer through our spec.
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_router_topk,
        # Top-1 needs the softmax before the top-k (after it the one prob is 1: no router gradient).
        moe_router_pre_softmax=m.moe_router_topk == 1,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.shared_expert_ffn_hidden_size or None,
        moe_layer_freq=[1 if (i + 1) % m.moe_layer_freq == 0 else 0 for i in range(m.num_layers)],
        moe_token_dispatcher_type=moe.dispatcher,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_grouped_gemm=moe.grouped_gemm and device.type == "cuda",
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        sequence_parallel=p.tensor_model_parallel_size > 1,
        use_cpu_initialization=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def _layer_spec(recipe: Recipe, config, stack: contextlib.ExitStack, pools: list):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    m = recipe.model
    if recipe.moe.dispatcher == "deepep":
        from ..megatron import get_gpt_layer_spec

        return get_gpt_layer_spec(config, num_sms=recipe.moe.num_sms, overlap_chunks=recipe.moe.overlap_chunks)
    spec = get_gpt_layer_local_spec(m.num_experts, moe_grouped_gemm=config.moe_grouped_gemm,
                                    normalization="RMSNorm")  # fmt: skip
    if recipe.moe.dispatcher == "flex":
        from ..megatron import install_flex_backend

        backend = install_flex_backend(num_sms=recipe.moe.num_sms)
        stack.callback(backend.uninstall)
        pools.append(backend.buffers)
    return spec


def build_model(recipe: Recipe, device: torch.device, dtype: torch.dtype) -> BuiltModel:
    """Initialise Megatron's parallel state and build the GPT model on ``device`` in ``dtype``."""
    try:
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.models.gpt import GPTModel
    except ImportError as exc:
        raise ImportError("the training entry needs megatron-core: pip install 'megatron-core>=0.16,<0.20'") from exc
    from ..megatron.cpu_compat import cpu_compat

    stack = contextlib.ExitStack()
    if device.type == "cpu":
        stack.enter_context(cpu_compat())
    p = recipe.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
        )
    torch.manual_seed(recipe.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(recipe.train.seed)
    config = _transformer_config(recipe, device, dtype)
    m = recipe.model
    pools: list = []
    spec = _layer_spec(recipe, config, stack, pools)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=m.vocab_size,
                     max_sequence_length=m.seq_length, position_embedding_type="rope")  # fmt: skip
    if device.type == "cpu":
        _draw_experts_per_rank(model, config, recipe.train.seed, parallel_state.get_expert_model_parallel_rank())
    model.to(device=device, dtype=dtype)
    groups = Groups(
        dp=parallel_state.get_data_parallel_group(),
        expert_dp=parallel_state.get_expert_data_parallel_group(),
        ep=parallel_state.get_expert_model_parallel_group(),
    )
    built = BuiltModel(model, groups, m.seq_length, device, buffer_pools=pools, _stack=stack)
    _attach_observers(built, recipe)
    return built


@torch.no_grad()
def _draw_experts_per_rank(model: torch.nn.Module, config, seed: int, ep_rank: int) -> None:
    """Expert weights drawn from a generator of this EP rank, as Megatron's expert-parallel RNG
    does on GPUs.  CPU initialisation draws every rank's weights from the same global generator,
    so expert l of every EP rank would start as a copy of the others' (experts 0 and L the same
    expert twice); dense weights stay as drawn (the same on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1 + ep_rank)
        for name, param in model.named_parameters():
            if not is_expert_param(param):
                continue
            if "linear_fc1" in name:
                config.init_method(param)
            elif "linear_fc2" in name:
                config.output_layer_init_method(param)
            else:
                raise RuntimeError(f"expert parameter {name} has no known initialisation")


def _attach_observers(built: BuiltModel, recipe: Recipe) -> None:
    """Count tokens per expert at every router and time ep_train's communication."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from ..buffer_pool import BufferPool
    from ..profiling import CommTimer

    def on_route(_module, _inputs, output):
        _probs, routing_map = output
        built._counts.append(routing_map.detach().sum(dim=0).to(torch.int64))

    seen = set()
    for module in built.model.modules():
        if isinstance(module, MoELayer):
            module.router.register_forward_hook(on_route)
            pool = getattr(module.token_dispatcher, "buffers", None)
            if isinstance(pool, BufferPool) and all(pool is not p for p in built.buffer_pools):
                built.buffer_pools.append(pool)
            buffer = getattr(module.token_dispatcher, "buffer", None)
            if buffer is not None and id(buffer) not in seen:
                seen.add(id(buffer))
                buffer.timer = CommTimer()
                built.comm_timers.append(buffer.timer)
