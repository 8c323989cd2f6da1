"""The contract every backend implements.  ``Buffer`` validates inputs, owns streams and events,
and calls exactly these methods with checked, contiguous tensors on the right device.

Shape legend: T local tokens, H hidden, S ``ceil(H/128)`` FP8 scales, K top-k, R ranks,
E experts, L = E/R local experts, N received rows, M ``num_max_dispatch_tokens_per_rank``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import Config
from ..handle import DispatchHandle, LowLatencyHandle

__all__ = [
    "Backend",
    "CallInfo",
    "DispatchArgs",
    "DispatchResult",
    "CombineArgs",
    "CombineResult",
    "LowLatencyDispatchArgs",
    "LowLatencyDispatchResult",
    "LowLatencyCombineArgs",
    "LowLatencyCombineResult",
]


@dataclass(frozen=True)
class CallInfo:
    """What every rank must agree on for one call; exchanged to detect mismatched ranks."""

    op: int  # 1 layout-free dispatch, 2 cached dispatch, 3 combine, 4 LL dispatch, 5 LL combine
    seq: int  # calls made on this buffer so far
    hidden: int
    num_experts: int
    num_topk: int  # 0 when absent
    dtype_code: int
    extra: int = 0  # op-specific: num_max_dispatch_tokens_per_rank, fp8 flag, ...

    def as_list(self) -> list[int]:
        return [self.op, self.seq, self.hidden, self.num_experts, self.num_topk, self.dtype_code, self.extra]

    FIELDS = ("op", "seq", "hidden", "num_experts", "num_topk", "dtype", "extra")


# The ``extra`` header word of the normal calls: the handle's dispatch call number (cached dispatch,
# combine; 0 for a layout-free dispatch) above three flag bits, so that ranks disagreeing on any of
# them raise RankMismatchError before rows of other shapes are exchanged.
_WEIGHT_CODES = {None: 0, torch.float32: 1, torch.float64: 2}
_WEIGHT_NAMES = {0: "None", 1: "float32", 2: "float64", 3: "another dtype"}


def _weights_code(weights: torch.Tensor | None) -> int:
    return _WEIGHT_CODES.get(None if weights is None else weights.dtype, 3)


def call_extra(dispatch_seq: int, topk_weights: torch.Tensor | None, expert_major: bool) -> int:
    """A normal call's ``extra`` word: dispatch_seq << 3 | expert_major << 2 | topk_weights' dtype code."""
    return dispatch_seq << 3 | int(bool(expert_major)) << 2 | _weights_code(topk_weights)


def low_latency_extra(max_tokens: int, flag: bool, plain_sum: bool = False, weights: bool = False) -> int:
    """A low-latency call's ``extra`` word: M << 3 | weights << 2 | plain_sum << 1 | flag, where flag
    is a dispatch's ``use_fp8`` or a combine's ``sum_per_rank``, plain_sum marks a combine with sums
    per rank and no weights (a rank that weights with its peers' slots would mix the two), and
    weights whether a dispatch was given ``topk_weights`` (its slots' weights)."""
    return max_tokens << 3 | int(bool(weights)) << 2 | int(bool(plain_sum)) << 1 | int(bool(flag))


def describe_extra(op: int | None, low_latency: bool, ours: int, theirs: int) -> tuple[str, str, str]:
    """The differing part of two ``extra`` words, as (what, ours, theirs) for a RankMismatchError;
    ``op`` may be None (the kernels report the field, not the op)."""
    if not low_latency:
        if ours >> 3 != theirs >> 3:
            return "the handle (the call number of its dispatch)", str(ours >> 3), str(theirs >> 3)

        def flags(v: int) -> str:
            return f"({_WEIGHT_NAMES[v & 3]}, {bool(v & 4)})"

        return "(topk_weights, expert_major)", flags(ours), flags(theirs)
    if ours >> 3 != theirs >> 3:
        return "num_max_dispatch_tokens_per_rank", str(ours >> 3), str(theirs >> 3)
    first = {4: "use_fp8", 5: "sum_per_rank"}.get(op, "use_fp8 (dispatch) or sum_per_rank (combine)")

    def settings(v: int) -> str:
        return "(" + ", ".join(str(bool(v >> i & 1)) for i in range(3)) + ")"

    return f"({first}, plain sum without topk_weights, topk_weights given)", settings(ours), settings(theirs)


@dataclass
class DispatchArgs:
    info: CallInfo
    x_TH: torch.Tensor
    x_scales_TS: torch.Tensor | None
    topk_idx_TK: torch.Tensor | None  # int64, -1 = no expert
    topk_weights_TK: torch.Tensor | None  # float32
    num_tokens_per_rank_R: torch.Tensor | None  # int32 (None in cached mode)
    num_tokens_per_expert_E: torch.Tensor | None  # int32
    is_token_in_rank_TR: torch.Tensor | None  # bool
    handle: DispatchHandle | None  # cached mode
    num_experts: int
    expert_alignment: int
    num_worst_tokens: int
    config: Config
    #: also check the layout arguments against topk_idx where that is a backend's own work (the
    #: Buffer's ``check_values``).
    check_layout: bool = True
    #: the Buffer has already checked these ``topk_idx`` values (e.g. in get_dispatch_layout).
    topk_values_checked: bool = False
    #: expert-major rows straight from the kernel (only where ``Backend.fuses_expert_major`` said so).
    expert_major: bool = False


@dataclass
class DispatchResult:
    recv_x_NH: torch.Tensor
    recv_x_scales_NS: torch.Tensor | None
    recv_topk_idx_NK: torch.Tensor | None  # int64 local expert ids, -1 elsewhere
    recv_topk_weights_NK: torch.Tensor | None
    num_recv_tokens_per_expert_list: list[int]
    handle: DispatchHandle
    #: expert-major dispatch: the gate weight of every expert-major row (0 for padding).
    pair_probs_P: torch.Tensor | None = None


@dataclass
class CombineArgs:
    info: CallInfo
    x_NH: torch.Tensor
    handle: DispatchHandle
    topk_weights_NK: torch.Tensor | None
    bias: tuple[torch.Tensor, ...]  # zero, one or two [T, H] tensors added to the result
    config: Config
    #: x is ``[P, H]`` expert-major rows summed per received row by the kernel (only where
    #: ``Backend.fuses_expert_major_combine`` said so).
    expert_major: bool = False


@dataclass
class CombineResult:
    combined_x_TH: torch.Tensor
    combined_topk_weights_TK: torch.Tensor | None


@dataclass
class LowLatencyDispatchArgs:
    info: CallInfo
    x_TH: torch.Tensor
    topk_idx_TK: torch.Tensor
    topk_weights_TK: torch.Tensor | None  # float32; travels in the slot header when given
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    use_fp8: bool
    round_scale: bool
    cumulative_local_expert_recv_stats_L: torch.Tensor | None
    return_recv_hook: bool


@dataclass
class LowLatencyDispatchResult:
    recv_x_LSH: torch.Tensor  # [L, R*M, H]
    recv_x_scales_LSS: torch.Tensor | None  # [L, R*M, ceil(H/128)] float32 when use_fp8
    recv_count_L: torch.Tensor
    handle: LowLatencyHandle
    hook: Callable[[], None] | None  # set when return_recv_hook: receives into the tensors above


@dataclass
class LowLatencyCombineArgs:
    info: CallInfo
    x_LSH: torch.Tensor
    topk_idx_TK: torch.Tensor
    topk_weights_TK: torch.Tensor | None  # None only with sum_per_rank
    handle: LowLatencyHandle
    out_TH: torch.Tensor | None
    return_recv_hook: bool
    # Each expert rank sums a token's rows it holds, weighted by the dispatch's slot weights (by 1
    # when topk_weights_TK is None), and sends one row per (token, rank), rounded to the rows' dtype;
    # the token's rank adds those rows.
    sum_per_rank: bool = False


@dataclass
class LowLatencyCombineResult:
    combined_x_TH: torch.Tensor
    hook: Callable[[], None] | None


class Backend(ABC):
    """One implementation of the Buffer contract over one process group."""

    name: str = "abstract"

    #: dtypes ``dispatch``/``combine`` accept for unquantised rows.
    supported_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)

    #: ``dispatch`` checks the ``topk_idx`` values itself, in a verdict every rank hears, so the
    #: Buffer leaves that check to it (a local error would leave the peers waiting).
    checks_topk_values: bool = False

    #: False where the group spans nodes: the backend then serves low-latency calls only.
    serves_normal_calls: bool = True

    #: The low-latency kernels reach some rank by NVSHMEM puts, so each call needs the buffer's send
    #: areas (``Buffer.get_low_latency_rdma_size_hint(..., rma_staging=True)``).
    low_latency_rma: bool = False

    @abstractmethod
    def get_dispatch_layout(
        self, topk_idx_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ ``(num_tokens_per_rank_R int32, num_tokens_per_expert_E int32, is_token_in_rank_TR bool)``."""

    @abstractmethod
    def dispatch(self, args: DispatchArgs) -> DispatchResult: ...

    def fuses_expert_major(self, x_TH: torch.Tensor, num_experts: int, num_topk: int) -> bool:
        """Whether ``dispatch`` writes expert-major rows itself for this call (``args.expert_major``);
        otherwise the Buffer permutes the received rows (same rows, same order)."""
        return False

    @abstractmethod
    def combine(self, args: CombineArgs) -> CombineResult: ...

    def fuses_expert_major_combine(self, x_PH: torch.Tensor) -> bool:
        """Whether ``combine`` sums expert-major rows itself (``args.expert_major``); otherwise the
        Buffer sums each received row's pair rows first (same bits)."""
        return False

    @abstractmethod
    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> LowLatencyDispatchResult: ...

    @abstractmethod
    def low_latency_combine(self, args: LowLatencyCombineArgs) -> LowLatencyCombineResult: ...

    def raise_failures(self) -> None:  # noqa: B027 - optional hook: backends that raise as they run keep it
        """Wait for this backend's work and raise what any of it reported since the last call."""

    def destroy(self) -> None:  # noqa: B027 - optional hook: backends without memory keep the default
        """Release communication memory; the default holds none."""
