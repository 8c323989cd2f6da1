"""Optional compiled extension ``ep_train._C`` (the CUDA kernels).  Built only where CUDA is present."""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["is_available", "unavailable_reason", "load"]

_module = None
_reason: str | None = None

if importlib.util.find_spec(f"{__package__}._C") is None:
    _reason = "ep_train._C is not built (no CUDA toolkit or no CUDA build of torch when installed)"
else:  # pragma: no cover - depends on the build
    try:
        _module = importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        _reason = f"ep_train._C failed to import: {exc}"


def is_available() -> bool:
    """True when the CUDA kernels are built and a CUDA device is visible."""
    if _module is None:
        return False
    import torch

    return torch.cuda.is_available()


def unavailable_reason() -> str | None:
    if _module is None:
        return _reason
    import torch

    return None if torch.cuda.is_available() else "no CUDA device is visible"


def load():
    """The extension module; raises ImportError saying why it is not there."""
    if _module is None:
        raise ImportError(
            f"{_reason}; install ep_train on a machine with the CUDA toolkit and a CUDA build of torch "
            "(pip install -e . --no-build-isolation)"
        )
    return _module
