"""The Megatron-Core names this adapter builds on, imported once after the version check."""

from __future__ import annotations

from ._version import require_megatron_core

MEGATRON_CORE_VERSION = require_megatron_core()

from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection  # noqa: E402
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher  # noqa: E402

__all__ = ["MEGATRON_CORE_VERSION", "MoELayer", "MoETokenDispatcher", "get_default_pg_collection"]
