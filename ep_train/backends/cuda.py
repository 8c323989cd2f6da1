"""``cuda`` backend: our NVLink kernels for ranks on one node (2, 4 or 8 GPUs).

Each rank allocates one NVLink buffer, exchanges CUDA IPC handles over the process group and maps
every peer's buffer; the kernels then write straight into peers' memory.  Normal dispatch runs
``notify`` (count exchange + barrier, one host sync for the receive count unless
``num_worst_tokens > 0``) and the ring kernel; cached dispatch and combine run ``prepare``
(row ranges + barrier) and the ring kernel, with no host sync.  Kernel failures (a wait past
``timeout_s``, ranks that disagree on a call, ``num_worst_tokens`` too small) are written to a
pinned mailbox and raised here: after a host sync, and at the start of every later call.

Low-latency dispatch/combine use a second buffer of ``num_rdma_bytes`` (created when
``low_latency_mode`` or ``num_rdma_bytes > 0``): NVSHMEM symmetric memory where every rank can use
it, else CUDA IPC (``EP_TRAIN_LL_TRANSPORT``, see ``ep_train.nvshmem``).  One kernel launch per
call, or two with ``return_recv_hook`` (the call sends, the hook receives); no host sync, so both
are capturable in a CUDA graph.  Senders write rows straight into the receiver's slots and each of
their blocks then counts itself arrived there; the receiver waits for all of them and compares
every sender's call header (mismatch → RankMismatchError).

Shape legend: T local tokens, H hidden, S ``ceil(H/128)`` FP8 scales, K top-k, R ranks,
E experts, L = E/R local experts, N received rows, C channels (``num_sms / 2``).
"""

from __future__ import annotations

import datetime
import socket
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import _env, _ext, nvshmem
from ..config import Config
from ..errors import CommError, CommTimeoutError, RankMismatchError
from ..handle import DispatchHandle, LowLatencyHandle
from ..layout import FP8_BLOCK, MAX_EXPERTS, MAX_RANKS
from .base import (
    Backend,
    CallInfo,
    CombineArgs,
    CombineResult,
    DispatchArgs,
    DispatchResult,
    LowLatencyCombineArgs,
    LowLatencyCombineResult,
    LowLatencyDispatchArgs,
    LowLatencyDispatchResult,
    describe_extra,
)
from .torch_backend import OP_NAMES

__all__ = ["CudaBackend", "GroupNotServed", "group_problem"]

# Error codes and wait sites of csrc/include/ep_train/types.cuh (ErrorCode, WaitSite).
_ERR_HOST_TIMEOUT, _ERR_TIMEOUT, _ERR_MISMATCH, _ERR_CAPACITY, _ERR_BAD_EXPERT = -1, 1, 2, 3, 4
_WAIT_SITES = {
    1: "the start barrier",
    2: "dispatch: free ring slots at the destination",
    3: "dispatch: rows from the source",
    4: "combine: free ring slots at the destination",
    5: "combine: rows from the source",
    8: "low-latency send: the receiver still reads this buffer half (more than two calls in flight?)",
    9: "low_latency_dispatch: rows from the source",
    10: "low_latency_combine: rows from the expert rank",
}
_HEADER_FIELDS = ("op", "call number", "hidden", "num_experts", "num_topk", "dtype", "extra",
                  "config (channels, ring, chunk)")  # fmt: skip
SUPPORTED_RANKS = (2, 4, 8)
_LL_SEND, _LL_RECV, _LL_BOTH = 1, 2, 3  # LowLatencyPhase of csrc/low_latency_runtime.hpp
_LL_MAX_HIDDEN = 16384  # the low-latency kernels' limit (bindings.cpp checks it too)


def node_id() -> str:
    """This machine's identity: its boot id (the same in every container on it, different on every
    other machine), else its host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


# Buffers created so far per group (its global ranks): every rank creates them in the same order,
# so the count names a creation alike on all of them.
_CREATED: Counter = Counter()


def _default_store():
    """The default process group's store (None: a group set up another way)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _meet(store, prefix: str, rank: int, num_ranks: int, timeout_s: float) -> list[int]:
    """Mark ``rank`` arrived at ``prefix`` and wait, at most ``timeout_s``, for the others: → the
    ranks that did not arrive (empty: all did)."""
    store.set(f"{prefix}/{rank}", b"1")  # raises if the store is gone (the rank hosting it exited)
    keys = [f"{prefix}/{r}" for r in range(num_ranks)]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except Exception:  # the store's timeout error type differs between torch versions
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        if not missing:
            raise
        return missing
    return []


