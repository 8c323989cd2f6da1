"""Every rank of an EP group on one GPU: the NVLink kernels' logic checked without a multi-GPU machine.

``OneGpuGroup(R)`` gives each of R ranks a ``cuda`` backend whose buffer lives in this GPU's
memory (every rank maps every other rank's buffer by plain pointers, as it would map its peers'),
its own CUDA stream and its own host thread.  ``run`` calls a function on every rank at once, so
the collective calls meet as they would across GPUs: the kernels of all ranks run concurrently on
disjoint SMs (R x ``num_sms`` must fit on the GPU), the barriers and rings work the same way.  With
``low_latency_bytes`` each rank also gets a low-latency buffer, its kernels on 1/R of the SMs.  What
it cannot show is speed: all traffic stays in one GPU's memory.

Two rules follow from every rank sharing one process: the process runs with
``CUDA_MODULE_LOADING=EAGER`` (set before CUDA starts; the constructor checks it), and the function
given to ``run`` only issues work (inputs staged on the GPU first, results read after ``run``).  A
host call that waits on the device - a kernel loaded lazily at its first launch, a copy from
pageable memory, ``.cpu()`` - waits for the other ranks' running kernels, and those wait for this
rank's next launch: the group stops until the bounded waits fire.

Shape legend: T local tokens, H hidden, K top-k, E experts, N received rows, P expert-major rows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import _ext
from ..backends.base import (
    CallInfo,
    CombineArgs,
    DispatchArgs,
    DispatchResult,
    LowLatencyCombineArgs,
    LowLatencyCombineResult,
    LowLatencyDispatchArgs,
    LowLatencyDispatchResult,
    call_extra,
    low_latency_extra,
)
from ..backends.cuda import SUPPORTED_RANKS, CudaBackend
from ..backends.torch_backend import OP_NAMES
from ..buffer import (
    _DTYPE_CODES,
    _OP_CACHED,
    _OP_COMBINE,
    _OP_DISPATCH,
    _OP_LL_COMBINE,
    _OP_LL_DISPATCH,
)  # the call header as Buffer sends it
from ..config import Config
from ..handle import DispatchHandle, LowLatencyHandle

__all__ = ["GroupError", "OneGpuGroup"]


class GroupError(RuntimeError):
    """Ranks of ``OneGpuGroup.run`` failed; ``rank_errors`` holds (rank, exception) of each."""

    def __init__(self, message: str, rank_errors: list[tuple[int, BaseException]]):
        super().__init__(message)
        self.rank_errors = rank_errors


class _RankBackend(CudaBackend):
    """The cuda backend of one rank whose buffers are device memory of this process: ``external``
    (NVLink buffer) and ``ll_external`` (low-latency buffer of ``ll_bytes``, 0: none)."""

    def __init__(self, rank: int, num_ranks: int, num_nvl_bytes: int, timeout_s: float, external: int,
                 ll_bytes: int, ll_external: int):  # fmt: skip
        self._C = _ext.load()
        self.group, self.rank, self.num_ranks, self.timeout_s = None, rank, num_ranks, float(timeout_s)
        # Other rank counts than 2, 4, 8: low-latency calls only (the NVLink kernels are built for those).
        self._rt = None
        if num_ranks in SUPPORTED_RANKS:
            self._rt = self._C.IntranodeRuntime(rank, num_ranks, num_nvl_bytes, self.timeout_s, external=external)
        self._ll = self._ll_block = None
        self.low_latency_transport = None
        if ll_bytes:
            self._ll = self._C.LowLatencyRuntime(rank, num_ranks, ll_bytes, self.timeout_s, external=ll_external)
            # Every rank's grid resident at once, with SMs to spare for the other kernels of the ranks.
            self._ll.set_num_sms(max(1, (self._ll.num_sms() - 8) // num_ranks))
            self.low_latency_transport = "ipc"


class OneGpuGroup:
    """R ranks of the ``cuda`` backend on the current GPU (see the module docstring).

    Args:
        num_ranks: 2, 4 or 8; or another count from 1 to 8 for low-latency calls only (no NVLink buffer).
        config: the kernels' config for every call (its ``num_sms`` x R SMs must fit on the GPU).
        hidden_bytes: the largest row any call moves (sizes the buffers).
        low_latency_bytes: size of each rank's low-latency buffer (``layout.low_latency_buffer_bytes``),
            0 for none; its kernels run on 1/R of the SMs per rank.
        more_configs: other configs that calls may pass as ``config=`` (the buffer is sized for all).
        low_latency_rma: ranks (bit r = rank r) that every rank's low-latency kernels reach by puts
            from staged rows instead of stores (the path for peers on other nodes); the buffers need
            ``rma_staging`` in their size.  ``low_latency_rma_impl``: how a put is done (default: a
            copy through the peer pointer; ``_C.LOW_LATENCY_RMA_NVSHMEM`` needs NVSHMEM memory).
        low_latency_memory: device addresses of the ranks' low-latency buffers to adopt (e.g. NVSHMEM
            symmetric blocks of ``low_latency_bytes``) instead of allocating them.
    """

    def __init__(self, num_ranks: int, config: Config, hidden_bytes: int, timeout_s: float = 30.0,
                 low_latency_bytes: int = 0, more_configs: Sequence[Config] = (), low_latency_rma: int = 0,
                 low_latency_rma_impl: int | None = None, low_latency_memory: Sequence[int] | None = None):  # fmt: skip
        loading = os.environ.get("CUDA_MODULE_LOADING", "LAZY")
        if loading.upper() != "EAGER":
            raise RuntimeError(
                f"OneGpuGroup needs CUDA_MODULE_LOADING=EAGER set before CUDA starts, got {loading!r}: a kernel "
                "loaded lazily inside run() waits for the other ranks' kernels, which wait for this rank"
            )
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        self._configs = (config, *more_configs)
        for c in self._configs:
            if num_ranks * c.num_sms > sms:
                raise ValueError(
                    f"{num_ranks} ranks x num_sms={c.num_sms} blocks exceed this GPU's {sms} SMs: every rank's "
                    "kernel must be resident at once (its blocks wait for the other ranks')"
                )
        nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in self._configs)
        self.num_ranks, self.config = num_ranks, config
        self._memory = [torch.empty(nvl, dtype=torch.uint8, device="cuda") for _ in range(num_ranks)]
        ll_bytes = max(low_latency_bytes, _ext.load().low_latency_control_bytes()) if low_latency_bytes else 0
        if low_latency_memory is not None:
            if len(low_latency_memory) != num_ranks:
                raise ValueError(f"low_latency_memory needs one address per rank, got {len(low_latency_memory)}")
            self._ll_memory, ll_pointers = [], [int(a) for a in low_latency_memory]
        else:
            self._ll_memory = [torch.empty(ll_bytes, dtype=torch.uint8, device="cuda") for _ in range(num_ranks)]
            ll_pointers = [m.data_ptr() for m in self._ll_memory]
        self.backends = [
            _RankBackend(r, num_ranks, nvl, timeout_s, self._memory[r].data_ptr(), ll_bytes, ll_pointers[r])
            for r in range(num_ranks)
        ]
        pointers = [m.data_ptr() for m in self._memory]
        impl = _ext.load().LOW_LATENCY_RMA_PEER_COPIES if low_latency_rma_impl is None else low_latency_rma_impl
        for backend in self.backends:
            if backend._rt is not None:
                backend._rt.set_peer_pointers(pointers)
            if ll_bytes:
                backend._ll.set_peer_pointers(ll_pointers)
                if low_latency_rma:
                    backend._ll.set_rma(low_latency_rma, impl)
        self._streams = [torch.cuda.Stream() for _ in range(num_ranks)]
        self._seq = [0] * num_ranks
        self._last = ["none"] * num_ranks

    @staticmethod
    def stage(obj: Any) -> Any:
        """``obj`` (tensors in nested lists/tuples) with every tensor copied to the GPU, copies done."""

        def copy(o: Any) -> Any:
            if isinstance(o, torch.Tensor):
                return o.cuda()
            return type(o)(copy(item) for item in o) if isinstance(o, (list, tuple)) else o

        staged = copy(obj)
        torch.cuda.synchronize()
        return staged

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """``fn(rank)`` on every rank at once (a thread and a stream each) → the ranks' results.

        ``fn`` only issues work: its inputs are on the GPU already (``stage``) and it reads nothing
        back (see the module docstring).  Measured on one H200: with host-to-device copies between
        the calls, 14 of 18 groups stopped until the bounded waits fired; staged, 18 of 18 passed.
        """
        results: list[Any] = [None] * self.num_ranks
        errors: list[BaseException | None] = [None] * self.num_ranks

        def body(rank: int) -> None:
            try:
                with torch.cuda.stream(self._streams[rank]):
                    results[rank] = fn(rank)
                self._streams[rank].synchronize()
                # What a kernel reported after the last host check (calls without a host sync).
                self.backends[rank]._raise_if_ll_failed()
            except BaseException as exc:  # noqa: BLE001 - reported below, with its rank
                errors[rank] = exc

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.num_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [(rank, exc) for rank, exc in enumerate(errors) if exc is not None]
        if failed:
            lines = [
                f"rank {rank} (last call: {self._last[rank]}): {type(exc).__name__}: {exc}" for rank, exc in failed
            ]
            raise GroupError("the one-GPU group failed:\n" + "\n".join(lines), failed) from failed[0][1]
        return results

    def _info(self, rank: int, op: int, hidden: int, num_experts: int, num_topk: int, extra: int = 0,
              dtype: torch.dtype = torch.bfloat16) -> CallInfo:  # fmt: skip
        self._seq[rank] += 1
        self._last[rank] = f"call {self._seq[rank]} ({OP_NAMES[op]})"
        return CallInfo(op, self._seq[rank], hidden, num_experts, num_topk, _DTYPE_CODES.get(dtype, 0), extra)

    def _config(self, config: Config | None) -> Config:
        """The config of one call: the group's, or one of ``more_configs``."""
        if config is None:
            return self.config
        if config not in self._configs:
            raise ValueError(f"config {config} was not given to OneGpuGroup (more_configs sizes the buffers)")
        return config

    # Calls made inside ``run`` (each rank makes the same calls in the same order); ``config``: the
    # call's kernel config (default: the group's).
    def dispatch(self, rank: int, x_TH, topk_idx_TK, topk_weights_TK, num_experts: int, *, alignment: int = 1,
                 expert_major: bool = False, x_scales_TS=None, num_worst_tokens: int = 0,
                 config: Config | None = None) -> DispatchResult:  # fmt: skip
        """A layout-free dispatch (BF16, or FP8 with ``x_scales_TS``); ``expert_major`` and
        ``num_worst_tokens`` as ``Buffer.dispatch``."""
        backend = self.backends[rank]
        per_rank, per_expert, in_rank = backend.get_dispatch_layout(topk_idx_TK, num_experts)
        info = self._info(rank, _OP_DISPATCH, x_TH.shape[1], num_experts, topk_idx_TK.shape[1],
                          extra=call_extra(0, topk_weights_TK, expert_major), dtype=x_TH.dtype)  # fmt: skip
        args = DispatchArgs(info, x_TH, x_scales_TS, topk_idx_TK, topk_weights_TK, per_rank, per_expert, in_rank,
                            None, num_experts, alignment, num_worst_tokens, self._config(config),
                            expert_major=expert_major)  # fmt: skip
        return backend.dispatch(args)

    def cached_dispatch(self, rank: int, x_TH, handle: DispatchHandle, *, expert_major: bool = False,
                        x_scales_TS=None, config: Config | None = None):  # fmt: skip
        info = self._info(rank, _OP_CACHED, handle.hidden, handle.num_experts, 0,
                          extra=call_extra(handle.dispatch_seq, None, expert_major), dtype=x_TH.dtype)  # fmt: skip
        args = DispatchArgs(info, x_TH, x_scales_TS, None, None, None, None, None, handle, handle.num_experts,
                            handle.expert_alignment, 0, self._config(config), expert_major=expert_major)  # fmt: skip
        return self.backends[rank].dispatch(args)

    def combine(self, rank: int, x, handle: DispatchHandle, topk_weights_NK=None, bias=(), *,
                expert_major: bool = False, config: Config | None = None):  # fmt: skip
        """Combine on the kernels; ``expert_major``: x is ``[P, H]`` and the kernel sums the pairs."""
        num_topk = 0 if topk_weights_NK is None else topk_weights_NK.shape[1]
        extra = call_extra(handle.dispatch_seq, topk_weights_NK, expert_major)
        info = self._info(rank, _OP_COMBINE, x.shape[1], handle.num_experts, num_topk, extra=extra, dtype=x.dtype)
        args = CombineArgs(info, x, handle, topk_weights_NK, tuple(bias), self._config(config),
                           expert_major=expert_major)  # fmt: skip
        return self.backends[rank].combine(args)

    def low_latency_dispatch(self, rank: int, x_TH, topk_idx_TK, topk_weights_TK, num_max_tokens: int,
                             num_experts: int, *, use_fp8: bool = False, round_scale: bool = False,
                             stats_L=None, return_recv_hook: bool = False) -> LowLatencyDispatchResult:  # fmt: skip
        """``Buffer.low_latency_dispatch`` on the kernels (needs ``low_latency_bytes``); ``stats_L``:
        ``cumulative_local_expert_recv_stats``."""
        extra = low_latency_extra(num_max_tokens, use_fp8, weights=topk_weights_TK is not None)
        info = self._info(rank, _OP_LL_DISPATCH, x_TH.shape[1], num_experts, topk_idx_TK.shape[1], extra=extra)
        args = LowLatencyDispatchArgs(info, x_TH, topk_idx_TK, topk_weights_TK, num_max_tokens, num_experts, use_fp8,
                                      round_scale, stats_L, return_recv_hook)  # fmt: skip
        return self.backends[rank].low_latency_dispatch(args)

    def low_latency_combine(self, rank: int, x_LSH, topk_idx_TK, topk_weights_TK, handle: LowLatencyHandle, *,
                            out_TH=None, return_recv_hook: bool = False,
                            sum_per_rank: bool = False) -> LowLatencyCombineResult:  # fmt: skip
        """``Buffer.low_latency_combine`` on the kernels (``out_TH``: its ``out``; ``sum_per_rank``
        weights with the dispatch's slot weights, unchecked here)."""
        M = handle.num_max_dispatch_tokens_per_rank
        extra = low_latency_extra(M, sum_per_rank, sum_per_rank and topk_weights_TK is None)
        info = self._info(rank, _OP_LL_COMBINE, x_LSH.shape[-1], handle.num_experts, topk_idx_TK.shape[1], extra=extra)
        args = LowLatencyCombineArgs(info, x_LSH, topk_idx_TK, topk_weights_TK, handle, out_TH, return_recv_hook,
                                     sum_per_rank)  # fmt: skip
        return self.backends[rank].low_latency_combine(args)

    def destroy(self) -> None:
        torch.cuda.synchronize()
        for backend in self.backends:
            backend.destroy()
