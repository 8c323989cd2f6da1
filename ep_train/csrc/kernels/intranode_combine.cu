// combine: the reverse of dispatch.  Every rank sends each received row back to its source rank
// through the same ring protocol; the source sums, per token, the rows of all ranks in FP32 in a
// fixed rank order (deterministic), adds up to two biases and writes BF16 once.  A rank's rows for
// its own tokens skip the ring: the reducing warps read them straight from x.  Expert-major mode
// (expert_major) takes x as expert-major rows: wherever a received row is read (a sender's copy,
// a reducer's own row), the row is the FP32 sum of its pair rows rounded to BF16, summed on the fly.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "ep_train/barrier.cuh"
#include "ep_train/buffer_layout.cuh"
#include "ep_train/ptx.cuh"
#include "ep_train/timeout.cuh"
#include "ep_train/vec.cuh"
#include "ep_train/warp.cuh"
#include "runtime.hpp"

namespace ep_train {

namespace {

constexpr int kCombineWarps = 24;
constexpr int kCombineThreads = kCombineWarps * 32;
constexpr int kCopyUnroll = 8;  // 8 x 16 B per lane in flight: 4 KB per warp toward NVLink latency

// Warps of a sending block per other rank (8 ranks: 3 of the 24 warps stay idle).
template <int kNumRanks>
constexpr int kSendWarpsPerRank = kCombineWarps / (kNumRanks - 1);

constexpr int kPairBatch = 4;  // pair rows whose vectors a lane loads before adding them

// Expert-major mode: the pair rows of received row n, ascending k, into this warp's table; returns
// how many.  The table lives in shared memory so the sums keep their registers for loads.
__device__ __forceinline__ int pair_rows_of(const CombineParams& p, int64_t n, const int4** table) {
    const int lane = lane_id();
    int64_t pos = p.num_pair_rows;
    if (lane < p.pair_topk) pos = p.pair_pos[n * p.pair_topk + lane];
    const bool valid = lane < p.pair_topk && pos >= 0 && pos < p.num_pair_rows;
    const uint32_t lanes = __ballot_sync(0xffffffffu, valid);
    __syncwarp();  // the previous row's readers are done with the table
    if (valid)
        table[__popc(lanes & ((1u << lane) - 1u))] =
            reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + pos * int64_t(p.hidden) * 2);
    __syncwarp();
    return __popc(lanes);
}

// Vectors i, i + 32, .. (kU of them) of the received row whose pair rows are table[0 .. count):
// each the FP32 sum from +0 in table order, rounded to BF16 (the bits sum_pairs gives).  Up to
// kU x kBatch loads in flight.
template <int kU, int kBatch = kPairBatch>
__device__ __forceinline__ void sum_pair_vectors(const int4* const* table, int count, int i, int4 (&out)[kU]) {
    float acc[kU][8] = {};
    for (int b = 0; b < count; b += kBatch) {
        int4 v[kU][kBatch];
#pragma unroll
        for (int j = 0; j < kBatch; ++j)
#pragma unroll
            for (int u = 0; u < kU; ++u)
                if (b + j < count) v[u][j] = ptx::ld_nc_v4(table[b + j] + i + u * kWarpSize);
#pragma unroll
        for (int j = 0; j < kBatch; ++j)
#pragma unroll
            for (int u = 0; u < kU; ++u)
                if (b + j < count) add_bf16x8(acc[u], v[u][j]);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) out[u] = pack_bf16x8(acc[u]);
}

__device__ __forceinline__ int4 sum_pair_vector(const int4* const* table, int count, int i) {
    int4 out[1];
    sum_pair_vectors<1>(table, count, i, out);
    return out[0];
}

// Sender side of one (channel, destination) pair, dst another rank: rows [recv_chan_start[dst][c],
// ..[c + 1]) of x are exactly the rows of dst's channel c, in dst's token order.  Chunks of
// chunk_tokens rows go into consecutive ring slots (one warp per row), then one thread publishes
// the tail.
template <int kNumRanks, bool kPairs>
__device__ void combine_send(const CombineParams& p, const RankContext& ctx, int channel, int dst, int group,
                             int warp_in_group) {
    __shared__ const int4* s_pairs[kCombineWarps][kMaxTopk];
    constexpr int kWarpsPerRank = kSendWarpsPerRank<kNumRanks>;
    const int lane = lane_id(), me = ctx.rank, C = p.layout.num_channels, ring = p.layout.ring_tokens;
    void* peer = ctx.peers.base[dst];
    char* ring_base = p.layout.ring(peer, channel, me);
    int64_t* tail_ptr = IntranodeLayout::tail(peer, channel, me);
    const int64_t* head_ptr = IntranodeLayout::head(peer, channel, me);
    const int row_begin = p.recv_chan_start[dst * (C + 1) + channel];
    const int row_end = p.recv_chan_start[dst * (C + 1) + channel + 1];
    const int64_t row_bytes = p.layout.row_bytes, payload = int64_t(p.hidden) * 2;
    int64_t tail = 0, head = 0;
    bool ok = true;

    for (int first = row_begin; first < row_end; first += p.chunk_tokens) {
        const int n = min(p.chunk_tokens, row_end - first);
        if (ok && tail + n - head > ring) {
            int64_t h = 0;
            if (lane == 0) h = wait_at_least(head_ptr, tail + n - ring, ctx.err, kWaitCombineSpace, channel, dst);
            head = __shfl_sync(0xffffffffu, h, 0);
            ok = head >= 0;
        }
        for (int j = warp_in_group; ok && j < n; j += kWarpsPerRank) {
            char* row = ring_base + ((tail + j) % ring) * row_bytes;
            const int64_t src_row = first + j;
            if constexpr (kPairs) {
                const int4** table = s_pairs[threadIdx.x / 32];
                const int count = pair_rows_of(p, src_row, table);
                const int n = p.hidden / 8;
                int i = lane;
                for (; i + kWarpSize < n; i += 2 * kWarpSize) {  // two vectors' loads in flight per lane
                    int4 out[2];
                    sum_pair_vectors<2, 2>(table, count, i, out);
                    ptx::st_na_v4(reinterpret_cast<int4*>(row) + i, out[0]);
                    ptx::st_na_v4(reinterpret_cast<int4*>(row) + i + kWarpSize, out[1]);
                }
                if (i < n) ptx::st_na_v4(reinterpret_cast<int4*>(row) + i, sum_pair_vector(table, count, i));
            } else {
                warp_copy<kCopyUnroll, false>(row, static_cast<const char*>(p.x) + src_row * payload, payload);
            }
            if (p.topk_weights != nullptr && lane < p.num_topk)
                reinterpret_cast<float*>(row + p.layout.weights_offset)[lane] =
                    p.topk_weights[src_row * p.num_topk + lane];
        }
        ptx::bar_sync(1 + group, kWarpsPerRank * 32);
        if (warp_in_group == 0 && lane == 0 && ok) ptx::st_release_sys(tail_ptr, tail + n);
        tail += n;
    }
}

// 16-byte vectors a lane reduces per step: the loads of kReduceUnroll x (ranks holding the token)
// vectors are issued before the first sum.  At 2 ranks a lane otherwise has at most two loads in
// flight and the reducing SMs wait on memory; at 4 and 8 ranks a token's rows come from more ranks
// already, and a larger step spills registers under the 768-thread bound.
template <int kNumRanks>
constexpr int kReduceUnroll = kNumRanks <= 2 ? 4 : 1;

// Vectors i, i + 32, ..., i + 32 (kU - 1) of one token's output (8 BF16 each).
// NOTES: FP32 sum starting from +0 in rank order, then bias0, then bias1 - the reference's order.
template <int kNumRanks, int kU>
__device__ __forceinline__ void reduce_vectors(const char* const (&rows)[kNumRanks], const int4* b0, const int4* b1,
                                               int4* out, int i) {
    int4 v[kU][kNumRanks];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int r = 0; r < kNumRanks; ++r)
            if (rows[r] != nullptr) v[u][r] = ptx::ld_cg_v4(reinterpret_cast<const int4*>(rows[r]) + i + u * kWarpSize);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
        float acc[8] = {};
#pragma unroll
        for (int r = 0; r < kNumRanks; ++r)
            if (rows[r] != nullptr) add_bf16x8(acc, v[u][r]);
        if (b0 != nullptr) add_bf16x8(acc, ptx::ld_nc_v4(b0 + i + u * kWarpSize));
        if (b1 != nullptr) add_bf16x8(acc, ptx::ld_nc_v4(b1 + i + u * kWarpSize));
        ptx::st_na_v4(out + i + u * kWarpSize, pack_bf16x8(acc));
    }
}

