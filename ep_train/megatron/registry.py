"""Token-dispatcher registry: ``moe_token_dispatcher_type`` names beyond Megatron's own.

Megatron-Core's ``MoELayer`` picks its dispatcher from a fixed if/elif over "allgather",
"alltoall" and "flex".  :class:`ep_train.megatron.EPMoELayer` looks the configured name up here
first, so new dispatchers plug in without editing Megatron.  ``"deepep"`` (ep_train's dispatcher)
is registered when ``ep_train.megatron`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["MEGATRON_DISPATCHERS", "get_token_dispatcher", "register_token_dispatcher",
           "registered_token_dispatchers", "unregister_token_dispatcher"]  # fmt: skip

#: Names Megatron's MoELayer builds itself; they cannot be registered.
MEGATRON_DISPATCHERS = ("allgather", "alltoall", "flex")

#: factory(num_local_experts, local_expert_indices, *, config, pg_collection, options, buffers)
DispatcherFactory = Callable[..., Any]

_REGISTRY: dict[str, DispatcherFactory] = {}


def register_token_dispatcher(name: str, factory: DispatcherFactory, *, overwrite: bool = False) -> None:
    """Make ``moe_token_dispatcher_type=name`` build ``factory(...)`` in :class:`EPMoELayer`.

    Args:
        name: the config value, not one of Megatron's own names.
        factory: called as ``factory(num_local_experts, local_expert_indices, config=...,
            pg_collection=..., options=EPOptions, buffers=BufferPool)``; returns a
            ``MoETokenDispatcher``.
        overwrite: replace an existing registration instead of raising.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name in MEGATRON_DISPATCHERS:
        raise ValueError(f"{name!r} is built by Megatron's MoELayer itself and cannot be registered")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"a token dispatcher named {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = factory


def unregister_token_dispatcher(name: str) -> None:
    """Remove a registration (KeyError if absent)."""
    del _REGISTRY[name]


def get_token_dispatcher(name: str) -> DispatcherFactory | None:
    """The factory registered under ``name``, or None (Megatron's names are never registered)."""
    return _REGISTRY.get(name)


def registered_token_dispatchers() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
