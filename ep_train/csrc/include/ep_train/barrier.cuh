// Block-wide barrier across ranks with a call-header check.  Used at the start of every
// operation (notify for layout-free dispatch, prepare for cached dispatch and combine).
//
// Protocol: the block bumps its own barrier sequence (device memory, so CUDA-graph replays keep
// counting), writes its call header into slot [parity][me] of every peer (parity = sequence & 1),
// then stores the sequence into every peer's barrier[me] with release semantics and waits with
// acquire until its own barrier[p] >= sequence for all p.  Flags only grow: nothing is ever reset.
// NOTES: a peer that passed this barrier has finished every earlier kernel of its stream, so
// rings, counters and the other parity's notify slots are free to write afterwards.
#pragma once

#include <cstdint>

#include "ep_train/buffer_layout.cuh"
#include "ep_train/ptx.cuh"
#include "ep_train/timeout.cuh"

namespace ep_train {

// Step 1 (thread 0 publishes into *s_seq): this barrier's sequence number.
__device__ __forceinline__ void barrier_begin(const RankContext& ctx, int64_t* s_seq) {
    if (threadIdx.x == 0) {
        int64_t* seq = IntranodeLayout::seq(ctx.peers.base[ctx.rank]);
        *s_seq = *seq + 1;
        *seq = *s_seq;
    }
    __syncthreads();
}

// Step 2, after the caller wrote its slot payload into every peer: header, flags, wait, check.
// Returns false (after reporting) on timeout or header mismatch; every thread gets the same answer.
__device__ __forceinline__ bool barrier_finish(const RankContext& ctx, const int64_t* info, int64_t seq) {
    const int parity = static_cast<int>(seq & 1);
    for (int i = threadIdx.x; i < ctx.num_ranks * kInfoWords; i += blockDim.x) {
        int peer = i / kInfoWords, w = i % kInfoWords;
        auto* slot = reinterpret_cast<int64_t*>(IntranodeLayout::notify_slot(ctx.peers.base[peer], parity, ctx.rank) +
                                                NotifySlot::kInfo);
        slot[w] = info[w];
    }
    __syncthreads();
    const int t = threadIdx.x;
    if (t < ctx.num_ranks) {
        ptx::fence_acq_rel_sys();
        ptx::st_release_sys(IntranodeLayout::barrier(ctx.peers.base[t]) + ctx.rank, seq);
        wait_at_least(IntranodeLayout::barrier(ctx.peers.base[ctx.rank]) + t, seq, ctx.err, kWaitBarrier, -1, t);
    }
    __syncthreads();
    if (has_failed(ctx.err)) return false;
    if (t < ctx.num_ranks) {
        const auto* theirs = reinterpret_cast<const volatile int64_t*>(
            IntranodeLayout::notify_slot(ctx.peers.base[ctx.rank], parity, t) + NotifySlot::kInfo);
        for (int w = 0; w < kInfoWords; ++w) {
            if (theirs[w] != info[w]) {
                report_error(ctx.err, kErrMismatch, kCheckCallHeader, w, t, info[w], theirs[w]);
                break;
            }
        }
    }
    __syncthreads();
    return !has_failed(ctx.err);
}

}  // namespace ep_train
