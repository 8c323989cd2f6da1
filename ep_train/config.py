"""Kernel tuning knobs (``Config``) and the per-rank-count defaults."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from . import layout
from .validate import check_num_sms

__all__ = ["Config", "get_dispatch_config", "get_combine_config", "solo_num_sms"]


@dataclass(frozen=True)
class Config:
    """How many SMs a dispatch/combine may take and how tokens are chunked.

    ``num_sms`` must be even: each channel is a pair of SMs (one sends, one receives).  The NVLink
    ring of each (channel, source rank) holds ``num_max_nvl_chunked_recv_tokens`` rows and senders
    publish ``num_max_nvl_chunked_send_tokens`` rows at a time.  The RDMA fields are kept for
    DeepEP compatibility and used by internode kernels.
    """

    num_sms: int = 24
    num_max_nvl_chunked_send_tokens: int = 8
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 16
    num_max_rdma_chunked_recv_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"Config.{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))
        check_num_sms("Config.num_sms", self.num_sms)
        send, recv = self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens
        if send < 1:
            raise ValueError(f"Config.num_max_nvl_chunked_send_tokens must be >= 1, got {send}")
        if recv < 2 * send:
            raise ValueError(
                "Config.num_max_nvl_chunked_recv_tokens must be >= 2 x num_max_nvl_chunked_send_tokens "
                f"({2 * send}), got {recv}"
            )

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer this config needs for rows of ``hidden_bytes`` on ``num_ranks`` ranks."""
        if hidden_bytes <= 0:
            raise ValueError(f"hidden_bytes must be > 0, got {hidden_bytes}")
        if not 1 <= num_ranks <= layout.MAX_RANKS:
            # Beyond one NVLink domain the NVLink buffer holds only the local node's ranks.
            num_ranks = layout.MAX_RANKS
        return layout.intranode_buffer_bytes(
            hidden_bytes, num_ranks, self.num_channels, self.num_max_nvl_chunked_recv_tokens
        )

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA buffer: zero inside one NVLink domain (internode kernels size their own)."""
        if hidden_bytes <= 0:
            raise ValueError(f"hidden_bytes must be > 0, got {hidden_bytes}")
        if num_ranks <= layout.MAX_RANKS:
            return 0
        num_nodes = (num_ranks + layout.MAX_RANKS - 1) // layout.MAX_RANKS
        row = layout.intranode_row_bytes(hidden_bytes)
        return layout.align_up(2 * self.num_channels * num_nodes * self.num_max_rdma_chunked_recv_tokens * row)


# Measured on H200 (standard case, 2026-11-28, benchmarks/RESULTS.md), 24 SMs: EP2 dispatch is best
# with a send chunk of 16 or more (453 GB/s BF16; 8 leaves half the sending warps idle), EP4 with 8
# (375 GB/s BF16, earlier kernels); combine with 8 on both; a 512-row ring gains nothing.  8 ranks
# are not measured yet and use the EP4 values.
_DISPATCH_DEFAULTS = {
    2: Config(24, 16, 256),
    4: Config(24, 8, 256),
    8: Config(24, 8, 256),
}
_COMBINE_DEFAULTS = {
    2: Config(24, 8, 256),
    4: Config(24, 8, 256),
    8: Config(24, 8, 256),
}


def _lookup(table: dict[int, Config], num_ranks: int, what: str) -> Config:
    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"{what}: num_ranks must be a positive int, got {num_ranks!r}")
    if num_ranks in table:
        return table[num_ranks]
    # Ranks that are not a tuned size use the next larger tuned one (or the largest).
    larger = [n for n in sorted(table) if n >= num_ranks]
    return table[larger[0] if larger else max(table)]


def get_dispatch_config(num_ranks: int) -> Config:
    """Measured-best dispatch config for ``num_ranks`` ranks."""
    return _lookup(_DISPATCH_DEFAULTS, num_ranks, "get_dispatch_config")


def get_combine_config(num_ranks: int) -> Config:
    """Measured-best combine config for ``num_ranks`` ranks."""
    return _lookup(_COMBINE_DEFAULTS, num_ranks, "get_combine_config")


# Kernels that nothing overlaps (a MoE layer with neither chunked nor shared-expert overlap) may
# take more SMs than the 24 left to them beside the expert GEMMs.  EP2 MoE layer (standard case, 2 x
# H200, 2026-11-29, benchmarks/RESULTS.md): 64 / 96 / 128 SMs -1.4 / -1.7 / -2.1 ms against 24 (the
# expert-major combine 1.38 -> 0.49 ms a call at 96).  SOLO_SPARE_SMS stay free: kernels that spin
# until their peers run (ours, NCCL's gradient reduction beside a backward, up to 32 channels) must
# all be resident at once, so 128 of 132 SMs could stall a collective that overlaps them.
SOLO_NUM_SMS = 96
SOLO_SPARE_SMS = 36


def solo_num_sms(device_sms: int) -> int:
    """SMs for dispatch/combine kernels that run alone on a GPU of ``device_sms`` SMs: up to
    ``SOLO_NUM_SMS``, leaving ``SOLO_SPARE_SMS`` free, never below the overlapped default's 24 (or
    the device's even SM count when it has fewer)."""
    if isinstance(device_sms, bool) or not isinstance(device_sms, int) or device_sms < 2:
        raise ValueError(f"device_sms must be an int >= 2, got {device_sms!r}")
    default = min(_DISPATCH_DEFAULTS[2].num_sms, device_sms // 2 * 2)
    return max(default, min(SOLO_NUM_SMS, device_sms - SOLO_SPARE_SMS) // 2 * 2)
