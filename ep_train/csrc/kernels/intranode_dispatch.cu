// dispatch: move token rows to every rank that holds one of their experts, through per-(channel,
// source) rings in the receiver's NVLink buffer.  Rows land in recv_x ordered by source rank,
// then source token index; send_pos records where (layout-free mode).  Rows a rank keeps for
// itself skip the ring: its sender writes them straight into recv_x, so the receiving warps only
// serve the other ranks.  Expert-major mode (pair_mode) writes every row once per local expert
// of its token instead, straight into the grouped-GEMM order (expert, source rank, source token):
// each sender sends the token's rank among its tokens of each expert, notify gave the first row of
// every (source, expert) block, so a receiver places a row without looking at any other row.
#include <cuda_runtime.h>

#include "ep_train/barrier.cuh"
#include "ep_train/buffer_layout.cuh"
#include "ep_train/ptx.cuh"
#include "ep_train/timeout.cuh"
#include "ep_train/warp.cuh"
#include "runtime.hpp"

namespace ep_train {

namespace {

constexpr int kDispatchWarps = 24;
constexpr int kDispatchThreads = kDispatchWarps * 32;
constexpr int kCopyUnroll = 8;  // 8 x 16 B per lane in flight: 4 KB per warp toward NVLink latency

// Sending warps for the own rank's rows and for each other rank's.  The own rows are a local copy
// (no ring, no NVLink round trip), so that group is the small one: with equal groups at 2 ranks it
// finished early and idled while the other group was still writing over NVLink.
template <int kNumRanks>
constexpr int kOwnSendWarps = kNumRanks == 2 ? 8 : 3;
template <int kNumRanks>
constexpr int kPeerSendWarps = (kDispatchWarps - kOwnSendWarps<kNumRanks>) / (kNumRanks - 1);
static_assert(kOwnSendWarps<2> + kPeerSendWarps<2> == kDispatchWarps &&
                  kOwnSendWarps<4> + 3 * kPeerSendWarps<4> == kDispatchWarps &&
                  kOwnSendWarps<8> + 7 * kPeerSendWarps<8> == kDispatchWarps,
              "every sending warp serves one destination");

// Local id of global expert e on `rank` (L experts per rank), -1 when e lives elsewhere or is -1.
__device__ __forceinline__ int local_expert(int64_t e, int rank, int L) {
    const int64_t local = e - int64_t(rank) * L;
    return e >= 0 && local >= 0 && local < L ? static_cast<int>(local) : -1;
}

// Expert-major mode: lane k < pair_topk returns the row of pair k of received row `out` (or
// num_pair_rows: no pair), given the pair's local expert and its token's rank among the source's
// tokens of that expert (first call), or from pair_pos (cached call).  The first call records the
// row in pair_pos and the gate weight in pair_probs.
__device__ __forceinline__ int64_t pair_row(const DispatchParams& p, int64_t out, int src, int local, int rank,
                                            float weight) {
    const int lane = lane_id();
    int64_t row = p.num_pair_rows;
    if (lane >= p.pair_topk) return row;
    if (p.pair_mode == kPairsFromPos) return p.pair_pos[out * p.pair_topk + lane];
    if (local >= 0) row = p.pair_base[src * p.num_local_experts + local] + rank;
    if (row < 0 || row > p.num_pair_rows) row = p.num_pair_rows;  // counts that disagree: never write out of bounds
    p.pair_pos[out * p.pair_topk + lane] = row;
    if (p.pair_probs != nullptr && row < p.num_pair_rows) p.pair_probs[row] = weight;
    return row;
}

// Expert-major mode: one row (and its scales) to each of its pair rows (lane k holds pair k's row).
// The destinations go through a per-warp table in shared memory, so the copy keeps all its
// registers for vectors in flight.
template <bool kSrcIsRing>
__device__ __forceinline__ void write_pair_rows(const DispatchParams& p, int64_t row, const char* src,
                                                const int* src_scales) {
    __shared__ char* s_dst[kDispatchWarps][kMaxTopk];
    const int lane = lane_id(), warp = threadIdx.x / 32;
    const bool valid = lane < p.pair_topk && row < p.num_pair_rows;
    const uint32_t lanes = __ballot_sync(0xffffffffu, valid);
    char* dst = static_cast<char*>(p.recv_x) + row * p.payload_bytes;
    if (valid) s_dst[warp][__popc(lanes & ((1u << lane) - 1u))] = dst;
    const bool aligned = __all_sync(0xffffffffu, !valid || (reinterpret_cast<uintptr_t>(dst) & 15) == 0);
    __syncwarp();
    const int count = __popc(lanes);
    warp_copy_fanout<kCopyUnroll, kSrcIsRing>(s_dst[warp], count, aligned, src, p.payload_bytes);
    if (p.num_scales > 0) {
        for (uint32_t m = lanes; m != 0; m &= m - 1) {
            int* d =
                reinterpret_cast<int*>(p.recv_x_scales) + __shfl_sync(0xffffffffu, row, __ffs(m) - 1) * p.num_scales;
            for (int i = lane; i < p.num_scales; i += 32)
                d[i] = kSrcIsRing ? ptx::ld_cg(src_scales + i) : src_scales[i];
        }
    }
    __syncwarp();  // the table is reused by the warp's next row
}

// One token's row and metadata, written where a receiver would write them (out: row of recv_x).
template <bool kPairs>
__device__ __forceinline__ void write_own_row(const DispatchParams& p, int token, int64_t out, int me) {
    const int lane = lane_id();
    if constexpr (kPairs) {
        int local = -1, rank = 0;
        float weight = 0.0f;
        if (p.pair_mode == kPairsFromRanks && lane < p.num_topk) {
            local = local_expert(p.topk_idx[int64_t(token) * p.num_topk + lane], me, p.num_local_experts);
            rank = static_cast<int>(p.expert_rank[int64_t(token) * p.num_topk + lane]);
            if (p.topk_weights != nullptr) weight = p.topk_weights[int64_t(token) * p.num_topk + lane];
        }
        const int64_t row = pair_row(p, out, me, local, rank, weight);
        write_pair_rows<false>(p, row, static_cast<const char*>(p.x) + int64_t(token) * p.payload_bytes,
                               reinterpret_cast<const int*>(p.x_scales) + int64_t(token) * p.num_scales);
    } else {
        warp_copy<kCopyUnroll, false>(static_cast<char*>(p.recv_x) + out * p.payload_bytes,
                                      static_cast<const char*>(p.x) + int64_t(token) * p.payload_bytes,
                                      p.payload_bytes);
        for (int i = lane; i < p.num_scales; i += 32)
            p.recv_x_scales[out * p.num_scales + i] = p.x_scales[int64_t(token) * p.num_scales + i];
    }
    if (p.recv_topk_idx != nullptr && p.topk_idx != nullptr && lane < p.num_topk) {
        const int local = local_expert(p.topk_idx[int64_t(token) * p.num_topk + lane], me, p.num_local_experts);
        p.recv_topk_idx[out * p.num_topk + lane] = local;
        if (p.recv_topk_weights != nullptr)
            p.recv_topk_weights[out * p.num_topk + lane] =
                local >= 0 && p.topk_weights != nullptr ? p.topk_weights[int64_t(token) * p.num_topk + lane] : 0.0f;
    }
    if (lane == 0 && p.recv_src_idx != nullptr) p.recv_src_idx[out] = token;
}

// Sender side of one (channel, destination) pair, run by the destination's group of group_warps warps.
// Rounds: the group looks at the next 32 tokens of the channel, keeps the first chunk_tokens that
// go to `dst`, copies each kept token (one warp per row) into consecutive ring slots, then one
// thread publishes the new tail with release semantics.  For dst == own rank the rows go straight
// to recv_x (no ring, no tail): row k of the channel lands at recv_chan_start[me][channel] + k.
// NOTES: every warp of the group runs the same rounds, so the named barrier never deadlocks,
// also after a failed wait (then copies are skipped and the loop just runs out).
template <int kNumRanks, bool kPairs>
__device__ void dispatch_send(const DispatchParams& p, const RankContext& ctx, int channel, int dst, int warp_in_group,
                              int group_warps) {
    const int lane = lane_id(), me = ctx.rank, C = p.layout.num_channels, ring = p.layout.ring_tokens;
    const int t_begin = channel_token_begin(p.num_tokens, C, channel);
    const int t_end = channel_token_begin(p.num_tokens, C, channel + 1);
    void* peer = ctx.peers.base[dst];
    char* ring_base = p.layout.ring(peer, channel, me);
    int64_t* tail_ptr = IntranodeLayout::tail(peer, channel, me);
    const int64_t* head_ptr = IntranodeLayout::head(peer, channel, me);
    const int64_t row_bytes = p.layout.row_bytes;
    const int pos_base = p.send_pos ? p.send_chan_base[dst * C + channel] : 0;
    const int L = p.num_local_experts;
    const bool own = dst == me;
    const int64_t own_start = p.recv_chan_start[me * (C + 1) + channel];
    int64_t tail = 0, head = 0;
    bool ok = true;

    for (int cursor = t_begin; cursor < t_end;) {
        const int t = cursor + lane;
        const bool sel = t < t_end && p.is_token_in_rank[int64_t(t) * kNumRanks + dst];
        uint32_t mask = __ballot_sync(0xffffffffu, sel);
        int n = __popc(mask);
        int advance = min(32, t_end - cursor);
        if (n > p.chunk_tokens) {
            const int last = nth_set_bit(mask, p.chunk_tokens - 1);
            mask &= last == 31 ? 0xffffffffu : ((2u << last) - 1u);
            n = p.chunk_tokens;
            advance = last + 1;
        }
        if (n > 0) {
            if (own) {
                for (int j = warp_in_group; j < n; j += group_warps) {
                    const int token = cursor + nth_set_bit(mask, j);
                    write_own_row<kPairs>(p, token, own_start + tail + j, me);
                    if (lane == 0 && p.send_pos)
                        p.send_pos[int64_t(token) * kNumRanks + dst] = pos_base + int(tail + j);
                }
                tail += n;
                cursor += advance;
                continue;
            }
            if (ok && tail + n - head > ring) {  // wait until the receiver freed enough slots
                int64_t h = 0;
                if (lane == 0) h = wait_at_least(head_ptr, tail + n - ring, ctx.err, kWaitDispatchSpace, channel, dst);
                head = __shfl_sync(0xffffffffu, h, 0);
                ok = head >= 0;
            }
            for (int j = warp_in_group; ok && j < n; j += group_warps) {
                const int token = cursor + nth_set_bit(mask, j);
                char* row = ring_base + ((tail + j) % ring) * row_bytes;
                warp_copy<kCopyUnroll, false>(row, static_cast<const char*>(p.x) + int64_t(token) * p.payload_bytes,
                                              p.payload_bytes);
                float* scales = reinterpret_cast<float*>(row + p.layout.scales_offset);
                for (int i = lane; i < p.num_scales; i += 32) scales[i] = p.x_scales[int64_t(token) * p.num_scales + i];
                if (p.topk_idx != nullptr && lane < p.num_topk) {
                    const int local = local_expert(p.topk_idx[int64_t(token) * p.num_topk + lane], dst, L);
                    reinterpret_cast<int*>(row + p.layout.topk_idx_offset)[lane] = local;
                    if (p.topk_weights != nullptr)
                        reinterpret_cast<float*>(row + p.layout.weights_offset)[lane] =
                            local >= 0 ? p.topk_weights[int64_t(token) * p.num_topk + lane] : 0.0f;
                    if (kPairs && p.pair_mode == kPairsFromRanks)
                        reinterpret_cast<int*>(row + p.layout.expert_rank_offset)[lane] =
                            static_cast<int>(p.expert_rank[int64_t(token) * p.num_topk + lane]);
                }
                if (lane == 0) {
                    *reinterpret_cast<int*>(row + p.layout.src_idx_offset) = token;
                    if (p.send_pos) p.send_pos[int64_t(token) * kNumRanks + dst] = pos_base + int(tail + j);
                }
            }
            ptx::bar_sync(1 + dst, group_warps * 32);
            if (warp_in_group == 0 && lane == 0 && ok) ptx::st_release_sys(tail_ptr, tail + n);
            tail += n;
        }
        cursor += advance;
    }
}

// Warps of a receiving block per other rank (8 ranks: 3 of the 24 warps stay idle).
template <int kNumRanks>
constexpr int kRecvWarpsPerRank = kDispatchWarps / (kNumRanks - 1);

// Receiver side of one (channel, source) pair, run by the source's group of warps: one thread
// waits for the tail, the group copies ring rows [head, tail) into recv_x (one warp per row),
// then the head is advanced so the sender may reuse the slots.  At the end the counters are zeroed
// for the next call (the sender touches neither after its final tail).
template <int kNumRanks, bool kPairs>
__device__ void dispatch_recv(const DispatchParams& p, const RankContext& ctx, int channel, int src, int group,
                              int warp_in_group, int64_t* s_tail) {
    constexpr int kWarpsPerRank = kRecvWarpsPerRank<kNumRanks>;
    const int lane = lane_id(), me = ctx.rank, C = p.layout.num_channels, ring = p.layout.ring_tokens;
    void* own = ctx.peers.base[me];
    const char* ring_base = p.layout.ring(own, channel, src);
    int64_t* tail_ptr = IntranodeLayout::tail(own, channel, src);
    int64_t* head_ptr = IntranodeLayout::head(own, channel, src);
    const int start = p.recv_chan_start[src * (C + 1) + channel];
    const int count = p.recv_chan_start[src * (C + 1) + channel + 1] - start;
    const int64_t row_bytes = p.layout.row_bytes;
    const bool leader = warp_in_group == 0 && lane == 0;
    int64_t head = 0;
    bool ok = true;

    while (head < count) {
        if (leader) {
            int64_t t = wait_at_least(tail_ptr, head + 1, ctx.err, kWaitDispatchTail, channel, src);
            *s_tail = t < 0 ? -1 : min(t, int64_t(count));
        }
        ptx::bar_sync(1 + group, kWarpsPerRank * 32);
        const int64_t tail = *s_tail;
        if (tail < 0) {
            ok = false;
            break;
        }
        for (int64_t j = head + warp_in_group; j < tail; j += kWarpsPerRank) {
            const char* row = ring_base + (j % ring) * row_bytes;
            const int64_t out = start + j;
            const int* scales = reinterpret_cast<const int*>(row + p.layout.scales_offset);
            if constexpr (kPairs) {
                int local = -1, rank = 0;
                float weight = 0.0f;
                if (p.pair_mode == kPairsFromRanks && lane < p.num_topk) {
                    local = ptx::ld_cg(reinterpret_cast<const int*>(row + p.layout.topk_idx_offset) + lane);
                    rank = ptx::ld_cg(reinterpret_cast<const int*>(row + p.layout.expert_rank_offset) + lane);
                    if (p.pair_probs != nullptr)
                        weight = __int_as_float(
                            ptx::ld_cg(reinterpret_cast<const int*>(row + p.layout.weights_offset) + lane));
                }
                write_pair_rows<true>(p, pair_row(p, out, src, local, rank, weight), row, scales);
            } else {
                warp_copy<kCopyUnroll, true>(static_cast<char*>(p.recv_x) + out * p.payload_bytes, row,
                                             p.payload_bytes);
                for (int i = lane; i < p.num_scales; i += 32)
                    reinterpret_cast<int*>(p.recv_x_scales)[out * p.num_scales + i] = ptx::ld_cg(scales + i);
            }
            if (p.recv_topk_idx != nullptr && lane < p.num_topk) {
                p.recv_topk_idx[out * p.num_topk + lane] =
                    ptx::ld_cg(reinterpret_cast<const int*>(row + p.layout.topk_idx_offset) + lane);
                if (p.recv_topk_weights != nullptr)
                    reinterpret_cast<int*>(p.recv_topk_weights)[out * p.num_topk + lane] =
                        ptx::ld_cg(reinterpret_cast<const int*>(row + p.layout.weights_offset) + lane);
            }
            if (lane == 0 && p.recv_src_idx != nullptr)
                p.recv_src_idx[out] = ptx::ld_cg(reinterpret_cast<const int*>(row + p.layout.src_idx_offset));
        }
        ptx::bar_sync(1 + group, kWarpsPerRank * 32);
        head = tail;
        if (leader) ptx::st_relaxed_sys(head_ptr, head);
    }
    if (leader && ok && count > 0) {
        ptx::st_relaxed_sys(tail_ptr, 0);
        ptx::st_relaxed_sys(head_ptr, 0);
    }
}

// Grid: 2 x C blocks of kDispatchThreads; block 2c sends channel c, block 2c + 1 receives it.
// Sending warps: the first kOwnSendWarps write the own rank's rows straight into recv_x, the rest
// form one group of kPeerSendWarps per other rank in rank order; receiving warps form kNumRanks - 1
// groups, one per other rank.
template <int kNumRanks, bool kPairs>
__global__ void __launch_bounds__(kDispatchThreads, 1)
    dispatch_kernel(const __grid_constant__ DispatchParams p, const __grid_constant__ RankContext ctx) {
    __shared__ int64_t s_tail[kNumRanks];
    if (has_failed(ctx.err)) return;
    const int channel = blockIdx.x / 2, warp = threadIdx.x / 32;
    if (blockIdx.x % 2 == 0) {
        constexpr int kOwn = kOwnSendWarps<kNumRanks>, kPeer = kPeerSendWarps<kNumRanks>;
        if (warp < kOwn) {
            dispatch_send<kNumRanks, kPairs>(p, ctx, channel, ctx.rank, warp, kOwn);
        } else {
            const int group = (warp - kOwn) / kPeer;
            const int dst = group < ctx.rank ? group : group + 1;
            dispatch_send<kNumRanks, kPairs>(p, ctx, channel, dst, (warp - kOwn) % kPeer, kPeer);
        }
    } else {
        constexpr int kWarpsPerRank = kRecvWarpsPerRank<kNumRanks>;
        const int group = warp / kWarpsPerRank;
        if (group >= kNumRanks - 1) return;
        const int src = group < ctx.rank ? group : group + 1;
        dispatch_recv<kNumRanks, kPairs>(p, ctx, channel, src, group, warp % kWarpsPerRank, &s_tail[src]);
    }
}

}  // namespace

void launch_dispatch(const DispatchParams& p, const RankContext& ctx, int num_sms, cudaStream_t stream) {
    with_num_ranks(ctx.num_ranks, "dispatch", [&](auto ranks) {
        if (p.pair_mode != kPairsOff)
            dispatch_kernel<decltype(ranks)::value, true><<<num_sms, kDispatchThreads, 0, stream>>>(p, ctx);
        else
            dispatch_kernel<decltype(ranks)::value, false><<<num_sms, kDispatchThreads, 0, stream>>>(p, ctx);
    });
    check_cuda(cudaGetLastError(), "dispatch launch");
}

void load_dispatch_kernels() {
    load_kernel(dispatch_kernel<2, false>, "dispatch kernel");
    load_kernel(dispatch_kernel<4, false>, "dispatch kernel");
    load_kernel(dispatch_kernel<8, false>, "dispatch kernel");
    load_kernel(dispatch_kernel<2, true>, "expert-major dispatch kernel");
    load_kernel(dispatch_kernel<4, true>, "expert-major dispatch kernel");
    load_kernel(dispatch_kernel<8, true>, "expert-major dispatch kernel");
}

}  // namespace ep_train