// Expert-major mode, one token: like reduce_vectors with kU = 1, the own rank's row summed from
// its pair rows table[0 .. count) first (and rounded, as the sender of a row would have).
// NOTES: rows is only indexed by unrolled constants (a runtime index would put it in local memory).
template <int kNumRanks>
__device__ __forceinline__ void reduce_vector_pairs(const char* const (&rows)[kNumRanks], int me,
                                                    const int4* const* table, int count, const int4* b0, const int4* b1,
                                                    int4* out, int i) {
    int4 v[kNumRanks];
#pragma unroll
    for (int r = 0; r < kNumRanks; ++r)
        if (rows[r] != nullptr && r != me) v[r] = ptx::ld_cg_v4(reinterpret_cast<const int4*>(rows[r]) + i);
    const int4 own = count > 0 ? sum_pair_vector(table, count, i) : int4{};
    float acc[8] = {};
#pragma unroll
    for (int r = 0; r < kNumRanks; ++r)
        if (rows[r] != nullptr) {
            if (r == me)
                add_bf16x8(acc, own);
            else
                add_bf16x8(acc, v[r]);
        }
    if (b0 != nullptr) add_bf16x8(acc, ptx::ld_nc_v4(b0 + i));
    if (b1 != nullptr) add_bf16x8(acc, ptx::ld_nc_v4(b1 + i));
    ptx::st_na_v4(out + i, pack_bf16x8(acc));
}

