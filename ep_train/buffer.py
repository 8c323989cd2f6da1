"""``Buffer``: the expert-parallel communication object (DeepEP V1 method set and return tuples).

A Buffer belongs to one process group (the expert-parallel group).  It validates every input,
owns a high-priority communication stream on CUDA, orders its work against the caller's stream
with events, and hands the actual exchange to a backend (``torch`` or ``cuda``).

Shape legend: T local tokens, H hidden, S ``ceil(H/128)`` FP8 scales, K top-k, R ranks,
E experts, L = E/R local experts (rank r owns experts [r*L, (r+1)*L)), N received rows,
M ``num_max_dispatch_tokens_per_rank``.  ``-1`` in a ``topk_idx`` means "no expert".
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import _env, layout
from .backends import create_backend
from .backends.base import (
    CallInfo,
    CombineArgs,
    DispatchArgs,
    LowLatencyCombineArgs,
    LowLatencyDispatchArgs,
    call_extra,
    low_latency_extra,
)
from .config import Config, get_combine_config, get_dispatch_config
from .errors import CommError
from .event import EventOverlap, capture
from .handle import DispatchHandle, LowLatencyHandle
from .permute import permute_dispatch_result, sum_pair_rows
from .validate import (
    check_bool,
    check_int,
    check_num_sms,
    check_tensor,
    check_topk_idx_values,
    split_bias,
    split_fp8,
)

__all__ = ["Buffer", "group_device", "topk_idx_t"]

#: dtype of every ``topk_idx`` tensor.
topk_idx_t = torch.int64

_DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.float64: 4, torch.float8_e4m3fn: 5}
_OP_DISPATCH, _OP_CACHED, _OP_COMBINE, _OP_LL_DISPATCH, _OP_LL_COMBINE = 1, 2, 3, 4, 5


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a process group moves tensors on: the current CUDA device for NCCL, or for a
    backend that carries CUDA tensors by another library (``"cpu:gloo,cuda:gloo"``: ranks sharing a
    GPU); else the CPU."""
    name = str(dist.get_backend(group)).lower()
    if "nccl" in name or "cuda:" in name:
        if not torch.cuda.is_available():
            raise ValueError(
                f"the process group's backend {name!r} moves CUDA tensors, but this process has no CUDA device"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class _Routing:
    """The routing arguments of one ``Buffer.dispatch`` call, as the caller passed them."""

    num_tokens_per_rank: torch.Tensor | None
    is_token_in_rank: torch.Tensor | None
    num_tokens_per_expert: torch.Tensor | None
    topk_idx: torch.Tensor | None
    topk_weights: torch.Tensor | None
    expert_alignment: int
    num_worst_tokens: int
    config: Config
    previous_event: EventOverlap | None = None
    expert_major: bool = False


_SCALARS = (int, float, str, type(None))


def _version(t: torch.Tensor) -> int | None:
    """The version counter (shared with views and ``detach()``), or None where torch tracks none
    (inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _is_view_of(t: torch.Tensor, base: torch.Tensor) -> bool:
    """``t`` and ``base`` are the same elements (a ``detach()`` of each other, say)."""
    return (t.data_ptr(), t.shape, t.stride(), t.dtype) == (base.data_ptr(), base.shape, base.stride(), base.dtype)


def _written_since(t: torch.Tensor, ref: tuple[torch.Tensor, int | None]) -> bool:
    """``t`` is ``ref``'s tensor (``(tensor, _version(tensor))``) and was written in place since."""
    base, version = ref
    now = _version(t)
    return _is_view_of(t, base) and None not in (version, now) and now != version


def _same_tensor(t: torch.Tensor, ref: tuple[torch.Tensor, int | None]) -> bool:
    """``t`` is (a ``detach()`` of) ``ref``'s tensor, not written in place since ``ref`` was taken
    (the tensor is kept alive in ``ref``, so its memory is not reused by another)."""
    return _is_view_of(t, ref[0]) and not _written_since(t, ref)


# Key of the owner token every handle carries in its extras (Buffer._check_handle), and of a
# low-latency handle's "rows received" flag when its dispatch returned a receive hook.
_OWNER = "buffer"
_RECEIVED = "received"


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors of a call's result, each once: in tensors, sequences, dicts and dataclasses (the
    backends' results and the handles in them, whose tensors later calls read).  NOTES: on every
    call's path, so scalars and lists of counts (the per-expert lists) are skipped at once; an
    explicit stack, not a recursive closure (a closure that calls itself is a reference cycle,
    which would keep every output alive until the cyclic garbage collector runs)."""
    found: dict[int, torch.Tensor] = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, _SCALARS):
            continue
        if isinstance(o, torch.Tensor):
            found.setdefault(id(o), o)
        elif isinstance(o, (tuple, list)):
            if not (isinstance(o, list) and o and isinstance(o[0], (int, float))):  # not a list of counts
                stack.extend(reversed(o))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            stack.extend(getattr(o, f.name) for f in reversed(dataclasses.fields(o)))
    return list(found.values())


class Buffer:
    """Communication buffer of one expert-parallel group.

    Creating one is collective over ``group``: every rank creates the group's Buffers, in the same
    order, and the ranks choose the backend together (bounded by ``timeout_s``).

    Args:
        group: the process group of the EP ranks (``None``: the default group).  Its backend decides
            the device: NCCL, or a backend that carries CUDA tensors (``"cpu:gloo,cuda:gloo"``) →
            the current CUDA device; gloo → CPU.
        num_nvl_bytes: bytes of the NVLink buffer for normal dispatch/combine; see
            ``Config.get_nvl_buffer_size_hint``.  Checked against every call, on every backend.
        num_rdma_bytes: bytes of the RDMA / low-latency buffer; see ``get_low_latency_rdma_size_hint``.
        low_latency_mode: the buffer serves ``low_latency_dispatch``/``low_latency_combine``.
        num_qps_per_rank: queue pairs per peer for internode transports (accepted for compatibility).
        backend: ``"auto"`` (CUDA kernels when built, the group is on CUDA and the kernels serve
            it: 2, 4 or 8 ranks on one node, or low-latency calls only across nodes; else torch),
            ``"torch"`` or ``"cuda"``.
        timeout_s: bound on any wait for peers (default ``EP_TRAIN_TIMEOUT_S`` or 100 s).  A rank that
            skips a call, calls another op or dies makes its peers raise ``CommTimeoutError``.
        num_sms: SMs of the default dispatch/combine configs (even), see :meth:`set_num_sms`.
        check_values: check ``topk_idx`` ranges on the host.  On CUDA this syncs the stream, so it is
            skipped on the sync-free paths (``num_worst_tokens > 0``, low-latency calls, graph capture).
            Without it the CUDA kernels that read ``topk_idx`` whole (``get_dispatch_layout``,
            ``low_latency_dispatch``) still report an id out of range: the dispatch's wait for its
            receive counts, the next call or :meth:`check` raises ``CommError`` naming the entry.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        *,
        backend: str = "auto",
        timeout_s: float | None = None,
        num_sms: int | None = None,
        check_values: bool = True,
    ):
        if not dist.is_initialized():
            raise RuntimeError("Buffer needs torch.distributed to be initialised (dist.init_process_group)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.num_nvl_bytes = check_int("num_nvl_bytes", num_nvl_bytes, 0)
        self.num_rdma_bytes = check_int("num_rdma_bytes", num_rdma_bytes, 0)
        self.low_latency_mode = check_bool("low_latency_mode", low_latency_mode)
        self.num_qps_per_rank = check_int("num_qps_per_rank", num_qps_per_rank, 1)
        if timeout_s is None:
            timeout_s = _env.default_timeout_s()
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.check_values = check_bool("check_values", check_values)
        self.device = group_device(self.group)
        self._dispatch_config = get_dispatch_config(self.group_size)
        self._combine_config = get_combine_config(self.group_size)
        if num_sms is not None:
            self.set_num_sms(num_sms)
        self._seq = 0
        self._failure: str | None = None
        # (weak reference, version, num_experts) of the last topk_idx whose values were checked.
        self._checked_topk: tuple | None = None
        #: optional :class:`ep_train.profiling.CommTimer` that times every communication call.
        self.timer = None
        self._comm_stream = None
        self._done_event: torch.cuda.Event | None = None  # the comm stream's end of a synchronous call
        self._owner = object()  # in the extras of every handle this Buffer makes (see _check_handle)
        if self.device.type == "cuda":
            self._comm_stream = torch.cuda.Stream(device=self.device, priority=-1)
        self._backend = create_backend(
            backend,
            self.group,
            self.rank,
            self.group_size,
            self.device,
            self.num_nvl_bytes,
            self.num_rdma_bytes,
            self.low_latency_mode,
            self.timeout_s,
        )

    # ------------------------------------------------------------------ properties and helpers
    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def low_latency_transport(self) -> str | None:
        """Memory of the low-latency buffer: ``"nvshmem"`` or ``"ipc"`` (cuda backend), else None."""
        return getattr(self._backend, "low_latency_transport", None)

    @property
    def low_latency_rma(self) -> bool:
        """Whether the low-latency kernels reach some rank by NVSHMEM puts (another node, or
        ``EP_TRAIN_LL_RMA=1``): ``num_rdma_bytes`` then needs ``rma_staging=True`` in its size hint."""
        return self._backend.low_latency_rma

    @property
    def _weight_dtypes(self) -> tuple[torch.dtype, ...]:
        """float32 gate weights; float64 too where the backend moves float64 rows (gradcheck)."""
        return (torch.float32, torch.float64) if torch.float64 in self.supported_dtypes else (torch.float32,)

    @property
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        """Dense dtypes ``dispatch``/``combine`` move (the CUDA kernels: BF16; torch: any float)."""
        return self._backend.supported_dtypes

    @property
    def num_sms(self) -> int:
        return self._dispatch_config.num_sms

    def set_num_sms(self, num_sms: int) -> None:
        """SMs used by this buffer's default dispatch/combine configs (even; affects no other buffer)."""
        check_num_sms("num_sms", num_sms)
        self._dispatch_config = dataclasses.replace(self._dispatch_config, num_sms=num_sms)
        self._combine_config = dataclasses.replace(self._combine_config, num_sms=num_sms)

    def get_comm_stream(self):
        """The CUDA stream this buffer's kernels run on (``None`` on CPU)."""
        return self._comm_stream

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return get_dispatch_config(num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return get_combine_config(num_ranks)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int, rma_staging: bool = False
    ) -> int:
        """Bytes of ``num_rdma_bytes`` the low-latency calls of this shape need; ``rma_staging``: also
        the send areas of ranks reached by NVSHMEM puts (``EP_TRAIN_LL_RMA=1``)."""
        return layout.low_latency_buffer_bytes(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts, rma_staging=rma_staging
        )

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream, to pass as ``previous_event``."""
        return capture()

    def destroy(self) -> None:
        """Free communication memory.  Every later call raises.

        Collective on the cuda backend: the ranks write into each other's memory, so a rank frees
        its own only once every rank of the group has come to ``destroy`` (every rank destroys a
        group's Buffers in the same order; bounded by ``timeout_s``, a rank that does not come is
        named in a warning).  A Buffer dropped without ``destroy`` is freed by the garbage
        collector, without that wait."""
        if self._backend is not None:
            self._backend.destroy()
            self._backend = None

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.destroy()

    def check(self) -> None:
        """Wait for this buffer's work and raise what any of its kernels reported.

        The CUDA kernels report a failure (a timeout, ranks that disagree) through a mailbox that
        the next call reads; their outputs are then not to be used.  Call ``check`` where a failed
        call's outputs must not be consumed (before an optimizer step or a checkpoint): it raises
        the ``CommError`` now, and the buffer is unusable afterwards as after any failure.  On the
        torch backend every failure is raised by its call, so ``check`` only refuses a failed buffer.
        """
        self._check_usable()
        try:
            self._backend.raise_failures()
        except CommError as exc:
            self._failure = str(exc)
            raise

    def _check_usable(self) -> None:
        if self._backend is None:
            raise RuntimeError("this Buffer was destroyed; create a new one")
        if self._failure is not None:
            raise CommError(f"this Buffer is unusable after an earlier failure: {self._failure}")

    def _next_info(self, op: int, hidden: int, num_experts: int, num_topk: int, dtype, extra: int = 0) -> CallInfo:
        info = CallInfo(op, self._seq, hidden, num_experts, num_topk, _DTYPE_CODES.get(dtype, 0), extra)
        self._seq += 1
        return info

    def _check_num_experts(self, num_experts: Any) -> int:
        check_int("num_experts", num_experts, 1)
        if num_experts % self.group_size != 0:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the group size {self.group_size} "
                "(every rank owns the same number of experts)"
            )
        return num_experts

    def _check_topk_idx(
        self,
        topk_idx: Any,
        num_experts: int,
        rows: int | None,
        sync_free: bool,
        previous_event: EventOverlap | None = None,
        values: bool = True,
    ) -> torch.Tensor:
        """Shape and dtype; on the syncing paths also the values unless ``values`` is False (after
        ``previous_event``: see NOTES)."""
        t = check_tensor("topk_idx", topk_idx, dtypes=topk_idx_t, ndim=2, device=self.device, shape=(rows, None))
        if not 1 <= t.shape[1] <= layout.MAX_TOPK:
            raise ValueError(f"topk_idx must have 1..{layout.MAX_TOPK} columns (top-k), got {t.shape[1]}")
        if values and self.check_values and not (sync_free and self.device.type == "cuda") and not self._capturing():
            # get_dispatch_layout and dispatch usually see the same tensor: check its values once.
            if not self._topk_values_checked(t, num_experts):
                # NOTES: with previous_event the caller says the inputs are ready at that event, not on
                # the current stream (often the comm stream itself, entered before the producer ran):
                # the check reads the values only once it has completed.  The check syncs the host
                # anyway, so waiting for the event first costs nothing extra.
                if previous_event is not None and previous_event.event is not None:
                    previous_event.event.synchronize()
                check_topk_idx_values("topk_idx", t, num_experts)
                version = _version(t)  # None in inference mode: nothing to remember the check by
                self._checked_topk = None if version is None else (weakref.ref(t), version, num_experts)
        return t

    def _topk_values_checked(self, t: torch.Tensor, num_experts: int) -> bool:
        """Whether these values of ``t`` passed the value check already (unchanged since)."""
        seen = self._checked_topk
        return seen is not None and seen[0]() is t and seen[1:] == (_version(t), num_experts)

    def _check_sum_per_rank_hidden(self, hidden: int) -> None:
        """The kernels' combine with sums per rank moves 8 channels per thread."""
        if self._backend.name == "cuda" and hidden % 8 != 0:
            raise ValueError(f"sum_per_rank=True needs hidden % 8 == 0 on CUDA, got hidden={hidden}")

    @staticmethod
    def _sum_per_rank_problem(topk_weights: torch.Tensor | None, handle: LowLatencyHandle) -> str | None:
        """Why ``topk_weights`` cannot weight a combine with sums per rank (they weight with the
        dispatch's slot weights: only the dispatch's tensor will do, or None for no weights)."""
        if topk_weights is None:
            return None
        if handle.topk_weights_ref is None:
            return (
                "sum_per_rank=True weights each row with the dispatch's topk_weights, but this handle's "
                "low_latency_dispatch was given none (pass topk_weights=None for the plain sum)"
            )
        if not _same_tensor(topk_weights, handle.topk_weights_ref):
            return (
                "sum_per_rank=True weights each row with the dispatch's topk_weights: topk_weights must be the "
                "tensor given to low_latency_dispatch, unchanged since (another tensor, or one written in place, "
                "was given)"
            )
        return None

    def _check_topk_weights(self, topk_weights: Any, shape: tuple[int | None, ...]) -> torch.Tensor:
        """Gate weights: float32 (float64 too where the backend moves it), 2-D, of ``shape``."""
        return check_tensor(
            "topk_weights", topk_weights, dtypes=self._weight_dtypes, ndim=2, device=self.device, shape=shape
        )

    @staticmethod
    def _check_previous_event(previous_event: Any) -> None:
        """Checked before anything else, so a bad argument never costs the ranks' call numbers."""
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}")

    def _capturing(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _check_nvl_bytes(self, hidden: int, elem_size: int, config: Config, what: str) -> None:
        if not self._backend.serves_normal_calls:
            raise ValueError(
                f"{what}: this Buffer's group spans nodes, so it serves low-latency calls only (normal "
                "dispatch/combine need every rank on one node)"
            )
        need = config.get_nvl_buffer_size_hint(hidden * max(elem_size, 2), self.group_size)
        if self.num_nvl_bytes < need:
            raise ValueError(
                f"num_nvl_bytes={self.num_nvl_bytes} is too small for {what} of hidden {hidden} on "
                f"{self.group_size} ranks with {config}: needs >= {need} "
                "(Config.get_nvl_buffer_size_hint)"
            )

    def _run(
        self,
        fn: Callable[[], Any],
        inputs: list[torch.Tensor],
        previous_event: EventOverlap | None,
        async_finish: bool,
        allocate_on_comm_stream: bool,
        name: str,
    ) -> tuple[Any, EventOverlap]:
        """Run ``fn`` on the comm stream after ``previous_event`` (or the current stream)."""
        if self.timer is not None:
            inner, timer = fn, self.timer

            def fn():
                token = timer.start(name, self._comm_stream)
                try:
                    return inner()
                finally:
                    timer.stop(token)

        try:
            if self._comm_stream is None:
                return fn(), EventOverlap(None)
            compute = torch.cuda.current_stream()
            if previous_event is not None and previous_event.event is not None:
                self._comm_stream.wait_event(previous_event.event)
            else:
                self._comm_stream.wait_stream(compute)
            # A use recorded before the kernels are queued counts the same (the allocator looks at it
            # when the tensor is freed); here it costs no time after the dispatch kernel's launch.
            for t in inputs:
                if t.is_cuda:
                    t.record_stream(self._comm_stream)
            with torch.cuda.stream(self._comm_stream):
                result = fn()
        except CommError as exc:
            self._failure = str(exc)
            raise
        # NOTES: the outputs are allocated on the comm stream (fn ran on it) whatever
        # allocate_on_comm_stream says, so every output (the handle's tensors too) is recorded on the
        # compute stream: one the caller frees must not go back to the comm stream's pool while
        # compute kernels still read it (a later call that waits on previous_event only would
        # overwrite it).  CPU tensors (host counts) need nothing.
        outputs = [t for t in _tensors_in(result) if t.is_cuda]
        for t in outputs:
            t.record_stream(compute)
        if async_finish:
            event = torch.cuda.Event()
            event.record(self._comm_stream)
            return result, EventOverlap(event, tuple(inputs + outputs))
        # One event of this Buffer, recorded again per call (a stream's wait takes the state the
        # event had when the wait was queued), instead of a new event per call.
        if self._done_event is None:
            self._done_event = torch.cuda.Event()
        self._done_event.record(self._comm_stream)
        compute.wait_event(self._done_event)
        return result, EventOverlap(None)

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Where each token goes.

        Args:
            topk_idx: ``[T, K]`` int64, global expert ids; ``-1`` = no expert.
            num_experts: E, divisible by the group size.

        Returns:
            ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank (None: one NVLink domain),
            num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool, event)``.  A token counts
            once per rank however many of its experts live there.
        """
        self._check_usable()
        self._check_previous_event(previous_event)
        num_experts = self._check_num_experts(num_experts)
        topk_idx = self._check_topk_idx(topk_idx, num_experts, None, sync_free=False, previous_event=previous_event)
        fn = lambda: self._backend.get_dispatch_layout(topk_idx, num_experts)  # noqa: E731
        (per_rank, per_expert, in_rank), event = self._run(
            fn, [topk_idx], previous_event, async_finish, allocate_on_comm_stream, "layout"
        )
        return per_rank, None, per_expert, in_rank, event

    # ------------------------------------------------------------------ dispatch
    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        expert_major: bool = False,
    ):
        """Send every token to each rank that holds one of its experts (once per rank).

        Args:
            x: ``[T, H]`` BF16 (the torch backend also takes FP16/FP32/FP64), or FP8
                ``(e4m3 [T, H], float32 scales [T, ceil(H/128)])``.
            handle: a previous dispatch's handle → cached mode: same routing, no layout work; then
                the layout arguments and topk must be None and ``x`` must have the handle's T and H.
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: from
                :meth:`get_dispatch_layout` of the same ``topk_idx`` (non-cached mode).
            topk_idx: ``[T, K]`` int64 global expert ids, ``-1`` = none (optional).
            topk_weights: ``[T, K]`` float32 gate weights (optional, needs topk_idx).
            expert_alignment: per-expert receive counts are rounded up to a multiple of this.
            num_worst_tokens: if > 0, ``recv_x`` has exactly this many rows (padding rows: topk ids
                -1, weights 0, contents unspecified) and no host sync is needed on CUDA; raises if
                some rank would receive more.

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
            event)``.  ``recv_x`` is ``[N, H]`` (a tuple with scales for FP8 input), rows ordered by
            source rank then source token index.  ``recv_topk_idx[i, k]`` is the local expert id
            (0..L-1) when expert k of that token lives here, else -1 (weight 0).

        Expert-major (``expert_major=True``): ``recv_x`` is ``[P, H]`` with one row per (received
        row, local expert) pair in grouped-GEMM order - by local expert, then source rank, then
        source token - each expert's rows padded with zero rows to ``expert_alignment``, and the
        third element is ``recv_probs [P]`` float32 (the pair's gate weight, 0 for padding; None
        without ``topk_weights``) instead of ``recv_topk_weights``.  The per-expert counts add up
        to P; the handle's ``pair_pos_NK`` says where each pair went.  A cached call with that
        handle and ``expert_major=True`` writes its rows the same way.  The CUDA kernels write
        the rows there directly; other backends permute the received rows (same result).
        Needs ``topk_idx`` and ``num_worst_tokens=0``.
        """
        self._check_usable()
        self._check_previous_event(previous_event)
        config = self._dispatch_config if config is None else config
        if not isinstance(config, Config):
            raise TypeError(f"config must be an ep_train.Config or None, got {type(config).__name__}")
        x_TH, scales_TS = split_fp8("x", x, self.device, self._backend.supported_dtypes)
        num_tokens, hidden = x_TH.shape
        expert_alignment = check_int("expert_alignment", expert_alignment, 1)
        num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, 0)
        if num_tokens_per_rdma_rank is not None:
            raise ValueError("num_tokens_per_rdma_rank must be None: this buffer spans one NVLink domain")
        self._check_nvl_bytes(hidden, x_TH.element_size(), config, "dispatch")
        routing = _Routing(num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                           expert_alignment, num_worst_tokens, config, previous_event,
                           check_bool("expert_major", expert_major))  # fmt: skip
        if expert_major:  # before the call takes its number: a refused call leaves no trace
            self._check_expert_major(handle, topk_idx, num_worst_tokens)
        if handle is not None:
            args = self._cached_dispatch_args(x_TH, scales_TS, handle, routing)
        else:
            args = self._dispatch_args(x_TH, scales_TS, routing)
        if expert_major:
            num_topk = (handle.pair_pos_NK if handle is not None else args.topk_idx_TK).shape[1]
            args.expert_major = self._backend.fuses_expert_major(x_TH, args.num_experts, num_topk)

        def run_dispatch():
            res = self._backend.dispatch(args)
            return permute_dispatch_result(res, args) if expert_major and not args.expert_major else res

        # The layout tensors and a cached handle's are read on the comm stream too.
        layout_TR = (args.num_tokens_per_rank_R, args.num_tokens_per_expert_E, args.is_token_in_rank_TR)
        inputs = [t for t in (x_TH, scales_TS, args.topk_idx_TK, args.topk_weights_TK, *layout_TR) if t is not None]
        inputs += _tensors_in(args.handle)
        res, event = self._run(
            run_dispatch,
            inputs,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
            "dispatch",
        )
        res.handle.extras.setdefault(_OWNER, self._owner)
        recv_x = res.recv_x_NH if res.recv_x_scales_NS is None else (res.recv_x_NH, res.recv_x_scales_NS)
        return (
            recv_x,
            res.recv_topk_idx_NK,
            res.pair_probs_P if expert_major else res.recv_topk_weights_NK,
            res.num_recv_tokens_per_expert_list,
            res.handle,
            event,
        )

    def _check_handle(self, handle: DispatchHandle | LowLatencyHandle, what: str) -> None:
        """Refuse a handle of another rank or another Buffer (before the call takes its number).
        Calls are numbered per Buffer, so another Buffer's handle can match this Buffer's call
        numbers and pair with the wrong call on some ranks only."""
        if handle.rank != self.rank or handle.num_ranks != self.group_size:
            raise ValueError(
                f"handle belongs to rank {handle.rank} of {handle.num_ranks}, this buffer is rank "
                f"{self.rank} of {self.group_size}"
            )
        if handle.extras.get(_OWNER) is not self._owner:
            raise ValueError(
                f"{what}: handle comes from another Buffer (or none): pass the handle this Buffer's "
                f"{'low_latency_dispatch' if isinstance(handle, LowLatencyHandle) else 'dispatch'} returned"
            )

    @staticmethod
    def _check_expert_major(handle, topk_idx, num_worst_tokens: int) -> None:
        """What an expert-major dispatch needs beyond a plain one (a handle of another type is left to
        the cached dispatch's own check)."""
        if num_worst_tokens:
            raise ValueError(f"expert_major=True takes num_worst_tokens=0, got {num_worst_tokens}")
        if handle is None and topk_idx is None:
            raise ValueError("expert_major=True needs topk_idx (the rows are placed by their experts)")
        if isinstance(handle, DispatchHandle) and handle.pair_pos_NK is None:
            raise ValueError("expert_major=True with a handle needs the handle of an expert-major dispatch")

    def _dispatch_args(self, x_TH, scales_TS, a: _Routing) -> DispatchArgs:
        T, R = x_TH.shape[0], self.group_size
        if a.num_tokens_per_rank is None or a.is_token_in_rank is None:
            raise ValueError(
                "dispatch without a handle needs num_tokens_per_rank and is_token_in_rank (from get_dispatch_layout)"
            )
        topk_idx, topk_weights = a.topk_idx, a.topk_weights
        if isinstance(topk_idx, torch.Tensor) and topk_idx.dim() >= 1 and topk_idx.shape[0] != T:
            raise ValueError(f"x has {T} rows but topk_idx has {topk_idx.shape[0]}: one routing row per token")
        per_expert = a.num_tokens_per_expert
        if per_expert is None and topk_idx is not None:
            raise ValueError("dispatch with topk_idx needs num_tokens_per_expert (from get_dispatch_layout)")
        if isinstance(per_expert, torch.Tensor):
            check_tensor("num_tokens_per_expert", per_expert, dtypes=torch.int32, ndim=1, device=self.device)
            if per_expert.shape[0] < 1 or per_expert.shape[0] % R:
                raise ValueError(
                    f"num_tokens_per_expert has {per_expert.shape[0]} entries: it holds one per expert (its length is "
                    f"num_experts), a positive multiple of the group size {R}; pass get_dispatch_layout's"
                )
        num_experts = per_expert.shape[0] if isinstance(per_expert, torch.Tensor) else R
        num_experts = self._check_num_experts(num_experts)
        per_rank = check_tensor(
            "num_tokens_per_rank", a.num_tokens_per_rank, dtypes=torch.int32, ndim=1, device=self.device, shape=(R,)
        )
        in_rank = check_tensor(
            "is_token_in_rank", a.is_token_in_rank, dtypes=torch.bool, ndim=2, device=self.device, shape=(T, R)
        )
        if per_expert is not None:
            check_tensor("num_tokens_per_expert", per_expert, dtypes=torch.int32, ndim=1, device=self.device)
        if topk_idx is not None:
            sync_free = a.num_worst_tokens > 0
            topk_idx = self._check_topk_idx(topk_idx, num_experts, T, sync_free, a.previous_event,
                                            values=not self._backend.checks_topk_values)  # fmt: skip
            if topk_weights is not None:
                self._check_topk_weights(topk_weights, tuple(topk_idx.shape))
        elif topk_weights is not None:
            raise ValueError("topk_weights was given without topk_idx")
        num_topk = 0 if topk_idx is None else topk_idx.shape[1]
        dtype = torch.float8_e4m3fn if scales_TS is not None else x_TH.dtype
        info = self._next_info(_OP_DISPATCH, x_TH.shape[1], num_experts, num_topk, dtype,
                               extra=call_extra(0, topk_weights, a.expert_major))  # fmt: skip
        return DispatchArgs(
            info,
            x_TH,
            scales_TS,
            topk_idx,
            topk_weights,
            per_rank,
            per_expert,
            in_rank,
            None,
            num_experts,
            a.expert_alignment,
            a.num_worst_tokens,
            a.config,
            self.check_values,
            topk_idx is not None and self._topk_values_checked(topk_idx, num_experts),
        )

    def _cached_dispatch_args(self, x_TH, scales_TS, handle, a: _Routing) -> DispatchArgs:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be a DispatchHandle from dispatch(), got {type(handle).__name__}")
        for name in ("num_tokens_per_rank", "is_token_in_rank", "num_tokens_per_expert", "topk_idx", "topk_weights"):
            if getattr(a, name) is not None:
                raise ValueError(f"cached dispatch (handle given) takes no {name}: the routing comes from handle")
        self._check_handle(handle, "cached dispatch")
        if x_TH.shape != (handle.num_tokens, handle.hidden):
            raise ValueError(
                f"x must have shape ({handle.num_tokens}, {handle.hidden}) of the cached handle "
                f"(tokens, hidden), got {tuple(x_TH.shape)}"
            )
        if a.num_worst_tokens not in (0, handle.num_recv_rows):
            raise ValueError(
                f"num_worst_tokens={a.num_worst_tokens} differs from the cached handle's {handle.num_recv_rows} rows"
            )
        dtype = torch.float8_e4m3fn if scales_TS is not None else x_TH.dtype
        extra = call_extra(handle.dispatch_seq, None, a.expert_major)
        info = self._next_info(_OP_CACHED, handle.hidden, handle.num_experts, 0, dtype, extra=extra)
        return DispatchArgs(
            info,
            x_TH,
            scales_TS,
            None,
            None,
            None,
            None,
            None,
            handle,
            handle.num_experts,
            handle.expert_alignment,
            handle.num_recv_rows if a.num_worst_tokens else 0,
            a.config,
        )

    # ------------------------------------------------------------------ combine
    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        expert_major: bool = False,
    ):
        """Send rows back to their source ranks and sum them per token (FP32 accumulate).

        Combine does not apply gate weights: the experts (or the caller) do.

        Args:
            x: ``[N, H]`` rows in the order ``dispatch`` produced them (N = the handle's row count).
            handle: the handle of that dispatch.
            topk_weights: ``[N, K]`` float32 (optional): summed per token into
                ``combined_topk_weights`` (restores the dispatched weights).
            bias: one ``[T, H]`` tensor or a pair, added to the result.

            expert_major: ``x`` is ``[P, H]`` in the order of an expert-major dispatch (its handle):
                each received row is first the FP32 sum of its pair rows (ascending k), rounded
                once - on the CUDA kernels inside the combine, elsewhere before it (same bits).

        Returns:
            ``(combined_x [T, H] in x's dtype, combined_topk_weights [T, K] float32 or None, event)``.
        """
        self._check_usable()
        self._check_previous_event(previous_event)
        config = self._combine_config if config is None else config
        if not isinstance(config, Config):
            raise TypeError(f"config must be an ep_train.Config or None, got {type(config).__name__}")
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be a DispatchHandle from dispatch(), got {type(handle).__name__}")
        if expert_major and handle.pair_pos_NK is None:
            raise ValueError("expert_major=True needs the handle of an expert-major dispatch")
        x_NH = check_tensor(
            "x",
            x,
            dtypes=self._backend.supported_dtypes,
            ndim=2,
            device=self.device,
            shape=(handle.num_pair_rows if expert_major else handle.num_recv_rows, None),
        )
        hidden = x_NH.shape[1]
        self._check_nvl_bytes(hidden, x_NH.element_size(), config, "combine")
        if topk_weights is not None:
            self._check_topk_weights(topk_weights, (handle.num_recv_rows, None))
        biases = split_bias(bias)
        for i, b in enumerate(biases):
            check_tensor(
                f"bias[{i}]", b, dtypes=x_NH.dtype, ndim=2, device=self.device, shape=(handle.num_tokens, hidden)
            )
        self._check_handle(handle, "combine")
        num_topk = 0 if topk_weights is None else topk_weights.shape[1]
        # NOTES: the handle's dispatch call number travels in the header (with the weights' dtype and
        # expert_major): ranks combining the rows of different dispatches raise RankMismatchError
        # instead of exchanging rows of other sizes.
        extra = call_extra(handle.dispatch_seq, topk_weights, expert_major)
        info = self._next_info(_OP_COMBINE, hidden, handle.num_experts, num_topk, x_NH.dtype, extra=extra)
        fused = expert_major and self._backend.fuses_expert_major_combine(x_NH)

        def run_combine():
            # Without the kernel's own pair sums, each received row is summed first (same bits).
            rows = sum_pair_rows(x_NH, handle.pair_pos_NK) if expert_major and not fused else x_NH
            return self._backend.combine(
                CombineArgs(info, rows, handle, topk_weights, biases, config, expert_major=fused)
            )

        inputs = [x_NH, *biases] + ([topk_weights] if topk_weights is not None else []) + _tensors_in(handle)
        res, event = self._run(
            run_combine,
            inputs,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
            "combine",
        )
        return res.combined_x_TH, res.combined_topk_weights_TK, event

    # ------------------------------------------------------------------ low latency
    def _check_low_latency(self, M: int, hidden: int, num_experts: int) -> None:
        if not self.low_latency_mode:
            raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True)")
        rma = self.low_latency_rma
        need = self.get_low_latency_rdma_size_hint(M, hidden, self.group_size, num_experts, rma_staging=rma)
        if self.num_rdma_bytes < need:
            raise ValueError(
                f"num_rdma_bytes={self.num_rdma_bytes} is too small for low-latency calls with "
                f"num_max_dispatch_tokens_per_rank={M}, hidden {hidden}, {num_experts} experts on "
                f"{self.group_size} ranks: needs >= {need} (Buffer.get_low_latency_rdma_size_hint"
                f"{', rma_staging=True: ranks reached by NVSHMEM puts need send areas' if rma else ''})"
            )

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Ready the low-latency area for calls of this shape (DeepEP's method, same arguments).

        Checks the shape against ``num_rdma_bytes``.  No memory needs clearing: low-latency calls
        have their own area (normal calls never write into it) and their completion signals are
        call numbers that only grow, so stale signals never match a later call.
        """
        self._check_usable()
        M = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        hidden = check_int("hidden", hidden, 1)
        self._check_low_latency(M, hidden, self._check_num_experts(num_experts))

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """``[L, R*M, H]`` BF16 tensor for the expert outputs of ``handle``'s combine (DeepEP's method).

        The CUDA kernels read the expert outputs straight from any tensor and write them into the
        peers' slots (no local send buffer to copy into), so every combine is already zero-copy;
        this returns a fresh tensor of the right shape for code written against DeepEP.
        """
        self._check_usable()
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(
                f"handle must be a LowLatencyHandle from low_latency_dispatch(), got {type(handle).__name__}"
            )
        L, S = handle.num_local_experts, self.group_size * handle.num_max_dispatch_tokens_per_rank
        return torch.empty((L, S, handle.hidden), dtype=torch.bfloat16, device=self.device)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        topk_weights: torch.Tensor | None = None,
    ):
        """Send each (token, expert) pair to the expert's rank into fixed-shape, expert-major slots.

        Args:
            x: ``[T, H]`` BF16 (torch backend: any float dtype), T <= M.
            topk_idx: ``[T, K]`` int64 global expert ids, ``-1`` = none.
            num_max_dispatch_tokens_per_rank: M, the same on every rank and every call of a shape.
            use_fp8: cast to e4m3 with per-128-channel float32 scales (``ep_train.fp8``) before sending.
            round_scale: round the FP8 scales up to powers of two.
            cumulative_local_expert_recv_stats: optional ``[L]`` int32, incremented by the counts.
            return_recv_hook: only send now; calling the returned hook receives into ``recv_x``.
            topk_weights: optional ``[T, K]`` float32; each slot's weight then lands in
                ``handle.recv_topk_weights_LS`` (its top-k column in ``handle.recv_topk_pos_LS``
                always), used by autograd and by ``low_latency_combine(..., sum_per_rank=True)``,
                which needs this same tensor (the handle keeps it alive).

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is ``[L, R*M, H]`` (FP8: a tuple
            with ``[L, R*M, ceil(H/128)]`` scales); expert l's first ``recv_count[l]`` rows are valid,
            ordered by source rank then source token index.
        """
        self._check_usable()
        for name, flag in (("use_fp8", use_fp8), ("round_scale", round_scale), ("use_ue8m0", use_ue8m0),
                           ("async_finish", async_finish), ("return_recv_hook", return_recv_hook)):  # fmt: skip
            check_bool(name, flag)
        if use_ue8m0:
            raise ValueError("use_ue8m0=True is not supported; round_scale=True gives power-of-two float32 scales")
        M = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        num_experts = self._check_num_experts(num_experts)
        x_TH = check_tensor("x", x, dtypes=self._backend.supported_dtypes, ndim=2, device=self.device)
        T, hidden = x_TH.shape
        if T > M:
            raise ValueError(f"x has {T} tokens, more than num_max_dispatch_tokens_per_rank={M}")
        self._check_low_latency(M, hidden, num_experts)
        topk_idx = self._check_topk_idx(topk_idx, num_experts, T, sync_free=True)
        if topk_weights is not None:
            self._check_topk_weights(topk_weights, tuple(topk_idx.shape))
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            check_tensor(
                "cumulative_local_expert_recv_stats",
                stats,
                dtypes=torch.int32,
                ndim=1,
                device=self.device,
                shape=(num_experts // self.group_size,),
            )
        info = self._next_info(
            _OP_LL_DISPATCH, hidden, num_experts, topk_idx.shape[1], x_TH.dtype,
            extra=low_latency_extra(M, use_fp8, weights=topk_weights is not None),
        )  # fmt: skip
        args = LowLatencyDispatchArgs(
            info,
            x_TH,
            topk_idx,
            topk_weights,
            M,
            num_experts,
            bool(use_fp8),
            bool(round_scale),
            stats,
            bool(return_recv_hook),
        )
        inputs = [x_TH, topk_idx] + ([topk_weights] if topk_weights is not None else [])
        res, event = self._run(
            lambda: self._backend.low_latency_dispatch(args), inputs, None, async_finish, False, "low_latency_dispatch"
        )
        recv_x = res.recv_x_LSH if res.recv_x_scales_LSS is None else (res.recv_x_LSH, res.recv_x_scales_LSS)
        # NOTES: set on the handle the backend just made and nobody else holds yet: cheaper on this
        # latency-bound path than dataclasses.replace (~0.3 against ~5 us of host time per call).
        handle = res.handle
        handle.extras[_OWNER] = self._owner
        object.__setattr__(handle, "topk_idx_ref", (topk_idx, _version(topk_idx)))
        if topk_weights is not None:
            object.__setattr__(handle, "topk_weights_ref", (topk_weights, _version(topk_weights)))
        hook = res.hook
        if hook is not None:  # the combine refuses this handle until the rows were received
            handle.extras[_RECEIVED] = False
            receive = hook

            def hook() -> None:
                receive()
                handle.extras[_RECEIVED] = True

        return recv_x, res.recv_count_L, handle, event, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        sum_per_rank: bool = False,
    ):
        """Send expert outputs back and reduce them per token, weighted by ``topk_weights`` (FP32).

        Args:
            x: ``[L, R*M, H]`` expert outputs in the slots ``low_latency_dispatch`` filled.
            topk_idx, topk_weights: ``[T, K]`` (int64 / float32); ``topk_idx`` must be the dispatch's
                (on CPU a different one raises once the call is done; on CUDA, where checking would
                sync, it is not checked).  ``topk_weights`` may be None only with ``sum_per_rank``.
            handle: the dispatch's handle.  ``out``: optional ``[T, H]`` result tensor.
            zero_copy: accepted for DeepEP code; every combine reads ``x`` in place (see
                :meth:`get_next_low_latency_combine_buffer`).
            sum_per_rank: each expert rank first sums the rows of a token's experts it holds
                (weighted, FP32, ascending top-k column) and sends one row per (token, rank),
                rounded to ``x``'s dtype; the token's rank adds those rows (FP32, ascending rank).
                Fewer bytes cross the links (at top-8 of 256 experts, ~2.2x fewer at 4 ranks, ~4x
                at 2), for one more rounding per rank.  The weights are the dispatch's slot weights,
                so ``topk_weights`` must be the tensor given to that ``low_latency_dispatch``,
                unchanged since (another tensor raises ValueError after the call), or None for the
                plain sum (every row weighted 1: the backward of a dispatch).  Ranks that disagree on
                the mode raise RankMismatchError.  Hidden % 8 == 0 on CUDA.

        Returns:
            ``(combined_x [T, H], event, hook)``.
        """
        self._check_usable()
        for name, flag in (("use_logfmt", use_logfmt), ("zero_copy", zero_copy), ("async_finish", async_finish),
                           ("return_recv_hook", return_recv_hook), ("sum_per_rank", sum_per_rank)):  # fmt: skip
            check_bool(name, flag)
        if use_logfmt:
            raise ValueError("use_logfmt=True is not supported; combine sends BF16 rows")
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(
                f"handle must be a LowLatencyHandle from low_latency_dispatch(), got {type(handle).__name__}"
            )
        self._check_handle(handle, "low_latency_combine")
        if handle.extras.get(_RECEIVED) is False:
            raise ValueError(
                "low_latency_combine: the handle's low_latency_dispatch ran with return_recv_hook=True and its "
                "receive hook has not been called: call it first (the expert inputs arrive only then)"
            )
        L, R, M = handle.num_local_experts, self.group_size, handle.num_max_dispatch_tokens_per_rank
        x_LSH = check_tensor(
            "x", x, dtypes=self._backend.supported_dtypes, ndim=3, device=self.device, shape=(L, R * M, handle.hidden)
        )
        T, K = handle.topk_idx_TK.shape
        topk_idx = check_tensor("topk_idx", topk_idx, dtypes=topk_idx_t, ndim=2, device=self.device, shape=(T, K))
        # NOTES: checked where it is free (CPU) and raised only after the call, so the peers, whose
        # rows follow the handle, are not left waiting for this rank.
        foreign_idx = self.device.type == "cpu" and not torch.equal(topk_idx, handle.topk_idx_TK)
        edited_idx = handle.topk_idx_ref is not None and _written_since(topk_idx, handle.topk_idx_ref)
        if topk_weights is not None or not sum_per_rank:
            self._check_topk_weights(topk_weights, (T, K))
        if out is not None:
            check_tensor("out", out, dtypes=x_LSH.dtype, ndim=2, device=self.device, shape=(T, handle.hidden))
        if sum_per_rank:
            self._check_sum_per_rank_hidden(handle.hidden)
        # NOTES: the kernels take the weights of a combine with sums per rank from the dispatch's
        # slots, never from topk_weights, so a wrong tensor is reported after the call (the peers
        # are not left waiting) like a foreign topk_idx.
        foreign_weights = self._sum_per_rank_problem(topk_weights, handle) if sum_per_rank else None
        extra = low_latency_extra(M, sum_per_rank, bool(sum_per_rank) and topk_weights is None)
        info = self._next_info(_OP_LL_COMBINE, handle.hidden, handle.num_experts, K, x_LSH.dtype, extra=extra)
        args = LowLatencyCombineArgs(
            info, x_LSH, topk_idx, topk_weights, handle, out, bool(return_recv_hook), bool(sum_per_rank)
        )
        res, event = self._run(
            lambda: self._backend.low_latency_combine(args),
            [t for t in (x_LSH, topk_idx, topk_weights) if t is not None],
            None,
            async_finish,
            False,
            "low_latency_combine",
        )
        if edited_idx:
            raise ValueError(
                "topk_idx given to low_latency_dispatch was written in place before its combine: the combine "
                "needs the routing its rows were dispatched with (write the next routing after the combine)"
            )
        if foreign_idx:
            t = int((topk_idx != handle.topk_idx_TK).any(dim=1).nonzero()[0])
            raise ValueError(
                f"topk_idx must be the dispatch's (the handle's): row {t} is {topk_idx[t].tolist()}, the dispatch "
                f"sent {handle.topk_idx_TK[t].tolist()}"
            )
        if foreign_weights is not None:
            raise ValueError(foreign_weights)
        return res.combined_x_TH, event, res.hook
