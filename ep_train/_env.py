"""The one place where ep_train reads ``EP_TRAIN_*`` environment variables.

The library never writes ``os.environ``; every other module asks here.
"""

from __future__ import annotations

import os

__all__ = [
    "default_timeout_s",
    "forced_backend",
    "low_latency_rma",
    "low_latency_transport",
    "nvshmem_roots",
    "quiet_import",
]


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from exc
    if value <= 0:
        raise ValueError(f"environment variable {name} must be > 0, got {raw!r}")
    return value


def default_timeout_s() -> float:
    """Bound on every wait for peers (``EP_TRAIN_TIMEOUT_S``, default 100 s)."""
    return _float("EP_TRAIN_TIMEOUT_S", 100.0)


def forced_backend() -> str | None:
    """Backend that ``backend="auto"`` must pick (``EP_TRAIN_BACKEND``: ``torch`` or ``cuda``)."""
    raw = os.environ.get("EP_TRAIN_BACKEND", "").strip().lower()
    if raw == "":
        return None
    if raw not in ("torch", "cuda"):
        raise ValueError(f"environment variable EP_TRAIN_BACKEND must be 'torch' or 'cuda', got {raw!r}")
    return raw


def quiet_import() -> bool:
    """``EP_TRAIN_QUIET=1`` silences the one-line backend report at import."""
    return os.environ.get("EP_TRAIN_QUIET", "") not in ("", "0")


LOW_LATENCY_TRANSPORTS = ("auto", "nvshmem", "ipc")


def low_latency_transport() -> str:
    """Memory of the cuda backend's low-latency buffer (``EP_TRAIN_LL_TRANSPORT``).

    ``auto`` (default): NVSHMEM symmetric memory where every rank can use it, else CUDA IPC with a
    message; ``nvshmem``: NVSHMEM or an error; ``ipc``: CUDA IPC.
    """
    raw = os.environ.get("EP_TRAIN_LL_TRANSPORT", "").strip().lower() or "auto"
    if raw not in LOW_LATENCY_TRANSPORTS:
        raise ValueError(
            f"environment variable EP_TRAIN_LL_TRANSPORT must be one of {LOW_LATENCY_TRANSPORTS}, got {raw!r}"
        )
    return raw


def low_latency_rma() -> bool:
    """``EP_TRAIN_LL_RMA=1``: the cuda backend's low-latency kernels reach every rank by NVSHMEM puts
    from staged rows, the path for ranks on other nodes, also on one node (to check that path; it
    needs NVSHMEM memory and ``ep_train._C`` built with ``EP_TRAIN_NVSHMEM_DEVICE=1``)."""
    raw = os.environ.get("EP_TRAIN_LL_RMA", "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"environment variable EP_TRAIN_LL_RMA must be 0 or 1, got {raw!r}")
    return raw == "1"


def nvshmem_roots() -> list[str]:
    """Where an NVSHMEM installation may be, in order: ``$NVSHMEM_HOME`` (NVSHMEM's own name), then
    the ``nvidia/nvshmem`` folder of the pip wheel (nvidia-nvshmem-cu12/-cu13).

    setup.py loads this file by path (it imports nothing of ep_train), so the build finds the same
    headers that the run time finds the library in.
    """
    import importlib.util

    roots = [os.environ["NVSHMEM_HOME"]] if os.environ.get("NVSHMEM_HOME") else []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += [os.path.join(p, "nvshmem") for p in spec.submodule_search_locations]
    return roots