// Reduce one token: rows[r] is rank r's row (null when the token did not go there): a ring row,
// or for the own rank `me` row own_x_row of x (its weights in topk_weights, not after the row).
// Expert-major mode: the own row is the sum of the pair rows of received row own_x_row.
template <int kNumRanks, bool kPairs>
__device__ void reduce_token(const CombineParams& p, const char* const (&rows)[kNumRanks], int me, int64_t own_x_row,
                             int64_t token) {
    constexpr int kU = kReduceUnroll<kNumRanks>;
    const int lane = lane_id();
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.combined_x) + token * p.hidden;
    const auto* b0 = static_cast<const __nv_bfloat16*>(p.bias0);
    const auto* b1 = static_cast<const __nv_bfloat16*>(p.bias1);
    if constexpr (kPairs) {  // the host sends only hidden % 8 == 0 here
        __shared__ const int4* s_own[kCombineWarps][kMaxTopk];
        const int4** table = s_own[threadIdx.x / 32];
        const int count = own_x_row >= 0 ? pair_rows_of(p, own_x_row, table) : 0;
        const int4* b0v = b0 != nullptr ? reinterpret_cast<const int4*>(b0 + token * p.hidden) : nullptr;
        const int4* b1v = b1 != nullptr ? reinterpret_cast<const int4*>(b1 + token * p.hidden) : nullptr;
        for (int i = lane; i < p.hidden / 8; i += kWarpSize)
            reduce_vector_pairs<kNumRanks>(rows, me, table, count, b0v, b1v, reinterpret_cast<int4*>(out), i);
    } else if (p.hidden % 8 == 0) {
        const int n = p.hidden / 8;
        const int4* b0v = b0 != nullptr ? reinterpret_cast<const int4*>(b0 + token * p.hidden) : nullptr;
        const int4* b1v = b1 != nullptr ? reinterpret_cast<const int4*>(b1 + token * p.hidden) : nullptr;
        int4* outv = reinterpret_cast<int4*>(out);
        int i = lane;
        for (; i + (kU - 1) * kWarpSize < n; i += kU * kWarpSize)
            reduce_vectors<kNumRanks, kU>(rows, b0v, b1v, outv, i);
        for (; i < n; i += kWarpSize) reduce_vectors<kNumRanks, 1>(rows, b0v, b1v, outv, i);
    } else {
        for (int i = lane; i < p.hidden; i += 32) {
            float acc = 0.0f;
#pragma unroll
            for (int r = 0; r < kNumRanks; ++r)
                if (rows[r] != nullptr)
                    acc += __bfloat162float(reinterpret_cast<const volatile __nv_bfloat16*>(rows[r])[i]);
            if (b0 != nullptr) acc += __bfloat162float(b0[token * p.hidden + i]);
            if (b1 != nullptr) acc += __bfloat162float(b1[token * p.hidden + i]);
            out[i] = __float2bfloat16_rn(acc);
        }
    }
    if (p.combined_topk_weights != nullptr && lane < p.num_topk) {
        float w = 0.0f;
#pragma unroll
        for (int r = 0; r < kNumRanks; ++r)
            if (rows[r] != nullptr)
                w += r == me ? p.topk_weights[own_x_row * p.num_topk + lane]
                             : __int_as_float(
                                   ptx::ld_cg(reinterpret_cast<const int*>(rows[r] + p.layout.weights_offset) + lane));
        p.combined_topk_weights[token * p.num_topk + lane] = w;
    }
}

