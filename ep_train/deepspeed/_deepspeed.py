"""The one place that imports DeepSpeed for ``ep_train.deepspeed`` and checks its version."""

from __future__ import annotations

import inspect

__all__ = ["DEEPSPEED_TESTED", "require_deepspeed"]

#: DeepSpeed release the adapter is tested against (CPU parity tests, docs/deepspeed.md).
DEEPSPEED_TESTED = "0.19.8"

_INSTALL = 'DS_BUILD_OPS=0 pip install "deepspeed==0.19.8"'


def require_deepspeed() -> str:
    """Import DeepSpeed and check the MoE gate API the adapter relies on; return its version."""
    try:
        import deepspeed
        from deepspeed.moe.sharded_moe import TopKGate
    except ImportError as exc:
        raise ImportError(f"ep_train.deepspeed needs DeepSpeed: {_INSTALL}") from exc
    params = inspect.signature(TopKGate.forward).parameters
    if "sparse_routes" not in params:
        raise ImportError(
            f"ep_train.deepspeed needs a DeepSpeed whose TopKGate returns sparse routes "
            f"(tested {DEEPSPEED_TESTED}), found {deepspeed.__version__}: {_INSTALL}"
        )
    return deepspeed.__version__