def wait_for_group(group: dist.ProcessGroup, rank: int, timeout_s: float) -> str | None:
    """Return once every rank of ``group`` has started creating this Buffer; a rank that does not
    within ``timeout_s`` raises CommTimeoutError naming the ranks missing (the creation's
    collectives would otherwise wait for the process group's timeout).  Through the default
    store: without one (a group set up another way) there is nothing to check here (None).

    Returns the creation's key, the same on every rank (creations count per group, in order)."""
    store = _default_store()
    if store is None:
        return None
    ranks = tuple(dist.get_process_group_ranks(group))
    _CREATED[ranks] += 1
    count = _CREATED[ranks]
    base = f"ep_train/buffer/{'-'.join(map(str, ranks))}"
    store.set(f"{base}/started/{rank}", str(count).encode())
    missing = _meet(store, f"{base}/{count}", rank, len(ranks), timeout_s)
    if missing:
        raise CommTimeoutError(
            f"rank {rank}: ranks {missing} of the group did not create their Buffer within timeout_s="
            f"{timeout_s:g} s (every rank creates the group's Buffers, in the same order); "
            + _creations_started(store, base, missing, count)
        )
    return f"{base}/{count}"


def _creations_started(store, base: str, missing: list[int], count: int) -> str:
    """How many Buffers of the group each missing rank has started to create, beside this rank's
    count: a rank behind is late or stuck; counts that differ for good mean a creation failed on
    some ranks only (or the ranks' code creates different Buffers), and such ranks never meet."""
    started = [f"this rank {count}"]
    for r in missing:
        key = f"{base}/started/{r}"
        try:
            started.append(f"rank {r}: {int(store.get(key)) if store.check([key]) else 0}")
        except Exception:  # the store is gone or the value unreadable: say nothing of that rank
            continue
    return "Buffers of this group started so far: " + ", ".join(started)


def wait_to_free(key: str | None, rank: int, num_ranks: int, timeout_s: float) -> list[int]:
    """Before a Buffer's peer-mapped memory is freed: wait, at most ``timeout_s``, until every rank
    of the group that created it under ``key`` has finished its kernels on it (they write into
    each other's memory up to their last acknowledgement).  → the ranks that did not come."""
    store = _default_store()
    if key is None or store is None:
        return []
    try:
        return _meet(store, f"{key}/free", rank, num_ranks, timeout_s)
    except Exception:  # the store is gone (its host exited): no rank can be waited for
        return [r for r in range(num_ranks) if r != rank]


class GroupNotServed(ValueError):
    """The cuda backend cannot serve this group (its ranks' nodes and count, or this build), every
    rank alike (the decision rests on one gather); ``backend="auto"`` then takes the torch backend."""


def group_problem(hosts: list[str], num_nvl_bytes: int, use_ll: bool, want: str, rma: bool,
                  device_lib: bool) -> str | None:  # fmt: skip
    """Why a cuda Buffer cannot serve a group whose ranks run on ``hosts`` (node ids) with these
    settings, or None.  Every rank must pass the same values (the largest ``num_nvl_bytes``, and
    ``device_lib`` only when every rank's build has NVSHMEM's device library).

    One node: the NVLink buffer (2, 4 or 8 ranks).  Several nodes: low-latency calls only, on
    NVSHMEM memory, with the ranks of other nodes reached by NVSHMEM device puts (a build with
    ``EP_TRAIN_NVSHMEM_DEVICE=1``); at most MAX_RANKS ranks (the kernels' rank masks).
    ``want``/``rma``: ``EP_TRAIN_LL_TRANSPORT`` / ``EP_TRAIN_LL_RMA``.
    """
    R, nodes = len(hosts), len(set(hosts))
    device_lib_hint = "ep_train._C built with NVSHMEM's device library (EP_TRAIN_NVSHMEM_DEVICE=1 at build time)"
    if nodes == 1:
        if R not in SUPPORTED_RANKS:
            return f"backend='cuda' supports {SUPPORTED_RANKS} ranks on one node, got {R}"
        if use_ll and rma and (want == "ipc" or not device_lib):
            return (f"EP_TRAIN_LL_RMA=1 needs NVSHMEM memory (EP_TRAIN_LL_TRANSPORT auto or nvshmem, got {want}) "
                    f"and {device_lib_hint} on every rank ({'built' if device_lib else 'missing'})")  # fmt: skip
        return None
    where = f"this group's {R} ranks run on {nodes} nodes"
    if num_nvl_bytes > 0 or not use_ll:
        return (f"normal dispatch/combine need every rank on one node, and {where}: a group across nodes serves "
                f"low-latency calls only (num_nvl_bytes=0 and low_latency_mode=True; got num_nvl_bytes="
                f"{num_nvl_bytes} and {'a' if use_ll else 'no'} low-latency buffer)")  # fmt: skip
    if R > MAX_RANKS:
        return f"the low-latency kernels take at most {MAX_RANKS} ranks per group, and {where}"
    if want == "ipc":
        return f"{where}: the low-latency buffer must be NVSHMEM memory, but EP_TRAIN_LL_TRANSPORT=ipc"
    if not device_lib:
        return f"{where}: reaching the other nodes' ranks needs {device_lib_hint}"
    return None


