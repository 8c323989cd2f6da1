"""``torch.autograd.Function`` pairs over ``Buffer``: the backward of dispatch is a combine and
the backward of combine is a (cached-handle) dispatch; the same for the expert-major pair
(``dispatch_to_experts`` / ``combine_from_experts``) and the low-latency pair."""

from .low_latency import low_latency_combine, low_latency_dispatch
from .normal import (
    DispatchOutput,
    ExpertMajorOutput,
    combine,
    combine_from_experts,
    dispatch,
    dispatch_to_experts,
)
from .replay import checkpoint, routing_replay_contexts

__all__ = [
    "DispatchOutput",
    "ExpertMajorOutput",
    "checkpoint",
    "combine",
    "combine_from_experts",
    "dispatch",
    "dispatch_to_experts",
    "low_latency_combine",
    "low_latency_dispatch",
    "routing_replay_contexts",
]
