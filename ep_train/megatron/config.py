"""Building a ``TransformerConfig`` for a registered dispatcher such as ``"deepep"``.

``TransformerConfig(moe_token_dispatcher_type="deepep", ...)`` constructs as is (Megatron does
not enforce its Literal), but a few ``__post_init__`` checks accept only Megatron's own names:
``moe_shared_expert_overlap`` (alltoall, and flex from 0.19) and
``overlap_moe_expert_parallel_comm`` (alltoall/flex).  ``make_config`` runs Megatron's checks as
for ``"alltoall"`` — the dispatcher whose contract ours follows — then sets the registered name
and adds the checks of our dispatcher.
"""

from __future__ import annotations

from typing import Any

from .registry import MEGATRON_DISPATCHERS, get_token_dispatcher

__all__ = ["check_config", "make_config"]


def make_config(config_cls: type | None = None, **kwargs: Any):
    """``config_cls(**kwargs)`` (default ``TransformerConfig``) that accepts registered dispatchers.

    Example: ``make_config(num_layers=2, ..., moe_token_dispatcher_type="deepep",
    moe_shared_expert_overlap=True)``.  Works for any TransformerConfig subclass (e.g.
    ``MLATransformerConfig``).
    """
    if config_cls is None:
        from megatron.core.transformer.transformer_config import TransformerConfig as config_cls
    name = kwargs.get("moe_token_dispatcher_type")
    if name is None or name in MEGATRON_DISPATCHERS:
        return config_cls(**kwargs)
    if get_token_dispatcher(name) is None:
        raise ValueError(
            f"moe_token_dispatcher_type={name!r} is neither Megatron's ({', '.join(MEGATRON_DISPATCHERS)}) nor "
            "registered with ep_train.megatron.register_token_dispatcher"
        )
    config = config_cls(**{**kwargs, "moe_token_dispatcher_type": "alltoall"})
    config.moe_token_dispatcher_type = name
    check_config(config)
    return config


def check_config(config) -> None:
    """Raise ValueError for settings the ``deepep`` dispatcher does not implement."""
    if getattr(config, "moe_pad_expert_input_to_capacity", False):
        raise ValueError(
            "moe_pad_expert_input_to_capacity (drop-and-pad) is not supported by the 'deepep' dispatcher; "
            "use moe_expert_capacity_factor without padding, or the 'alltoall' dispatcher"
        )
    for name in ("moe_router_padding_for_quantization", "moe_router_padding_for_fp8"):
        if getattr(config, name, False):
            raise ValueError(
                f"{name} is not supported by the 'deepep' dispatcher; pad expert rows with "
                "EPOptions(expert_alignment=16 or 32) instead"
            )
    if config.num_moe_experts is None:
        raise ValueError("the 'deepep' dispatcher needs num_moe_experts")
    if getattr(config, "cuda_graph_impl", "none") not in ("none", None):
        scopes = _graph_scopes(config)
        # An empty scope list ("full", the default) captures whole layers, MoE included; "moe" the
        # MoE layer; "full_iteration" everything.
        captured = sorted(scopes & {"moe_preprocess", "moe", "full_iteration"}) or ([] if scopes else ["full"])
        if captured:
            listed = sorted(scopes) or "[] (whole layers)"
            raise ValueError(
                f"cuda_graph_impl={config.cuda_graph_impl!r} with CUDA-graph scopes {listed} "
                f"captures the MoE preprocess ({', '.join(captured)}; cuda_graph_impl='local' adds moe_preprocess "
                "to moe_router), whose per-micro-batch state the 'deepep' dispatcher keeps outside the graph; "
                "capture moe_router alone with cuda_graph_impl='transformer_engine', or scopes without the MoE layer "
                "such as attn"
            )


def _graph_scopes(config) -> set[str]:
    """Names of the CUDA-graph scopes set (0.16: ``cuda_graph_scope``; 0.19: ``cuda_graph_modules``,
    with ``cuda_graph_scope`` its deprecated spelling); "full" is Megatron's old spelling of none."""
    names: set[str] = set()
    for attr in ("cuda_graph_modules", "cuda_graph_scope"):
        value = getattr(config, attr, None)
        if isinstance(value, str):
            value = value.split(",")
        for scope in value or ():
            names.add(str(getattr(scope, "name", scope)).strip())
    return names - {"full", ""}
