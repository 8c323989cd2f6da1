"""Exceptions raised when ranks disagree, a peer stalls or dies."""

from __future__ import annotations

__all__ = ["CommError", "CommTimeoutError", "RankMismatchError"]


class CommError(RuntimeError):
    """A collective or kernel of the communication layer failed; the buffer is unusable afterwards."""


class CommTimeoutError(CommError, TimeoutError):
    """A wait for peers passed its bound (a rank skipped a call, died, or is stuck)."""


class RankMismatchError(CommError, ValueError):
    """Ranks called the same operation with incompatible arguments (hidden, num_experts, op, ...)."""
