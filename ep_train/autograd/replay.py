"""Routing replay for activation checkpointing.

A recomputed forward must see the routing of the first forward: the same receive order, the same
handle, no new layout exchange.  ``routing_replay_contexts()`` returns the two context managers
``torch.utils.checkpoint`` takes as ``context_fn``: during the first forward every ep_train
dispatch inside the region records its routing; during the recomputation the same dispatches, in
the same order, replay it (cached-handle dispatch).  The record lives only as long as the
checkpointed region's saved state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint

__all__ = ["RoutingRecord", "checkpoint", "routing_replay_contexts", "next_replay", "record"]


@dataclass
class RoutingRecord:
    """Routings of the dispatches of one checkpointed region, in call order."""

    entries: list[Any] = field(default_factory=list)
    cursor: int = 0
    replaying: bool = False


_ACTIVE: ContextVar[RoutingRecord | None] = ContextVar("ep_train_routing_record", default=None)


@contextlib.contextmanager
def _activate(rec: RoutingRecord, replaying: bool):
    rec.replaying, rec.cursor = replaying, 0
    token = _ACTIVE.set(rec)
    try:
        yield rec
    finally:
        _ACTIVE.reset(token)


def routing_replay_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``."""
    rec = RoutingRecord()
    return _activate(rec, False), _activate(rec, True)


def checkpoint(fn: Callable, *args, **kwargs):
    """Non-reentrant activation checkpoint of ``fn`` whose recomputation replays ep_train routings."""
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=routing_replay_contexts, **kwargs
    )


def next_replay(kind: str) -> Any | None:
    """The recorded entry this call must replay, or None outside a recomputation."""
    rec = _ACTIVE.get()
    if rec is None or not rec.replaying:
        return None
    if rec.cursor >= len(rec.entries):
        raise RuntimeError(
            f"recomputation made more ep_train dispatches ({rec.cursor + 1}) than the first forward "
            f"({len(rec.entries)}); the checkpointed function must be deterministic in its calls"
        )
    entry = rec.entries[rec.cursor]
    rec.cursor += 1
    if entry.kind != kind:
        raise RuntimeError(f"recomputation called a {kind} dispatch where the first forward called {entry.kind}")
    return entry


def record(entry: Any) -> None:
    """Remember a first-forward routing (no-op outside a checkpointed region)."""
    rec = _ACTIVE.get()
    if rec is not None and not rec.replaying:
        rec.entries.append(entry)
