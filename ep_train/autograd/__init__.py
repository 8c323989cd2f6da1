"""``torch.autograd.Function`` pairs over ``Buffer``: the backward of dispatch is a combine and
the backward of combine is a (cached-handle) dispatch; the same for the low-latency pair."""

from .low_latency import low_latency_combine, low_latency_dispatch
from .normal import DispatchOutput, combine, dispatch
from .replay import checkpoint, routing_replay_contexts

__all__ = [
    "DispatchOutput",
    "checkpoint",
    "combine",
    "dispatch",
    "low_latency_combine",
    "low_latency_dispatch",
    "routing_replay_contexts",
]
