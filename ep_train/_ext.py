"""Optional compiled extension ``ep_train._C`` (the CUDA kernels).  Built only where CUDA is present."""

from __future__ import annotations

import functools
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


#: The compute capability the kernels are compiled for (setup.py: ``-gencode arch=compute_90,code=sm_90``,
#: no PTX): other GPUs cannot run them.
BUILT_CAPABILITY = (9, 0)


def is_available() -> bool:
    """True when the CUDA kernels are built and the current CUDA device can run them."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    if _module is None:
        return _reason
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    capability = _capability(torch.cuda.current_device())
    if capability != BUILT_CAPABILITY:
        built = "sm_{}{}".format(*BUILT_CAPABILITY)
        return f"ep_train._C is built for {built} (Hopper: H100/H200); this GPU is sm_{capability[0]}{capability[1]}"
    return None


def device_sms() -> int | None:
    """SMs of the current CUDA device (None without CUDA)."""
    import torch

    return _multiprocessors(torch.cuda.current_device()) if torch.cuda.is_available() else None


@functools.cache
def _multiprocessors(device: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _capability(device: int) -> tuple[int, int]:
    """Compute capability of a device, asked once (the kernels' callers check it on every call)."""
    import torch

    return tuple(torch.cuda.get_device_capability(device))


def load():
    """The extension module; raises ImportError saying why it is not there."""
    if _module is None:
        raise ImportError(
            f"{_reason}; install ep_train on a machine with the CUDA toolkit and a CUDA build of torch "
            "(pip install -e . --no-build-isolation)"
        )
    return _module