// Receiver side of channel c, whole block: windows of up to 32 consecutive tokens.  Warp 0 builds
// one bit mask per rank (tokens of the window that rank holds) and waits until every ring has the
// window's rows; all warps then reduce the window's tokens (one warp per token); then the heads
// advance.  Window <= ring - chunk + 1 rows, so a sender can always push its next chunk.
template <int kNumRanks, bool kPairs>
__device__ void combine_recv(const CombineParams& p, const RankContext& ctx, int channel) {
    __shared__ uint32_t s_mask[kNumRanks];
    __shared__ int64_t s_head[kNumRanks];
    __shared__ int s_failed;
    const int lane = lane_id(), warp = threadIdx.x / 32, me = ctx.rank;
    const int C = p.layout.num_channels, ring = p.layout.ring_tokens;
    void* own = ctx.peers.base[me];
    const int t_begin = channel_token_begin(p.num_tokens, C, channel);
    const int t_end = channel_token_begin(p.num_tokens, C, channel + 1);
    const int window = min(32, ring - p.chunk_tokens + 1);
    const int64_t own_start = p.recv_chan_start[me * (C + 1) + channel];
    if (threadIdx.x < kNumRanks) s_head[threadIdx.x] = 0;
    if (threadIdx.x == 0) s_failed = 0;

    for (int cursor = t_begin; cursor < t_end; cursor += window) {
        const int n = min(window, t_end - cursor);
        if (warp == 0) {
            const int t = cursor + lane;
            uint32_t mine = 0;
#pragma unroll
            for (int r = 0; r < kNumRanks; ++r) {
                const uint32_t m =
                    __ballot_sync(0xffffffffu, lane < n && p.is_token_in_rank[int64_t(t) * kNumRanks + r]);
                if (lane == r) mine = m;
            }
            if (lane < kNumRanks) {
                s_mask[lane] = mine;
                if (mine != 0 && lane != me) {
                    int64_t v = wait_at_least(IntranodeLayout::tail(own, channel, lane), s_head[lane] + __popc(mine),
                                              ctx.err, kWaitCombineTail, channel, lane);
                    if (v < 0) s_failed = 1;
                }
            }
        }
        __syncthreads();
        if (s_failed) return;
        for (int i = warp; i < n; i += kCombineWarps) {
            const char* rows[kNumRanks];
            int64_t own_x_row = -1;
#pragma unroll
            for (int r = 0; r < kNumRanks; ++r) {
                const uint32_t m = s_mask[r];
                rows[r] = nullptr;
                if ((m >> i) & 1u) {
                    const int64_t k = s_head[r] + __popc(m & ((1u << i) - 1u));  // row of r's channel
                    if (r == me) {
                        own_x_row = own_start + k;
                        rows[r] = static_cast<const char*>(p.x) + own_x_row * p.hidden * 2;
                    } else {
                        rows[r] = p.layout.ring(own, channel, r) + (k % ring) * p.layout.row_bytes;
                    }
                }
            }
            reduce_token<kNumRanks, kPairs>(p, rows, me, own_x_row, cursor + i);
        }
        __syncthreads();
        if (threadIdx.x < kNumRanks && s_mask[threadIdx.x] != 0) {
            s_head[threadIdx.x] += __popc(s_mask[threadIdx.x]);
            if (threadIdx.x != me)
                ptx::st_relaxed_sys(IntranodeLayout::head(own, channel, threadIdx.x), s_head[threadIdx.x]);
        }
    }
    __syncthreads();
    if (threadIdx.x < kNumRanks && threadIdx.x != me && s_head[threadIdx.x] > 0) {
        ptx::st_relaxed_sys(IntranodeLayout::tail(own, channel, threadIdx.x), 0);
        ptx::st_relaxed_sys(IntranodeLayout::head(own, channel, threadIdx.x), 0);
    }
}

