"""Installing ep_train into a DeepSpeed model: :func:`use_ep_train` and the drop-in :class:`MoE`."""

from __future__ import annotations

import warnings
import weakref

import torch
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.moe.sharded_moe import MOELayer
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn

from ..validate import check_int
from .experts import GroupedMLPExperts
from .layer import BufferPool, EPMOELayer

__all__ = ["MoE", "use_ep_train"]


def use_ep_train(model: nn.Module, *, drop_tokens: bool | None = False, backend: str = "auto",
                 num_sms: int | None = None, expert_alignment: int = 1,
                 combine_dtype: torch.dtype | None = None) -> list[str]:  # fmt: skip
    """Replace the ``MOELayer`` of every ``deepspeed.moe.layer.MoE`` in ``model`` by an
    :class:`EPMOELayer`; call it after building the model and before ``deepspeed.initialize``.

    Gates, experts and their parameters (and tags) stay the same objects, so checkpoints and
    optimizer parameter groups are unaffected.  All replaced layers share one Buffer per
    expert-parallel group.

    Args:
        model: the model (not a ``DeepSpeedEngine``: the engine has already collected its MoE layers).
        drop_tokens: False (default) makes every gate dropless; True keeps DeepSpeed's capacity
            factor (tokens over capacity are dropped exactly as DeepSpeed drops them); None leaves
            each gate's own setting.
        backend, num_sms: of the shared Buffers (see :class:`BufferPool`).
        expert_alignment, combine_dtype: see :class:`EPMOELayer`.

    Returns:
        The qualified names of the replaced layers (empty if the model has no DeepSpeed MoE).
    """
    if isinstance(model, DeepSpeedEngine):
        raise TypeError("use_ep_train() must run before deepspeed.initialize(): pass the model, not the engine")
    if drop_tokens is not None and not isinstance(drop_tokens, bool):
        raise TypeError(f"drop_tokens must be True, False or None, got {drop_tokens!r}")
    check_int("expert_alignment", expert_alignment, 1)
    pool = BufferPool(backend=backend, num_sms=num_sms)
    planned = []  # every replacement is built before any is installed: an error leaves the model as it was
    for name, module in model.named_modules():
        if not isinstance(module, _DeepSpeedMoE):
            continue
        layer = module.deepspeed_moe
        qualified = f"{name}.deepspeed_moe" if name else "deepspeed_moe"
        if isinstance(layer, EPMOELayer):
            if drop_tokens is not None and layer.gate.drop_tokens != drop_tokens:
                warnings.warn(f"{qualified} already runs through ep_train: its gate keeps drop_tokens="
                              f"{layer.gate.drop_tokens}, not {drop_tokens}", stacklevel=2)  # fmt: skip
            continue
        if type(layer) is not MOELayer:  # a user subclass we leave alone
            continue
        new = EPMOELayer.from_moe_layer(layer, buffers=pool, expert_alignment=expert_alignment,
                                        combine_dtype=combine_dtype)  # fmt: skip
        planned.append((qualified, module, new))
    for _, module, new in planned:
        if drop_tokens is not None:
            new.gate.drop_tokens = drop_tokens
        module.deepspeed_moe = new
    return [qualified for qualified, _, _ in planned]


# The pool that drop-in MoE layers built without ``buffers=`` share, held only by those layers:
# one Buffer per group for all of them (one per layer would cost a Buffer's memory per layer).
_shared_pool: weakref.WeakValueDictionary[str, BufferPool] = weakref.WeakValueDictionary()


def _default_pool() -> BufferPool:
    pool = _shared_pool.get("pool")
    if pool is None:
        pool = BufferPool()
        _shared_pool["pool"] = pool
    return pool


def _check_moe_args(hidden_size, num_experts, ep_size, k, drop_tokens, buffers) -> None:
    """What DeepSpeed's MoE leaves to a failure deep in the forward (or to no failure at all)."""
    check_int("hidden_size", hidden_size, 1)
    check_int("num_experts", num_experts, 1)
    check_int("ep_size", ep_size, 1)
    check_int("k", k, 1)
    if num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide num_experts={num_experts}")
    if k > num_experts:
        raise ValueError(f"k={k} exceeds num_experts={num_experts}")
    if not isinstance(drop_tokens, bool):
        raise TypeError(f"drop_tokens must be True or False, got {drop_tokens!r}")
    if buffers is not None and not isinstance(buffers, BufferPool):
        raise TypeError(f"buffers must be an ep_train.deepspeed.BufferPool or None, got {type(buffers).__name__}")


class MoE(_DeepSpeedMoE):
    """``deepspeed.moe.layer.MoE`` running through ep_train, dropless by default.

    Same arguments and return value ``(output, l_aux, exp_counts)`` as DeepSpeed's MoE, except:

    - ``drop_tokens`` defaults to False (dropless); True restores the capacity factor.
    - ``expert`` may be None with ``ffn_hidden_size`` given: the local experts are then one
      :class:`GroupedMLPExperts` (SwiGLU, grouped GEMM) instead of per-expert module copies.
    - ``use_tutel`` is not supported (ep_train does the dispatch).

    Keyword-only: ``ffn_hidden_size``, ``buffers`` (a :class:`BufferPool`; default: one pool that
    every drop-in layer built without ``buffers`` shares), ``expert_alignment``, ``combine_dtype``.
    """

    def __init__(self, hidden_size: int, expert: nn.Module | None = None, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: str | None = None, drop_tokens: bool = False,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, *, ffn_hidden_size: int | None = None,
                 buffers: BufferPool | None = None, expert_alignment: int = 1,
                 combine_dtype: torch.dtype | None = None) -> None:  # fmt: skip
        if use_tutel:
            raise ValueError("use_tutel=True is not supported: ep_train does the dispatch")
        _check_moe_args(hidden_size, num_experts, ep_size, k, drop_tokens, buffers)
        grouped = expert is None
        if grouped:
            if ffn_hidden_size is None:
                raise ValueError("give either expert (a module copied per local expert) or ffn_hidden_size")
            if use_residual:
                raise ValueError("use_residual=True needs the expert module (it is also the residual MLP)")
            expert = nn.Identity()  # placeholder, replaced below
        elif ffn_hidden_size is not None:
            raise ValueError("give either expert or ffn_hidden_size, not both")
        super().__init__(hidden_size, expert, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
                         min_capacity, use_residual, noisy_gate_policy, drop_tokens, use_rts, False,
                         enable_expert_tensor_parallelism, top2_2nd_expert_sampling)  # fmt: skip
        layer = self.deepspeed_moe
        experts = layer.experts
        if grouped:
            experts = GroupedMLPExperts(self.num_local_experts, hidden_size, ffn_hidden_size, self.expert_group_name)
        self.deepspeed_moe = EPMOELayer(
            layer.gate, experts, self.expert_group_name, ep_size, self.num_local_experts,
            buffers=buffers if buffers is not None else _default_pool(),
            expert_alignment=expert_alignment, combine_dtype=combine_dtype,
        )  # fmt: skip
