// notify: the first step of a layout-free dispatch.  Every rank tells every peer how many tokens it
// sends to each rank (per channel and per local expert of the peer) and its token count; after the
// barrier each rank holds the full count matrix and builds the prefix matrices the dispatch kernel
// indexes, plus the receive counts the host waits for (skipped on the num_worst_tokens path) and,
// for an expert-major dispatch, the first row of every (source rank, local expert) pair block.
#include <cuda_runtime.h>

#include "ep_train/barrier.cuh"
#include "ep_train/buffer_layout.cuh"
#include "ep_train/ptx.cuh"
#include "ep_train/timeout.cuh"
#include "runtime.hpp"

namespace ep_train {

namespace {

constexpr int kNotifyThreads = 512;

__device__ __forceinline__ const int* slot_ints(void* base, int parity, int src, int64_t offset) {
    return reinterpret_cast<const int*>(IntranodeLayout::notify_slot(base, parity, src) + offset);
}

// Grid: one block of kNotifyThreads.  Warps first count local tokens per (rank, channel) with
// ballots, then all threads write the counts into every peer's notify slot, pass the barrier,
// and finally threads < R (or < L) each build one row of the outputs.
__global__ void __launch_bounds__(kNotifyThreads, 1)
    notify_kernel(const __grid_constant__ NotifyParams p, const __grid_constant__ RankContext ctx) {
    __shared__ int s_chan[kMaxRanks][kMaxChannels];
    __shared__ int s_row[kMaxRanks];
    __shared__ int s_matrix[kMaxRanks][kMaxRanks];
    __shared__ int s_expert_start[kMaxExperts + 1];
    __shared__ int64_t s_seq;
    if (has_failed(ctx.err)) return;
    const int R = ctx.num_ranks, C = p.num_channels, me = ctx.rank;
    const int L = p.num_experts / R;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;

    for (int i = threadIdx.x; i < kMaxRanks * kMaxChannels; i += blockDim.x)
        s_chan[i / kMaxChannels][i % kMaxChannels] = 0;
    __syncthreads();
    for (int c = warp; c < C; c += num_warps) {
        const int b = channel_token_begin(p.num_tokens, C, c), e = channel_token_begin(p.num_tokens, C, c + 1);
        int counts[kMaxRanks] = {};
        for (int base = b; base < e; base += 32) {
            const int t = base + lane;
#pragma unroll
            for (int r = 0; r < kMaxRanks; ++r) {
                bool in = r < R && t < e && p.is_token_in_rank[int64_t(t) * R + r];
                counts[r] += __popc(__ballot_sync(0xffffffffu, in));
            }
        }
        if (lane == 0)
            for (int r = 0; r < R; ++r) s_chan[r][c] = counts[r];
    }
    __syncthreads();
    if (threadIdx.x < R) {
        int sum = 0;
        for (int c = 0; c < C; ++c) sum += s_chan[threadIdx.x][c];
        s_row[threadIdx.x] = sum;
    }
    barrier_begin(ctx, &s_seq);  // includes __syncthreads
    const int64_t seq = s_seq;
    const int parity = static_cast<int>(seq & 1);

    // Slot payload for every destination d: count row, T, d's expert counts, channel counts to d.
    const int per_dest = R + 1 + L + C;
    for (int i = threadIdx.x; i < R * per_dest; i += blockDim.x) {
        const int d = i / per_dest, j = i % per_dest;
        char* slot = IntranodeLayout::notify_slot(ctx.peers.base[d], parity, me);
        if (j < R) {
            reinterpret_cast<int*>(slot + NotifySlot::kCountRow)[j] = s_row[j];
        } else if (j == R) {
            *reinterpret_cast<int*>(slot + NotifySlot::kNumTokens) = p.num_tokens;
        } else if (j < R + 1 + L) {
            const int e = j - R - 1;
            reinterpret_cast<int*>(slot + NotifySlot::kExpertCounts)[e] =
                p.num_tokens_per_expert ? p.num_tokens_per_expert[d * L + e] : 0;
        } else {
            const int c = j - R - 1 - L;
            reinterpret_cast<int*>(slot + NotifySlot::kChannelCounts)[c] = s_chan[d][c];
        }
    }
    if (!barrier_finish(ctx, p.info, seq)) return;

    void* own = ctx.peers.base[me];
    for (int i = threadIdx.x; i < R * R; i += blockDim.x)
        s_matrix[i / R][i % R] = ptx::ld_volatile(slot_ints(own, parity, i / R, NotifySlot::kCountRow) + i % R);
    __syncthreads();

    const int t = threadIdx.x;
    if (t < R) {
        // Column t: rank_prefix_matrix[:, t], capacity of rank t, my channel bases at rank t.
        int acc = 0, before_me = 0;
        for (int s = 0; s < R; ++s) {
            if (s == me) before_me = acc;
            acc += s_matrix[s][t];
            p.rank_prefix_matrix[s * R + t] = acc;
        }
        if (p.num_worst_tokens > 0 && acc > p.num_worst_tokens)
            report_error(ctx.err, kErrCapacity, kCheckCapacity, -1, t, p.num_worst_tokens, acc);
        int base = before_me;
        for (int c = 0; c < C; ++c) {
            p.send_chan_base[t * C + c] = base;
            base += s_chan[t][c];
        }
        // Row t of recv_chan_start: where source t's channels land in my recv_x.
        int start = 0;
        for (int s = 0; s < t; ++s) start += s_matrix[s][me];
        const int* chan = slot_ints(own, parity, t, NotifySlot::kChannelCounts);
        for (int c = 0; c < C; ++c) {
            p.recv_chan_start[t * (C + 1) + c] = start;
            start += ptx::ld_volatile(chan + c);
        }
        p.recv_chan_start[t * (C + 1) + C] = start;
        p.num_tokens_per_source[t] = ptx::ld_volatile(slot_ints(own, parity, t, NotifySlot::kNumTokens));
    }
    for (int e = t; e < L; e += blockDim.x) {
        int sum = 0;
        for (int s = 0; s < R; ++s) sum += ptx::ld_volatile(slot_ints(own, parity, s, NotifySlot::kExpertCounts) + e);
        sum = (sum + p.expert_alignment - 1) / p.expert_alignment * p.expert_alignment;
        p.num_recv_per_expert[e] = sum;
        s_expert_start[e + 1] = sum;
        if (p.host_sync) ctx.err.mailbox->num_recv_tokens_per_expert[e] = sum;
    }
    if (p.pair_base != nullptr) {
        // Expert-major rows: expert e's (aligned) block, inside it source s after the sources before it.
        __syncthreads();
        if (t == 0) {
            s_expert_start[0] = 0;
            for (int e = 0; e < L; ++e) s_expert_start[e + 1] += s_expert_start[e];
        }
        __syncthreads();
        for (int e = t; e < L; e += blockDim.x) {
            int row = s_expert_start[e];
            for (int s = 0; s < R; ++s) {
                p.pair_base[s * L + e] = row;
                row += ptx::ld_volatile(slot_ints(own, parity, s, NotifySlot::kExpertCounts) + e);
            }
        }
    }
    if (p.host_sync) __threadfence_system();  // each writer fences before thread 0 raises the flag
    if (t == 0) {
        int total = 0;
        for (int s = 0; s < R; ++s) total += s_matrix[s][me];
        *p.num_recv_tokens = total;
        if (p.host_sync) ctx.err.mailbox->num_recv_tokens = total;
    }
    __syncthreads();
    if (t == 0 && p.host_sync && !has_failed(ctx.err)) {
        __threadfence_system();
        ctx.err.mailbox->recv_ready = 1;
        __threadfence_system();
    }
}

}  // namespace

void launch_notify(const NotifyParams& p, const RankContext& ctx, cudaStream_t stream) {
    notify_kernel<<<1, kNotifyThreads, 0, stream>>>(p, ctx);
    check_cuda(cudaGetLastError(), "notify launch");
}

void load_notify_kernels() {
    load_kernel(notify_kernel, "notify kernel");
}

}  // namespace ep_train
