"""``CommTimer``: time spent in a Buffer's communication calls, per operation.

Attach one with ``buffer.timer = CommTimer()``.  On CUDA it records events on the communication
stream (no sync until :meth:`CommTimer.totals`); on CPU it reads the wall clock around each call.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

__all__ = ["CommTimer"]


class CommTimer:
    def __init__(self) -> None:
        self._cpu: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.counts: dict[str, int] = defaultdict(int)

    def start(self, name: str, stream) -> tuple:
        self.counts[name] += 1
        if stream is None:
            return (name, time.perf_counter(), None)
        begin = torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        return (name, begin, stream)

    def stop(self, token: tuple) -> None:
        name, begin, stream = token
        if stream is None:
            self._cpu[name] += time.perf_counter() - begin
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        self._events.append((name, begin, end))

    def totals(self, reset: bool = True) -> dict[str, float]:
        """Seconds per operation since the last reset (synchronises pending CUDA events)."""
        out = defaultdict(float, self._cpu)
        for name, begin, end in self._events:
            end.synchronize()
            out[name] += begin.elapsed_time(end) / 1e3
        if reset:
            self._cpu.clear()
            self._events.clear()
            self.counts.clear()
        return dict(out)
