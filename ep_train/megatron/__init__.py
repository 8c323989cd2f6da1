"""ep_train for Megatron-Core: ``moe_token_dispatcher_type="deepep"`` and a ``flex`` backend.

Quick use (see docs/megatron.md)::

    from ep_train.megatron import EPOptions, gpt_layer_spec, make_config

    config = make_config(..., moe_token_dispatcher_type="deepep")
    spec = gpt_layer_spec(num_experts=config.num_moe_experts, options=EPOptions(num_chunks=2))
    model = GPTModel(config=config, transformer_layer_spec=spec, ...)

Users already on ``moe_token_dispatcher_type="flex"`` call ``install_flex_backend()`` instead.

Importing this package needs megatron-core (tested 0.16.x and 0.19.x) and changes nothing in
Megatron; CPU runs use the explicit :func:`ep_train.megatron.cpu_compat.cpu_compat` context.
"""

from ._version import MEGATRON_CORE_TESTED, megatron_core_version, require_megatron_core

MEGATRON_CORE_VERSION = require_megatron_core()

from ..buffer_pool import BufferPool  # noqa: E402
from .config import check_config, make_config  # noqa: E402
from .dispatcher import EPTokenDispatcher, routing_map_to_topk, routing_topk  # noqa: E402
from .experts import GroupedGemmMLP  # noqa: E402
from .flex import FlexBackend, install_flex_backend  # noqa: E402
from .layer import EPMoELayer  # noqa: E402
from .options import EPOptions  # noqa: E402
from .registry import (  # noqa: E402
    get_token_dispatcher,
    register_token_dispatcher,
    registered_token_dispatchers,
    unregister_token_dispatcher,
)
from .spec import get_gpt_layer_spec, gpt_decoder_block_spec, gpt_layer_spec, moe_layer_spec  # noqa: E402

#: The name users put in ``TransformerConfig.moe_token_dispatcher_type``.
DISPATCHER_NAME = "deepep"

register_token_dispatcher(DISPATCHER_NAME, EPTokenDispatcher, overwrite=True)

__all__ = [
    "DISPATCHER_NAME",
    "MEGATRON_CORE_TESTED",
    "MEGATRON_CORE_VERSION",
    "BufferPool",
    "EPMoELayer",
    "EPOptions",
    "EPTokenDispatcher",
    "FlexBackend",
    "GroupedGemmMLP",
    "check_config",
    "get_gpt_layer_spec",
    "get_token_dispatcher",
    "gpt_decoder_block_spec",
    "gpt_layer_spec",
    "install_flex_backend",
    "make_config",
    "megatron_core_version",
    "moe_layer_spec",
    "register_token_dispatcher",
    "registered_token_dispatchers",
    "require_megatron_core",
    "routing_map_to_topk",
    "routing_topk",
    "unregister_token_dispatcher",
]
