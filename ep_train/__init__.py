"""ep_train: expert-parallel dispatch/combine for Mixture-of-Experts training.

``Buffer`` follows DeepEP's V1 method set (switch by changing the import); ``ep_train.autograd``
wraps it for training; ``ep_train.megatron`` and ``ep_train.deepspeed`` plug it into those frameworks.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from . import _env
from .backends import available_backends
from .buffer import Buffer, topk_idx_t
from .config import Config, get_combine_config, get_dispatch_config
from .dispatcher import MoEDispatcher
from .errors import CommError, CommTimeoutError, RankMismatchError
from .event import EventOverlap, capture
from .handle import DispatchHandle, LowLatencyHandle

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "Config",
    "CommError",
    "CommTimeoutError",
    "DispatchHandle",
    "EventOverlap",
    "LowLatencyHandle",
    "MoEDispatcher",
    "RankMismatchError",
    "available_backends",
    "capture",
    "get_combine_config",
    "get_dispatch_config",
    "topk_idx_t",
]


def _report_backends() -> None:
    """One line on stderr, from local rank 0 only, saying which backends this install has."""
    if _env.quiet_import() or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    if multiprocessing.current_process().name != "MainProcess":  # workers started by a launcher
        return
    states = "; ".join(f"{name}: {state}" for name, state in available_backends().items())
    print(f"ep_train {__version__}: {states}", file=sys.stderr)


_report_backends()
