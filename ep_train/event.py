"""``EventOverlap``: a CUDA event (or nothing, on CPU) plus the tensors it keeps alive."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["EventOverlap", "capture"]


class EventOverlap:
    """Completion of work queued on a buffer's communication stream.

    On CUDA it wraps a ``torch.cuda.Event``; on CPU work is already complete when it is returned and
    the event is ``None``.  ``extra_tensors`` are held until the event is waited on, so memory used by
    in-flight communication is not reused early.

    Use ``event.current_stream_wait()`` or ``with event: ...`` (the body runs, then the current stream
    waits), which lets compute overlap with communication.
    """

    def __init__(self, event: torch.cuda.Event | None = None, extra_tensors: tuple[Any, ...] | None = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
        self.extra_tensors = None

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def query(self) -> bool:
        return True if self.event is None else self.event.query()

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        state = "cpu" if self.event is None else ("done" if self.event.query() else "pending")
        return f"EventOverlap({state})"


def capture() -> EventOverlap:
    """An event recorded on the current CUDA stream now (a completed no-op event on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return EventOverlap(event)
    return EventOverlap(None)
