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


def low_latency_extra(max_tokens: int, flag: bool, plain_sum: bool = False) -> int:
    """A low-latency call's ``extra`` header word: M * 4 + flag + 2 * plain_sum, where flag is a
    dispatch's ``use_fp8`` or a combine's ``sum_per_rank``, and plain_sum marks a combine with sums
    per rank and no weights (a rank that weights with its peers' slots would mix the two)."""
    return max_tokens * 4 + int(bool(flag)) + 2 * int(bool(plain_sum))


def describe_low_latency_extra(value: int) -> tuple[int, bool, bool]:
    """``low_latency_extra``'s arguments back from its word."""
    return value // 4, bool(value & 1), bool(value & 2)


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

    def destroy(self) -> None:  # noqa: B027 - optional hook: backends without memory keep the default
        """Release communication memory; the default holds none."""
