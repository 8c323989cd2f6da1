"""Byte layout of the communication buffers: the Python side of ``csrc/include/ep_train/buffer_layout.cuh``.

Size hints, capacity checks and the CUDA kernels all derive offsets from these formulas, so a
buffer sized here is exactly what the kernels index.  Any change here must be mirrored in
``buffer_layout.cuh``; ``tests/gpu/test_layout.py`` compares both on the device.

Intranode (NVLink) buffer, per rank::

    [control: barrier flags + own barrier sequence + status word, two parities of notify slots
              (call header, counts) per source rank, ring head/tail counters per (channel, source)]
    [rings:   num_channels x num_ranks rings of num_recv_ring_tokens rows; ring (c, s) holds the
              rows source rank s sends in channel c]

The control part is sized for MAX_RANKS x MAX_CHANNELS whatever the call, so it never moves.

A ring row holds one token: ``hidden_bytes`` of payload, FP8 scales, its top-k ids and weights and
its source index.

Low-latency buffer (``num_rdma_bytes``), per rank; mirrors ``csrc/include/ep_train/low_latency_layout.cuh``::

    [control: status, LL sequence, finish counters, acks int64[2 halves][MAX_RANKS],
              header slots [2 halves][MAX_RANKS sources] of 128 bytes (call header, arrivals, grid size)]
    [half 0][half 1], each:
        [counts:   int32 [E] = [L][R], rows source s put into local expert l]
        [slots:    [L][R][M] 16-byte dispatch slot headers (token, top-k column, weight)]
        [tokens:   [R][M] rows: token t of source s once, however many local experts it has here
                   (a BF16 row, or an FP8 row + its scales)]
        [combine:  [M][MAX_TOPK] BF16 rows, one per (token, top-k column) of the owner]
        with RMA staging (peers reached by NVSHMEM puts, which read only symmetric memory):
        [send tokens:  [M] rows, this rank's dispatched rows as they are put]
        [send combine: [L][R][M] BF16 rows, this rank's expert outputs as they are put]

Calls alternate between the halves, so a call may still be received while the next one is sent.
Half 1 starts halfway through the space after the control part, whatever the call's shape: a
call's half must never reach into the other half, which a call of another shape may be using.
"""

from __future__ import annotations

__all__ = [
    "ALIGN_BYTES",
    "FP8_BLOCK",
    "MAX_TOPK",
    "MAX_RANKS",
    "MAX_EXPERTS",
    "MAX_CHANNELS",
    "align_up",
    "num_fp8_scales",
    "intranode_row_bytes",
    "intranode_control_bytes",
    "intranode_buffer_bytes",
    "low_latency_token_row_bytes",
    "low_latency_combine_row_bytes",
    "low_latency_buffer_bytes",
]

ALIGN_BYTES = 128  # every region starts on a 128-byte boundary (TMA and 16-byte vector stores)
FP8_BLOCK = 128  # one float32 scale per 128 channels
MAX_TOPK = 16  # upper bound on top-k; ring rows reserve room for this many ids/weights
MAX_RANKS = 8  # NVLink domain of one node
MAX_EXPERTS = 1024  # bound of the notify count matrix
MAX_CHANNELS = 64  # num_sms / 2 of one call (H100/H200 have 132 SMs)
INFO_WORDS = 8  # int64 words of the call header every rank checks at the start barrier


def align_up(value: int, alignment: int = ALIGN_BYTES) -> int:
    return (value + alignment - 1) // alignment * alignment


def num_fp8_scales(hidden: int) -> int:
    return (hidden + FP8_BLOCK - 1) // FP8_BLOCK


def intranode_row_bytes(hidden_bytes: int) -> int:
    """Bytes of one ring row: payload, scales (sized for BF16 hidden), top-k ids + weights, src index,
    per-expert token ranks (expert-major dispatch)."""
    hidden = hidden_bytes // 2  # the largest payload is BF16
    meta = num_fp8_scales(hidden) * 4 + MAX_TOPK * 4 + MAX_TOPK * 4 + 4 + MAX_TOPK * 4
    return align_up(hidden_bytes, 16) + align_up(meta, 16)


def _notify_slot_bytes() -> int:
    """One notify slot (source s -> rank d): call header, count row, T, d's expert counts, channel counts."""
    return align_up(INFO_WORDS * 8 + MAX_RANKS * 4 + 16 + MAX_EXPERTS * 4 + MAX_CHANNELS * 4)


def intranode_control_bytes(num_ranks: int, num_channels: int) -> int:
    """Barrier flags + sequence + status, two parities of notify slots, ring head/tail counters.

    Sized for MAX_RANKS x MAX_CHANNELS whatever the call's ranks and channels, so the counters keep
    their place when calls use different configs.
    """
    sync = align_up(MAX_RANKS * 8 + 8 + 4)
    notify = 2 * MAX_RANKS * _notify_slot_bytes()
    counters = 2 * MAX_CHANNELS * MAX_RANKS * 8
    return align_up(sync + notify + counters)


def intranode_buffer_bytes(hidden_bytes: int, num_ranks: int, num_channels: int, num_recv_ring_tokens: int) -> int:
    rings = num_channels * num_ranks * num_recv_ring_tokens * intranode_row_bytes(hidden_bytes)
    return intranode_control_bytes(num_ranks, num_channels) + align_up(rings)


LOW_LATENCY_CONTROL_BYTES = 2 * ALIGN_BYTES + 2 * MAX_RANKS * ALIGN_BYTES  # see the module docstring


LOW_LATENCY_SLOT_BYTES = 16  # a dispatch slot header: token, top-k column, gate weight, padding


def low_latency_token_row_bytes(hidden: int) -> int:
    """One dispatched token: a BF16 row (an FP8 row and its scales fit in it)."""
    return align_up(hidden * 2, 16)


def low_latency_combine_row_bytes(hidden: int) -> int:
    """One combine slot: a BF16 row."""
    return align_up(hidden * 2, 16)


def low_latency_buffer_bytes(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int, rma_staging: bool = False
) -> int:
    """Bytes of the low-latency buffer (control + both halves); ``rma_staging`` adds the send areas
    that peers reached by NVSHMEM puts need (another node, or ``EP_TRAIN_LL_RMA``)."""
    M = num_max_dispatch_tokens_per_rank
    counts = align_up(num_experts * 4)
    slots = align_up(num_experts * M * LOW_LATENCY_SLOT_BYTES)
    tokens = align_up(num_ranks * M * low_latency_token_row_bytes(hidden))
    combine = align_up(M * MAX_TOPK * low_latency_combine_row_bytes(hidden))
    staging = 0
    if rma_staging:
        staging = align_up(M * low_latency_token_row_bytes(hidden))
        staging += align_up(num_experts * M * low_latency_combine_row_bytes(hidden))
    return LOW_LATENCY_CONTROL_BYTES + 2 * (counts + slots + tokens + combine + staging)
