"""Spies on a Buffer's calls: which kernel config each dispatch and combine was given."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["record_configs"]


def record_configs(buffer: Any) -> list[tuple[str, Any]]:
    """From now on, append ``(call, config)`` for every ``dispatch`` and ``combine`` of ``buffer``
    (``config`` as the call received it, positional or keyword; None when not given) to the list
    returned.  The calls themselves run unchanged."""
    calls: list[tuple[str, Any]] = []
    for name in ("dispatch", "combine"):
        fn = getattr(buffer, name)
        signature = inspect.signature(fn)

        def record(*args, _fn=fn, _signature=signature, _name=name, **kwargs):
            calls.append((_name, _signature.bind(*args, **kwargs).arguments.get("config")))
            return _fn(*args, **kwargs)

        setattr(buffer, name, record)
    return calls
