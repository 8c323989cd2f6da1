"""Stream plumbing for overlapping ep_train communication with compute (no-ops on CPU).

``CommLane`` runs ep_train's autograd dispatch/combine ops *inside* the Buffer's communication
stream.  PyTorch runs every backward op on the stream its forward ran on and synchronises streams
where gradients cross them, so the backward communication (a combine for each dispatch, a cached
dispatch for each combine) lands on the comm stream as well and overlaps the expert backward of
other chunks with no extra code.  The compute stream waits for a result only where it uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..buffer import Buffer
from ..event import EventOverlap

__all__ = ["CommLane"]

T = TypeVar("T")


class CommLane:
    """Issue communication on ``buffer``'s comm stream; wait for it on the current stream.

    On CPU (no comm stream) :meth:`issue` calls ``fn(None, False)`` synchronously and the waits
    do nothing.
    """

    def __init__(self, buffer: Buffer):
        self.stream = buffer.get_comm_stream()

    @property
    def is_async(self) -> bool:
        return self.stream is not None

    def ready_event(self) -> EventOverlap | None:
        """An event on the current stream now: later comm waits on it instead of on later compute."""
        if self.stream is None:
            return None
        return Buffer.capture()

    def issue(self, fn: Callable[[EventOverlap | None, bool], T], after: EventOverlap | None) -> T:
        """Run ``fn(previous_event, async_finish)`` with the comm stream current (autograd records it)."""
        if self.stream is None:
            return fn(None, False)
        with torch.cuda.stream(self.stream):
            return fn(after, True)

    @staticmethod
    def wait(event: EventOverlap | None, tensors: tuple[torch.Tensor | None, ...]) -> None:
        """Make the current stream wait for ``event``; mark ``tensors`` as used by it (allocator safety)."""
        if event is None or event.event is None:
            return
        event.current_stream_wait()
        current = torch.cuda.current_stream()
        for t in tensors:
            if t is not None and t.is_cuda:
                t.record_stream(current)