// Grid: 2 x C blocks of kCombineThreads; block 2c sends channel c (warp group g serves the g-th
// other rank), block 2c + 1 receives and reduces channel c of the local tokens (all warps together).
template <int kNumRanks, bool kPairs>
__global__ void __launch_bounds__(kCombineThreads, 1)
    combine_kernel(const __grid_constant__ CombineParams p, const __grid_constant__ RankContext ctx) {
    if (has_failed(ctx.err)) return;
    const int channel = blockIdx.x / 2, warp = threadIdx.x / 32;
    if (blockIdx.x % 2 == 0) {
        constexpr int kWarpsPerRank = kSendWarpsPerRank<kNumRanks>;
        const int group = warp / kWarpsPerRank;
        if (group >= kNumRanks - 1) return;
        const int dst = group < ctx.rank ? group : group + 1;
        combine_send<kNumRanks, kPairs>(p, ctx, channel, dst, group, warp % kWarpsPerRank);
    } else {
        combine_recv<kNumRanks, kPairs>(p, ctx, channel);
    }
}

}  // namespace

void launch_combine(const CombineParams& p, const RankContext& ctx, int num_sms, cudaStream_t stream) {
    with_num_ranks(ctx.num_ranks, "combine", [&](auto ranks) {
        if (p.expert_major)
            combine_kernel<decltype(ranks)::value, true><<<num_sms, kCombineThreads, 0, stream>>>(p, ctx);
        else
            combine_kernel<decltype(ranks)::value, false><<<num_sms, kCombineThreads, 0, stream>>>(p, ctx);
    });
    check_cuda(cudaGetLastError(), "combine launch");
}

void load_combine_kernels() {
    load_kernel(combine_kernel<2, false>, "combine kernel");
    load_kernel(combine_kernel<4, false>, "combine kernel");
    load_kernel(combine_kernel<8, false>, "combine kernel");
    load_kernel(combine_kernel<2, true>, "expert-major combine kernel");
    load_kernel(combine_kernel<4, true>, "expert-major combine kernel");
    load_kernel(combine_kernel<8, true>, "expert-major combine kernel");
}

}  // namespace ep_train