class CudaBackend(Backend):
    name = "cuda"
    supported_dtypes = (torch.bfloat16,)

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        num_ranks: int,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        low_latency_mode: bool,
        timeout_s: float,
        key: str | None,
    ):
        """``key``: the creation's key from :func:`wait_for_group`, which every rank has passed
        (None: made without the presence check; ``destroy`` then frees without waiting)."""
        self._C = _ext.load()
        self.group, self.rank, self.num_ranks, self.timeout_s = group, rank, num_ranks, float(timeout_s)
        self._rt = self._ll = self._ll_block = None
        self.low_latency_transport: str | None = None
        use_ll = bool(low_latency_mode) or num_rdma_bytes > 0
        want, rma = _env.low_latency_transport(), _env.low_latency_rma()
        self._key = key
        # One gather that every rank's decision below rests on, so all of them decide alike.
        views: list[tuple | None] = [None] * num_ranks
        ll_info = (int(num_rdma_bytes), want, rma) if use_ll else None
        mine = (node_id(), ll_info, int(num_nvl_bytes), bool(self._C.NVSHMEM_DEVICE))
        dist.all_gather_object(views, mine, group=group)
        infos = [v[1] for v in views]
        if len(set(infos)) != 1:
            raise ValueError(
                "every rank must create its Buffer with the same num_rdma_bytes and low_latency_mode (and the same "
                f"EP_TRAIN_LL_TRANSPORT and EP_TRAIN_LL_RMA), got {infos} (None: no low-latency buffer)"
            )
        sizes = [v[2] for v in views]
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must create its Buffer with the same num_nvl_bytes, got {sizes} (rank order)")
        hosts = [v[0] for v in views]
        nvl, device_lib = sizes[0], all(v[3] for v in views)
        problem = group_problem(hosts, nvl, use_ll, want, rma, device_lib)
        if problem is not None:
            # What the user asked for by name (EP_TRAIN_LL_RMA=1, EP_TRAIN_LL_TRANSPORT=ipc) is
            # theirs to change: refused even under "auto".  The group's shape and the build are not.
            if len(set(hosts)) == 1:
                asked = num_ranks in SUPPORTED_RANKS and use_ll and rma
            else:
                asked = nvl == 0 and use_ll and num_ranks <= MAX_RANKS and want == "ipc"
            raise (ValueError if asked else GroupNotServed)(problem)
        self.num_nodes = len(set(hosts))
        if self.num_nodes == 1:  # else low-latency calls only: no NVLink buffer
            self._rt = self._open_ipc(
                "NVLink buffer", lambda: self._C.IntranodeRuntime(rank, num_ranks, int(num_nvl_bytes), self.timeout_s)
            )
        if use_ll:
            self._open_low_latency(int(num_rdma_bytes), want, rma)
        dist.barrier(group=group)  # every rank mapped every buffer before any kernel writes into it

    @property
    def serves_normal_calls(self) -> bool:
        return self._rt is not None

    def _open_low_latency(self, num_rdma_bytes: int, want: str, rma: bool) -> None:
        """The low-latency buffer (collective): NVSHMEM symmetric memory, else CUDA IPC (see ep_train.nvshmem)."""
        num_bytes = max(num_rdma_bytes, self._C.low_latency_control_bytes())
        why_not = "EP_TRAIN_LL_TRANSPORT=ipc"
        if want != "ipc":
            heap = nvshmem.heap_for(self.group)
            why_not = heap if isinstance(heap, str) else self._open_nvshmem(heap, num_bytes, rma)
            if why_not is None:
                return
        if want == "nvshmem" or rma or self.num_nodes > 1:
            raise RuntimeError(f"EP_TRAIN_LL_TRANSPORT={want}, EP_TRAIN_LL_RMA={int(rma)}, "
                               f"{self.num_nodes} node(s): NVSHMEM is needed but unavailable: {why_not}")  # fmt: skip
        if want == "auto" and self.rank == 0 and not _env.quiet_import():
            print(f"ep_train: low-latency buffer over CUDA IPC (NVSHMEM unavailable: {why_not})", file=sys.stderr)
        rank, num_ranks, timeout_s = self.rank, self.num_ranks, self.timeout_s
        self._ll = self._open_ipc(
            "low-latency buffer", lambda: self._C.LowLatencyRuntime(rank, num_ranks, num_bytes, timeout_s)
        )
        self.low_latency_transport = "ipc"

    def _open_ipc(self, what: str, make: Callable[[], Any]):
        """A runtime from ``make`` with every rank's CUDA IPC memory mapped (collective).  A rank that
        fails (out of memory, a handle it cannot open) tells the others, and every rank raises:
        none is left waiting in a collective its peer never joins."""
        runtime, handle, failure = None, None, None
        try:
            runtime = make()
            handle = runtime.ipc_handle()
        except (RuntimeError, ValueError) as exc:
            failure = str(exc)
        views: list[tuple | None] = [None] * self.num_ranks
        dist.all_gather_object(views, (handle, failure), group=self.group)
        failed = nvshmem.name_failures(self.group, [v[1] for v in views])
        if not failed:
            try:
                runtime.open_peers([v[0] for v in views])
            except (RuntimeError, ValueError) as exc:
                failure = str(exc)
            failed = nvshmem.gather_failures(self.group, failure)
        if failed:
            if runtime is not None:
                runtime.destroy()
            raise RuntimeError(f"rank {self.rank}: the {what} could not be set up: {failed}")
        return runtime

    def _open_nvshmem(self, heap: nvshmem.SymmetricHeap, num_bytes: int, rma: bool) -> str | None:
        """The low-latency buffer in a block of ``heap`` (collective); None, or why not on some rank."""
        try:
            block, failure = heap.alloc(self.group, num_bytes), None
        except RuntimeError as exc:  # e.g. the symmetric heap is too small (NVSHMEM_SYMMETRIC_SIZE)
            block, failure = None, str(exc)
        failed = nvshmem.gather_failures(self.group, failure)
        if failed is not None:
            if block is not None:
                heap.release(block)
            return failed
        # Ranks without a load/store mapping (other nodes) are reached by NVSHMEM puts; every rank by
        # them with EP_TRAIN_LL_RMA=1.
        unmapped = [r for r, p in enumerate(block.peer_ptrs) if p == 0]
        failure = None
        if unmapped and not self._C.NVSHMEM_DEVICE:
            failure = (f"ranks {unmapped} have no load/store mapping (other nodes), and reaching them needs "
                       "ep_train._C built with EP_TRAIN_NVSHMEM_DEVICE=1")  # fmt: skip
        mask = (1 << self.num_ranks) - 1 if rma else sum(1 << r for r in unmapped)
        ll = None
        if failure is None:
            try:
                ll = self._C.LowLatencyRuntime(self.rank, self.num_ranks, num_bytes, self.timeout_s, block.ptr)
                ll.set_peer_pointers(block.peer_ptrs, allow_unmapped=bool(unmapped))
                if mask:
                    ll.set_rma(mask, self._C.LOW_LATENCY_RMA_NVSHMEM)
            except (RuntimeError, ValueError) as exc:
                failure = str(exc)
        # Every rank learns whether any failed (all raise together), and whether any reaches a rank
        # by puts (then every rank checks its calls against the size with send areas).
        views: list[tuple[str | None, bool] | None] = [None] * self.num_ranks
        dist.all_gather_object(views, (failure, bool(mask)), group=self.group)
        failed = [f"rank {r}: {v[0]}" for r, v in enumerate(views) if v[0] is not None]
        if failed:
            if ll is not None:
                ll.destroy()
            heap.release(block)
            raise RuntimeError("low-latency buffer: " + "; ".join(failed))
        self._ll, self._ll_block = ll, block
        self.low_latency_rma = any(v[1] for v in views)
        self.low_latency_transport = "nvshmem"
        return None

    # ------------------------------------------------------------------ failures
    def _raise_if_failed(self, code: int | None = None) -> None:
        """Raise what a normal kernel reported (``code``: what the host sync returned, if any)."""
        if self._rt is None:  # no NVLink buffer (a group across nodes): no normal kernel ran
            return
        code = self._rt.error_code() if code is None else code
        if code == _ERR_HOST_TIMEOUT:
            raise CommTimeoutError(
                f"rank {self.rank}: the host waited more than {self.timeout_s:g} s for the receive counts of "
                "dispatch (notify did not finish: a rank skipped this call, called another op, or died)"
            )
        if code != 0:
            self._raise_reported(self._rt, low_latency=False)

    def raise_failures(self) -> None:
        """Wait for the device, then raise what a kernel reported (it would raise at the next call)."""
        torch.cuda.synchronize()
        self._raise_if_ll_failed()

    def _raise_if_ll_failed(self) -> None:
        """Raise what a low-latency kernel reported (then anything the normal kernels reported)."""
        if self._ll is not None and self._ll.error_code() != 0:
            self._raise_reported(self._ll, low_latency=True)
        self._raise_if_failed()

    def _raise_reported(self, runtime, low_latency: bool) -> None:
        """The first failure a runtime's kernels wrote to its mailbox, as an exception."""
        code, rank, what, channel, peer, expected, seen = runtime.error_fields()
        if code == _ERR_MISMATCH:
            field = _HEADER_FIELDS[channel] if 0 <= channel < len(_HEADER_FIELDS) else f"field {channel}"
            ours, theirs = expected, seen
            if channel == 0:
                ours, theirs = OP_NAMES.get(ours, ours), OP_NAMES.get(theirs, theirs)
            elif channel == 6:  # base.call_extra / base.low_latency_extra
                field, ours, theirs = describe_extra(None, low_latency, ours, theirs)
            elif low_latency and channel == len(_HEADER_FIELDS):  # the grid word after the header
                field = "the low-latency kernels' grid size (SMs; every rank must run the same)"
            call = "a low-latency call" if low_latency else "a call"
            raise RankMismatchError(
                f"rank {rank}: ranks disagree on {call}: {field} is {ours} on rank {rank} but {theirs} on rank {peer}"
            )
        if code == _ERR_TIMEOUT:
            where = _WAIT_SITES.get(what, "a peer") + ("" if channel < 0 else f" (channel {channel})")
            raise CommTimeoutError(
                f"rank {rank}: timed out after {self.timeout_s:g} s waiting for rank {peer} in {where}: expected "
                f"counter >= {expected}, saw {seen} (a rank skipped this call, called another op, or died)"
            )
        if code == _ERR_CAPACITY and low_latency:
            raise CommError(
                f"rank {rank}: more than num_max_dispatch_tokens_per_rank={expected} rows from rank {peer} for "
                f"expert {channel} (does a token list the same expert twice?)"
            )
        if code == _ERR_CAPACITY:
            raise CommError(
                f"rank {rank}: num_worst_tokens={expected} is smaller than the {seen} rows rank {peer} receives; "
                "raise it (tokens are never dropped)"
            )
        if code == _ERR_BAD_EXPERT:
            raise CommError(
                f"rank {rank}: topk_idx[{channel}, {peer}] is {seen}: expert ids must be -1 or in "
                f"[0, num_experts={expected}); the outputs of the call that read it are not to be used"
            )
        raise CommError(f"rank {rank}: {'low-latency ' if low_latency else ''}kernel error code {code}")

    def _channels(self, config: Config) -> int:
        channels = config.num_sms // 2
        if channels > self._C.MAX_CHANNELS:
            raise ValueError(f"backend='cuda' takes num_sms <= {2 * self._C.MAX_CHANNELS}, got {config.num_sms}")
        # Every block of a call waits for its peers' blocks: all must be resident at once.
        device_sms = _ext.device_sms()
        if config.num_sms > device_sms:
            raise ValueError(f"num_sms={config.num_sms} exceeds the {device_sms} SMs of this GPU (every block of a "
                             "dispatch/combine must be resident at once)")  # fmt: skip
        return channels

    @staticmethod
    def _header(info: CallInfo, config: Config) -> list[int]:
        """The 8 words every rank compares at the start barrier (CallInfo + the ring config)."""
        cfg = (config.num_sms // 2) << 48 | config.num_max_nvl_chunked_recv_tokens << 24
        return info.as_list() + [cfg | config.num_max_nvl_chunked_send_tokens]

    def _prepare(self, handle: DispatchHandle, info: CallInfo, config: Config) -> torch.Tensor:
        """Row ranges of ``recv_x`` per (source rank, channel) for this call's channels, + barrier."""
        num_tokens_R = handle.extras.get("num_tokens_R")
        if num_tokens_R is None:
            raise ValueError("this handle was not made by the cuda backend (create it with the same Buffer)")
        channels = self._channels(config)
        chan_start = torch.empty((self.num_ranks, channels + 1), dtype=torch.int32, device=handle.send_pos_TR.device)
        self._C.prepare(self._rt, handle.recv_src_idx_N, handle.rank_prefix_matrix_RR, num_tokens_R, channels,
                        self._header(info, config), chan_start)  # fmt: skip
        return chan_start

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx_TK: torch.Tensor, num_experts: int):
        self._raise_if_failed()
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"backend='cuda' takes num_experts <= {MAX_EXPERTS}, got {num_experts}")
        T, dev = topk_idx_TK.shape[0], topk_idx_TK.device
        per_rank_R = torch.empty(self.num_ranks, dtype=torch.int32, device=dev)
        per_expert_E = torch.empty(num_experts, dtype=torch.int32, device=dev)
        in_rank_TR = torch.empty((T, self.num_ranks), dtype=torch.bool, device=dev)
        # An id out of range is reported to a runtime's mailbox (raised by this rank's next call, or
        # by this dispatch's wait for its receive counts), never skipped in silence.
        runtime = self._rt if self._rt is not None else self._ll
        self._C.get_dispatch_layout(topk_idx_TK, num_experts, self.num_ranks, per_rank_R, per_expert_E, in_rank_TR,
                                    runtime)  # fmt: skip
        return per_rank_R, per_expert_E, in_rank_TR

    # ------------------------------------------------------------------ dispatch
    def fuses_expert_major(self, x_TH: torch.Tensor, num_experts: int, num_topk: int) -> bool:
        # 16-byte rows for the fan-out copy; the senders' per-expert ranks come from the pair kernels.
        row_bytes = x_TH.shape[1] * x_TH.element_size()
        return row_bytes % 16 == 0 and 1 <= num_experts <= self._C.PAIR_LAYOUT_MAX_LOCAL_EXPERTS

    def dispatch(self, args: DispatchArgs) -> DispatchResult:
        self._raise_if_failed()
        if args.handle is not None:
            return self._cached_dispatch(args)
        cfg, x_TH = args.config, args.x_TH
        R, me, E = self.num_ranks, self.rank, args.num_experts
        L, C, (T, H), dev = E // R, self._channels(cfg), x_TH.shape, x_TH.device
        i32 = dict(dtype=torch.int32, device=dev)
        rank_prefix_RR = torch.empty((R, R), **i32)
        chan_start = torch.empty((R, C + 1), **i32)
        send_chan_base = torch.empty((R, C), **i32)
        num_tokens_R = torch.empty(R, **i32)
        per_expert_L = torch.empty(L, **i32)
        num_recv_t = torch.empty((), **i32)
        worst = args.num_worst_tokens
        pairs = args.expert_major
        pair_base_RL = torch.empty((R, L), **i32) if pairs else None
        self._C.notify(self._rt, args.is_token_in_rank_TR, args.num_tokens_per_expert_E, E, C, args.expert_alignment,
                       worst, worst == 0, self._header(args.info, cfg), rank_prefix_RR, chan_start, send_chan_base,
                       num_tokens_R, per_expert_L, num_recv_t, pair_base_RL)  # fmt: skip
        # The senders' half of the expert-major places: every (token, k)'s rank among this rank's
        # tokens of its expert (queued behind notify: it runs while the host reads the counts).
        expert_rank_TK = self._C.expert_ranks(args.topk_idx_TK, E) if pairs else None
        send_pos_TR = torch.full((T, R), -1, **i32)  # sized without the counts: made while notify runs
        if worst == 0:
            # The one host sync of the normal path (bounded; the device bound reports first).
            code, num_recv, per_expert_list = self._rt.wait_recv(self.timeout_s * 1.5 + 1.0, L)
            self._raise_if_failed(code)
            rows = num_recv
        else:
            num_recv, rows, per_expert_list = -1, worst, []
        K = 0 if args.topk_idx_TK is None else args.topk_idx_TK.shape[1]
        num_pair_rows = sum(per_expert_list) if pairs else 0
        recv_x, recv_scales = self._recv_rows(args, num_pair_rows if pairs else rows)
        pair_pos_NK = torch.empty((rows, K), dtype=torch.int64, device=dev) if pairs else None
        pair_probs_P = None
        if pairs and args.topk_weights_TK is not None:
            pair_probs_P = self._pair_buffer(args.expert_alignment)((num_pair_rows,), dtype=torch.float32, device=dev)
        recv_topk_idx = recv_topk_weights = None
        pad = worst > 0
        if K:
            if pad:  # padding rows: no expert, weight 0
                recv_topk_idx = torch.full((rows, K), -1, dtype=torch.int64, device=dev)
            else:
                recv_topk_idx = torch.empty((rows, K), dtype=torch.int64, device=dev)
            if args.topk_weights_TK is not None and not pairs:  # expert-major: the weights go to pair_probs_P
                recv_topk_weights = (torch.zeros if pad else torch.empty)((rows, K), dtype=torch.float32, device=dev)
        recv_src_idx_N = torch.full((rows,), -1, **i32) if pad else torch.empty(rows, **i32)
        self._C.dispatch(self._rt, x_TH, args.x_scales_TS, args.topk_idx_TK, args.topk_weights_TK,
                         args.is_token_in_rank_TR, recv_x, recv_scales, recv_topk_idx, recv_topk_weights,
                         recv_src_idx_N, send_pos_TR, send_chan_base, chan_start, L, cfg.num_sms,
                         cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens, pair_pos_NK,
                         expert_rank_TK, pair_base_RL, pair_probs_P, num_pair_rows)  # fmt: skip
        handle = DispatchHandle(
            rank=me,
            num_ranks=R,
            num_experts=E,
            num_tokens=T,
            hidden=H,
            num_recv_tokens=num_recv,
            num_recv_rows=rows,
            is_token_in_rank_TR=args.is_token_in_rank_TR,
            send_pos_TR=send_pos_TR,
            rank_prefix_matrix_RR=rank_prefix_RR,
            recv_src_idx_N=recv_src_idx_N,
            num_recv_tokens_per_expert_L=per_expert_L,
            expert_alignment=args.expert_alignment,
            dispatch_seq=args.info.seq,
            extras={"num_tokens_R": num_tokens_R, "num_recv_tokens_t": num_recv_t, "per_expert_list": per_expert_list},
            pair_pos_NK=pair_pos_NK,
            num_pair_rows=num_pair_rows,
        )
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, list(per_expert_list), handle,
                              pair_probs_P)  # fmt: skip

    @staticmethod
    def _pair_buffer(alignment: int):
        """Allocator of expert-major outputs: every row is written unless alignment pads some (then zeros)."""
        return torch.zeros if alignment > 1 else torch.empty

    def _recv_rows(self, args: DispatchArgs, rows: int):
        """``(recv_x, recv_scales or None)`` with ``rows`` rows (zeroed where expert-major padding may stay)."""
        x_TH, dev = args.x_TH, args.x_TH.device
        alloc = self._pair_buffer(args.expert_alignment) if args.expert_major else torch.empty
        recv_x = alloc((rows, x_TH.shape[1]), dtype=x_TH.dtype, device=dev)
        recv_scales = None
        if args.x_scales_TS is not None:
            recv_scales = alloc((rows, args.x_scales_TS.shape[1]), dtype=torch.float32, device=dev)
        return recv_x, recv_scales

    def _cached_dispatch(self, args: DispatchArgs) -> DispatchResult:
        h, cfg, x_TH = args.handle, args.config, args.x_TH
        chan_start = self._prepare(h, args.info, cfg)
        pairs = args.expert_major
        recv_x, recv_scales = self._recv_rows(args, h.num_pair_rows if pairs else h.num_recv_rows)
        self._C.dispatch(self._rt, x_TH, args.x_scales_TS, None, None, h.is_token_in_rank_TR, recv_x, recv_scales,
                         None, None, None, None, None, chan_start, h.num_local_experts, cfg.num_sms,
                         cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens,
                         h.pair_pos_NK if pairs else None, None, None, None, h.num_pair_rows)  # fmt: skip
        per_expert_list = list(h.extras.get("per_expert_list", []))
        return DispatchResult(recv_x, recv_scales, None, None, per_expert_list, h)

    # ------------------------------------------------------------------ combine
    def fuses_expert_major_combine(self, x_PH: torch.Tensor) -> bool:
        return x_PH.dtype == torch.bfloat16 and x_PH.shape[1] % 8 == 0

    def combine(self, args: CombineArgs) -> CombineResult:
        self._raise_if_failed()
        h, cfg, x_NH = args.handle, args.config, args.x_NH
        if args.topk_weights_NK is not None and args.topk_weights_NK.dtype != torch.float32:
            raise TypeError(f"backend='cuda' combines float32 topk_weights, got {args.topk_weights_NK.dtype}")
        chan_start = self._prepare(h, args.info, cfg)
        dev = x_NH.device
        combined_TH = torch.empty((h.num_tokens, x_NH.shape[1]), dtype=x_NH.dtype, device=dev)
        combined_w = None
        if args.topk_weights_NK is not None:
            combined_w = torch.empty((h.num_tokens, args.topk_weights_NK.shape[1]), dtype=torch.float32, device=dev)
        bias = list(args.bias) + [None] * (2 - len(args.bias))
        pairs = args.expert_major
        self._C.combine(self._rt, x_NH, args.topk_weights_NK, bias[0], bias[1], h.is_token_in_rank_TR, chan_start,
                        combined_TH, combined_w, cfg.num_sms, cfg.num_max_nvl_chunked_send_tokens,
                        cfg.num_max_nvl_chunked_recv_tokens, h.pair_pos_NK if pairs else None,
                        h.num_pair_rows)  # fmt: skip
        return CombineResult(combined_TH, combined_w)

    # ------------------------------------------------------------------ low latency
    def _ll_runtime(self, hidden: int, num_experts: int, hidden_multiple: int):
        """The low-latency runtime, after the shape checks of the kernels (hidden_multiple: see bindings)."""
        if self._ll is None:
            raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True) and num_rdma_bytes > 0")
        if hidden % hidden_multiple or hidden > _LL_MAX_HIDDEN:
            raise ValueError(
                f"backend='cuda' takes a hidden size that is a multiple of {hidden_multiple} and <= {_LL_MAX_HIDDEN} "
                f"for this low-latency call, got {hidden}"
            )
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"backend='cuda' low-latency calls take num_experts <= {MAX_EXPERTS}, got {num_experts}")
        # NOTES: Buffer checked num_rdma_bytes against layout.low_latency_buffer_bytes, the mirror of
        # LowLatencyLayout that a GPU test compares with the kernels' own size.
        return self._ll

    def set_low_latency_trace(self, trace: torch.Tensor | None) -> None:
        """Diagnostics: the low-latency kernels write the global timer (ns) at their phase boundaries.

        Args:
            trace: int64 CUDA tensor ``[2, _C.LOW_LATENCY_TRACE_POINTS]`` (row 0 dispatch, row 1
                combine; points in csrc/low_latency_runtime.hpp), kept alive by the caller; None
                stops tracing.
        """
        if self._ll is None:
            raise ValueError("this Buffer has no low-latency buffer")
        if trace is not None:
            points = self._C.LOW_LATENCY_TRACE_POINTS
            if trace.dtype != torch.int64 or not trace.is_cuda or tuple(trace.shape) != (2, points):
                raise ValueError(f"trace must be an int64 CUDA tensor [2, {points}], got {trace.dtype} "
                                 f"{tuple(trace.shape)} on {trace.device}")  # fmt: skip
        self._ll.set_trace(0 if trace is None else trace.data_ptr())

    def _ll_hook(self, launch) -> Callable[[], None]:
        """The receive half of a call: waits (on the device) for the send, then launches on the current stream."""
        sent = torch.cuda.Event()
        sent.record()  # current stream = the comm stream the send ran on
        called = False

        def hook() -> None:
            # A second receive would read the half again and set the peers' acknowledgements back.
            nonlocal called
            if called:
                raise RuntimeError(f"rank {self.rank}: this low-latency call's receive hook was already called")
            called = True
            torch.cuda.current_stream().wait_event(sent)
            self._raise_if_ll_failed()
            launch(_LL_RECV)

        return hook

    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> LowLatencyDispatchResult:
        self._raise_if_ll_failed()
        x_TH, E, M = args.x_TH, args.num_experts, args.num_max_dispatch_tokens_per_rank
        R, (T, H), dev = self.num_ranks, x_TH.shape, x_TH.device
        L, S = E // R, (H + FP8_BLOCK - 1) // FP8_BLOCK
        ll = self._ll_runtime(H, E, FP8_BLOCK if args.use_fp8 else 8)
        if args.use_fp8:
            recv_x = torch.empty((L, R * M, H), dtype=torch.float8_e4m3fn, device=dev)
            recv_scales = torch.empty((L, R * M, S), dtype=torch.float32, device=dev)
        else:
            recv_x, recv_scales = torch.empty((L, R * M, H), dtype=x_TH.dtype, device=dev), None
        i32 = dict(dtype=torch.int32, device=dev)
        src_info_LS, topk_pos_LS = torch.empty((L, R * M), **i32), torch.empty((L, R * M), **i32)
        weights_LS = torch.empty((L, R * M), dtype=torch.float32, device=dev)
        range_LR = torch.empty((L, R), dtype=torch.int64, device=dev)
        count_L = torch.empty(L, **i32)
        slot_of = torch.empty((R * M, args.topk_idx_TK.shape[1]), **i32)  # for a combine with sums per rank
        call_seq = torch.empty(1, dtype=torch.int64, device=dev)
        header = args.info.as_list() + [0]

        def launch(phases: int) -> None:
            self._C.low_latency_dispatch(ll, x_TH, args.topk_idx_TK, args.topk_weights_TK, M, E, args.use_fp8,
                                         args.round_scale, recv_x, recv_scales, src_info_LS, topk_pos_LS, weights_LS,
                                         range_LR, count_L, args.cumulative_local_expert_recv_stats_L, slot_of,
                                         call_seq, header, phases)  # fmt: skip

        launch(_LL_SEND if args.return_recv_hook else _LL_BOTH)
        handle = LowLatencyHandle(
            rank=self.rank,
            num_ranks=R,
            num_experts=E,
            hidden=H,
            num_max_dispatch_tokens_per_rank=M,
            num_tokens=T,
            recv_src_info_LS=src_info_LS,
            recv_topk_pos_LS=topk_pos_LS,
            recv_topk_weights_LS=weights_LS,
            recv_layout_range_LR=range_LR,
            recv_count_L=count_L,
            topk_idx_TK=args.topk_idx_TK,
            buffer_half=-1,
            extras={"call_seq": call_seq, "slot_of": slot_of},
        )
        hook = self._ll_hook(launch) if args.return_recv_hook else None
        return LowLatencyDispatchResult(recv_x, recv_scales, count_L, handle, hook)

    def low_latency_combine(self, args: LowLatencyCombineArgs) -> LowLatencyCombineResult:
        self._raise_if_ll_failed()
        h, x_LSH = args.handle, args.x_LSH
        if "call_seq" not in h.extras:
            raise ValueError("this handle was not made by the cuda backend (create it with the same Buffer)")
        ll = self._ll_runtime(h.hidden, h.num_experts, 1)
        out = args.out_TH
        target = out if out is not None and out.is_contiguous() else None
        if target is None:
            target = torch.empty((h.num_tokens, h.hidden), dtype=x_LSH.dtype, device=x_LSH.device)
        call_seq = torch.empty(1, dtype=torch.int64, device=x_LSH.device)
        header = args.info.as_list() + [0]
        slot_of = h.extras["slot_of"] if args.sum_per_rank else None
        slot_weights = h.recv_topk_weights_LS if args.sum_per_rank and args.topk_weights_TK is not None else None

        def launch(phases: int) -> None:
            self._C.low_latency_combine(ll, x_LSH, h.recv_src_info_LS, h.recv_topk_pos_LS, h.recv_layout_range_LR,
                                        args.topk_idx_TK, args.topk_weights_TK, target,
                                        h.num_max_dispatch_tokens_per_rank, h.num_experts, slot_of, slot_weights,
                                        call_seq, header, phases)  # fmt: skip
            if out is not None and target is not out and phases & _LL_RECV:
                out.copy_(target)

        launch(_LL_SEND if args.return_recv_hook else _LL_BOTH)
        hook = self._ll_hook(launch) if args.return_recv_hook else None
        return LowLatencyCombineResult(out if out is not None else target, hook)

    def destroy(self) -> None:
        """Free the buffers, collectively: this rank's kernels finish, then the others' (bounded by
        ``timeout_s``: a rank that does not destroy its Buffer by then is named in a warning), and
        only then is memory that peers map freed or handed back to the NVSHMEM heap."""
        if self._rt is None and self._ll is None and self._ll_block is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        missing = wait_to_free(getattr(self, "_key", None), self.rank, self.num_ranks, self.timeout_s)
        if missing:
            warnings.warn(
                f"rank {self.rank}: ranks {missing} did not destroy their Buffer within timeout_s="
                f"{self.timeout_s:g} s (every rank destroys a group's Buffers in the same order); freeing "
                "this rank's memory without them (a kernel of theirs still running may fault)",
                stacklevel=3,
            )
        if self._rt is not None:
            self._rt.destroy()
            self._rt = None
        if self._ll is not None:
            self._ll.destroy()
            self._ll = None
        if self._ll_block is not None:
            nvshmem.SymmetricHeap.release(self._ll_block)
            self._ll_block = None
