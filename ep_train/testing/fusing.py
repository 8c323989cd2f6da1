"""A torch backend that answers the fusion hooks as the CUDA kernels do, so that the code above the
kernels takes its fused branches on CPU too.

The CUDA backend writes an expert-major dispatch's rows straight into expert-major order and sums a
combine's pair rows inside the kernel; its handles carry ``pair_pos`` but no permutation layout.
``FusingTorchBackend`` does the same with the torch backend and the permutation's own functions, so
Buffer, the autograd pair and the framework adapters run on CPU exactly the branches they run on
GPUs.  ``fusing_torch_backend()`` makes every torch-backend Buffer created inside it this one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from .. import backends
from ..backends.base import CombineArgs, CombineResult, DispatchArgs, DispatchResult
from ..backends.torch_backend import TorchBackend
from ..permute import permute_dispatch_result, sum_pair_rows

__all__ = ["FusingTorchBackend", "fusing_torch_backend"]


class FusingTorchBackend(TorchBackend):
    """``TorchBackend`` with the CUDA backend's answers to ``fuses_expert_major`` and
    ``fuses_expert_major_combine`` (see the module docstring)."""

    def fuses_expert_major(self, x_TH: torch.Tensor, num_experts: int, num_topk: int) -> bool:
        return True

    def fuses_expert_major_combine(self, x_PH: torch.Tensor) -> bool:
        return True

    def dispatch(self, args: DispatchArgs) -> DispatchResult:
        if not args.expert_major:
            return super().dispatch(args)
        plain = dataclasses.replace(args, expert_major=False)
        res = permute_dispatch_result(super().dispatch(plain), plain)
        extras = {k: v for k, v in res.handle.extras.items() if k != "pair_layout"}
        return dataclasses.replace(res, handle=dataclasses.replace(res.handle, extras=extras))

    def combine(self, args: CombineArgs) -> CombineResult:
        if not args.expert_major:
            return super().combine(args)
        rows = sum_pair_rows(args.x_NH, args.handle.pair_pos_NK)
        return super().combine(dataclasses.replace(args, x_NH=rows, expert_major=False))


@contextlib.contextmanager
def fusing_torch_backend() -> Iterator[None]:
    """Buffers created with the torch backend inside this context (this process) fuse as the kernels do."""
    saved, backends.TorchBackend = backends.TorchBackend, FusingTorchBackend
    try:
        yield
    finally:
        backends.TorchBackend = saved
