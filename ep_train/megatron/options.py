"""``EPOptions``: the ep_train settings of a MoE layer that TransformerConfig has no field for."""

from __future__ import annotations

from dataclasses import dataclass

from ..backends import BACKEND_NAMES
from ..config import Config
from ..validate import check_num_sms

__all__ = ["EPOptions"]


@dataclass(frozen=True)
class EPOptions:
    """Settings of the ``deepep`` token dispatcher and of :class:`EPMoELayer`.

    Attributes:
        num_chunks: split each micro-batch's routed tokens into this many chunks and pipeline
            them: the dispatch of chunk i+1 and the combine of chunk i-1 run while the experts
            compute chunk i, forward and backward.  1 = off.  Every rank of the EP group must use
            the same value.  Ignored (1) under Megatron's EP-overlap 1F1B schedule
            (``overlap_moe_expert_parallel_comm``), which overlaps whole micro-batches instead.
        expert_alignment: pad every local expert's rows to a multiple of this (zero rows with
            probability 0), e.g. 16 or 32 for FP8 grouped GEMMs.  1 = no padding.
        fp8_dispatch: send the dispatch in FP8 (e4m3, per-128 scales); the experts receive the
            dequantised rows in the activation dtype.
        backend: Buffer backend: ``"auto"`` (CUDA kernels where built, else torch collectives),
            ``"torch"`` or ``"cuda"``.
        num_sms: SMs of the dispatch/combine kernels (even).  None: measured defaults: 24 where
            the kernels overlap compute (``num_chunks`` > 1, shared-expert overlap, the EP-overlap
            schedule, ``overlap_dispatch_backward_with_experts_wgrad``), else
            ``ep_train.config.solo_num_sms`` of the GPU (96 on a 132-SM H100/H200: nothing else
            runs while they do, and 36 SMs stay free for a collective beside them).
        dispatch_config, combine_config: full kernel configs (override ``num_sms``).
        fused_permutation: dispatch straight into the experts' grouped order (the CUDA kernels
            write each row to its experts' places; its backward too) instead of dispatching and
            then permuting.  Same rows, order and bits either way.  Applies to ``num_chunks=1``
            outside Megatron's EP-overlap schedule.
    """

    num_chunks: int = 1
    expert_alignment: int = 1
    fp8_dispatch: bool = False
    backend: str = "auto"
    num_sms: int | None = None
    dispatch_config: Config | None = None
    combine_config: Config | None = None
    fused_permutation: bool = True

    def __post_init__(self) -> None:
        for name in ("num_chunks", "expert_alignment"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EPOptions.{name} must be an int >= 1, got {value!r}")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"EPOptions.backend must be one of {BACKEND_NAMES}, got {self.backend!r}")
        check_num_sms("EPOptions.num_sms", self.num_sms, none_ok=True)
        for name in ("dispatch_config", "combine_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Config):
                raise TypeError(f"EPOptions.{name} must be an ep_train.Config or None, got {type(value).__name__}")
