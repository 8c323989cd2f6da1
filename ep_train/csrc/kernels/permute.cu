// sum_pairs: out[n, :] = sum over k of y[pos[n, k], :] for the pairs of received row n (pos < P),
// FP32 accumulation, pairs added in ascending k starting from 0.0f -- the exact order of the
// op-by-op path in ep_train/permute.py, so both give the same bits.  One block per row; each thread
// owns 16-byte column chunks and reads every pair's chunk once.
//
// pair_layout: the expert-major place of every (received row, top-k column) pair -- the same
// numbers as the op-by-op path of ep_train/permute.py (pairs of an expert in ascending slot
// n * K + k, each expert's rows padded to the alignment) in three launches instead of ~25 ops:
// per block of 1024 slots the pairs per expert, then one block turns those into each block's first
// row per expert (and writes the padding rows), then every block places its slots.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ep_train/vec.cuh"
#include "runtime.hpp"

namespace ep_train {

namespace {

constexpr int kSumThreads = 128;
constexpr int kMaxPairs = 32;  // top-k of one row

template <typename T>
struct Vec;  // 16 bytes of T as FP32 accumulators
template <>
struct Vec<__nv_bfloat16> {
    static constexpr int kElems = 8;
    __device__ static void add(float (&acc)[8], const int4& v) { add_bf16x8(acc, v); }
    __device__ static int4 pack(const float (&acc)[8]) { return pack_bf16x8(acc); }
};
template <>
struct Vec<float> {
    static constexpr int kElems = 4;
    __device__ static void add(float (&acc)[4], const int4& v) {
        acc[0] += __int_as_float(v.x);
        acc[1] += __int_as_float(v.y);
        acc[2] += __int_as_float(v.z);
        acc[3] += __int_as_float(v.w);
    }
    __device__ static int4 pack(const float (&acc)[4]) {
        return make_int4(__float_as_int(acc[0]), __float_as_int(acc[1]), __float_as_int(acc[2]),
                         __float_as_int(acc[3]));
    }
};

template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    sum_pairs_kernel(const T* __restrict__ y, const int64_t* __restrict__ pos, T* __restrict__ out, int num_topk,
                     int64_t num_pair_rows, int hidden) {
    __shared__ int64_t s_rows[kMaxPairs];
    __shared__ int s_count;
    const int64_t n = blockIdx.x;
    if (threadIdx.x == 0) {
        int c = 0;
        for (int k = 0; k < num_topk; ++k) {
            int64_t p = pos[n * num_topk + k];
            if (p >= 0 && p < num_pair_rows) s_rows[c++] = p;
        }
        s_count = c;
    }
    __syncthreads();
    const int count = s_count;
    constexpr int kElems = Vec<T>::kElems;
    const int chunks = hidden / kElems;  // the host sends hidden % kElems != 0 to the op-by-op path
    int4* out_row = reinterpret_cast<int4*>(out + n * hidden);
    for (int c = threadIdx.x; c < chunks; c += kSumThreads) {
        float acc[kElems];
#pragma unroll
        for (int i = 0; i < kElems; ++i) acc[i] = 0.0f;
        for (int j = 0; j < count; ++j) {
            const int4 v = __ldg(reinterpret_cast<const int4*>(y + s_rows[j] * hidden) + c);
            Vec<T>::add(acc, v);
        }
        out_row[c] = Vec<T>::pack(acc);
    }
}

constexpr int kPlaceThreads = 1024;  // slots per block in the pair layout launches
constexpr int kPlaceWarps = kPlaceThreads / 32;

__device__ __forceinline__ int local_expert(const int64_t* idx, int64_t q, int64_t num_slots, int num_local) {
    const int64_t e = q < num_slots ? idx[q] : -1;
    return e >= 0 && e < num_local ? static_cast<int>(e) : -1;
}

// counts[b][l] = pairs of local expert l among slots [b * 1024, (b + 1) * 1024).
__global__ void __launch_bounds__(kPlaceThreads)
    pair_count_kernel(const int64_t* __restrict__ idx, int64_t num_slots, int num_local, int* __restrict__ counts) {
    extern __shared__ int s_count[];  // [L]
    for (int l = threadIdx.x; l < num_local; l += kPlaceThreads) s_count[l] = 0;
    __syncthreads();
    const int e = local_expert(idx, int64_t(blockIdx.x) * kPlaceThreads + threadIdx.x, num_slots, num_local);
    if (e >= 0) atomicAdd(&s_count[e], 1);
    __syncthreads();
    for (int l = threadIdx.x; l < num_local; l += kPlaceThreads)
        counts[int64_t(blockIdx.x) * num_local + l] = s_count[l];
}

// One block.  counts[b][l] becomes the first expert-major row of block b's pairs of expert l;
// expert l's rows start at the sum of the aligned pair counts of the experts before it.  Padding
// rows (after an expert's pairs, up to its aligned count) get row num_rows and pair num_slots.
// Rows at or past num_pair_rows (the host's total, from the dispatch's counts) are never written.
// ranks_only: every expert starts at 0 (each pair's rank within its expert) and nothing is padded.
__global__ void __launch_bounds__(kPlaceThreads)
    pair_scan_kernel(int* __restrict__ counts, int num_blocks, int num_local, int alignment, int64_t num_rows,
                     int64_t num_slots, int64_t num_pair_rows, bool ranks_only, int64_t* __restrict__ row_P,
                     int64_t* __restrict__ pair_P) {
    extern __shared__ int64_t s_start[];  // [L + 1]
    for (int l = threadIdx.x; l < num_local; l += kPlaceThreads) {
        int64_t total = 0;
        for (int b = 0; b < num_blocks; ++b) total += counts[int64_t(b) * num_local + l];
        s_start[l + 1] = ranks_only ? 0 : total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // L is at most a few hundred: a serial prefix is cheapest
        s_start[0] = 0;
        for (int l = 0; l < num_local; ++l) {
            const int64_t aligned = (s_start[l + 1] + alignment - 1) / alignment * alignment;
            s_start[l + 1] = s_start[l] + aligned;
        }
    }
    __syncthreads();
    for (int l = threadIdx.x; l < num_local; l += kPlaceThreads) {
        int64_t row = s_start[l];
        for (int b = 0; b < num_blocks; ++b) {
            const int c = counts[int64_t(b) * num_local + l];
            counts[int64_t(b) * num_local + l] = static_cast<int>(row);
            row += c;
        }
        for (int64_t pad = row; !ranks_only && pad < s_start[l + 1] && pad < num_pair_rows; ++pad) {
            row_P[pad] = num_rows;
            pair_P[pad] = num_slots;
        }
    }
}

// Slot q = n * K + k of block b: its pair goes to row first[b][l] + (pairs of expert l before it in
// this block); pos[q] = num_pair_rows where there is no pair.  Ranks within a warp come from
// __match_any_sync, across warps from a [warp][expert] count table in shared memory.  ranks_only:
// pos alone (row_P and pair_P are not written).
__global__ void __launch_bounds__(kPlaceThreads)
    pair_place_kernel(const int64_t* __restrict__ idx, int64_t num_slots, int num_topk, int num_local,
                      const int* __restrict__ first, int64_t num_pair_rows, bool ranks_only, int64_t* __restrict__ pos,
                      int64_t* __restrict__ row_P, int64_t* __restrict__ pair_P) {
    extern __shared__ int s_warp_count[];  // [kPlaceWarps][L]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = threadIdx.x; i < kPlaceWarps * num_local; i += kPlaceThreads) s_warp_count[i] = 0;
    __syncthreads();
    const int64_t q = int64_t(blockIdx.x) * kPlaceThreads + threadIdx.x;
    const int e = local_expert(idx, q, num_slots, num_local);
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const int rank_in_warp = __popc(same & ((1u << lane) - 1u));
    if (e >= 0 && rank_in_warp == 0) s_warp_count[warp * num_local + e] = __popc(same);
    __syncthreads();
    if (q >= num_slots) return;
    if (e < 0) {
        pos[q] = num_pair_rows;
        return;
    }
    int64_t row = first[int64_t(blockIdx.x) * num_local + e] + rank_in_warp;
    for (int w = 0; w < warp; ++w) row += s_warp_count[w * num_local + e];
    if (row >= num_pair_rows) {  // counts that disagree with the host's total: no write out of bounds
        pos[q] = num_pair_rows;
        return;
    }
    pos[q] = row;
    if (ranks_only) return;
    row_P[row] = q / num_topk;
    pair_P[row] = q;
}
}  // namespace

void launch_sum_pairs(const void* y, const int64_t* pos, void* out, bool bf16, int64_t num_rows, int num_topk,
                      int64_t num_pair_rows, int hidden, cudaStream_t stream) {
    if (num_rows == 0) return;
    if (num_topk > kMaxPairs) throw std::runtime_error("sum_pairs: num_topk must be <= 32");
    if (bf16)
        sum_pairs_kernel<__nv_bfloat16><<<num_rows, kSumThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(y), pos,
                                                                              static_cast<__nv_bfloat16*>(out),
                                                                              num_topk, num_pair_rows, hidden);
    else
        sum_pairs_kernel<float><<<num_rows, kSumThreads, 0, stream>>>(
            static_cast<const float*>(y), pos, static_cast<float*>(out), num_topk, num_pair_rows, hidden);
    check_cuda(cudaGetLastError(), "sum_pairs launch");
}

int64_t pair_layout_scratch_ints(int64_t num_slots, int num_local) {
    return std::max<int64_t>((num_slots + kPlaceThreads - 1) / kPlaceThreads * num_local, 1);
}

namespace {

// The pair layout (ranks_only false) or each pair's rank within its expert (ranks_only: every
// expert starts at row 0, no padding, only pos is written).
void launch_pair_kernels(const int64_t* idx, int64_t num_rows, int num_topk, int num_local, int alignment,
                         int64_t num_pair_rows, bool ranks_only, int* scratch, int64_t* pos, int64_t* row_P,
                         int64_t* pair_P, cudaStream_t stream) {
    const int64_t num_slots = num_rows * num_topk;
    if (num_slots == 0 && num_pair_rows == 0) return;
    if (num_local < 1 || num_local > kPairLayoutMaxLocalExperts || alignment < 1)
        throw std::runtime_error("pair_layout: num_local must be in [1, " + std::to_string(kPairLayoutMaxLocalExperts) +
                                 "] and alignment >= 1");
    if (num_pair_rows > INT32_MAX) throw std::runtime_error("pair_layout: more than 2^31 - 1 expert-major rows");
    const int64_t blocks = (num_slots + kPlaceThreads - 1) / kPlaceThreads;
    if (blocks > INT32_MAX) throw std::runtime_error("pair_layout: too many pair slots");
    const int num_blocks = static_cast<int>(blocks);
    if (num_blocks > 0) {
        pair_count_kernel<<<num_blocks, kPlaceThreads, num_local * sizeof(int), stream>>>(idx, num_slots, num_local,
                                                                                          scratch);
        check_cuda(cudaGetLastError(), "pair_count launch");
    }
    pair_scan_kernel<<<1, kPlaceThreads, (num_local + 1) * sizeof(int64_t), stream>>>(
        scratch, num_blocks, num_local, alignment, num_rows, num_slots, num_pair_rows, ranks_only, row_P, pair_P);
    check_cuda(cudaGetLastError(), "pair_scan launch");
    if (num_blocks > 0) {
        pair_place_kernel<<<num_blocks, kPlaceThreads, kPlaceWarps * num_local * sizeof(int), stream>>>(
            idx, num_slots, num_topk, num_local, scratch, num_pair_rows, ranks_only, pos, row_P, pair_P);
        check_cuda(cudaGetLastError(), "pair_place launch");
    }
}

}  // namespace

void launch_pair_layout(const int64_t* idx, int64_t num_rows, int num_topk, int num_local, int alignment,
                        int64_t num_pair_rows, int* scratch, int64_t* pos, int64_t* row_P, int64_t* pair_P,
                        cudaStream_t stream) {
    launch_pair_kernels(idx, num_rows, num_topk, num_local, alignment, num_pair_rows, false, scratch, pos, row_P,
                        pair_P, stream);
}

void launch_expert_ranks(const int64_t* idx, int64_t num_tokens, int num_topk, int num_experts, int* scratch,
                         int64_t* rank, cudaStream_t stream) {
    // Every rank is below num_slots, the bound the place kernel checks.
    const int64_t num_slots = num_tokens * num_topk;
    launch_pair_kernels(idx, num_tokens, num_topk, num_experts, 1, num_slots, true, scratch, rank, nullptr, nullptr,
                        stream);
}

void load_permute_kernels() {
    load_kernel(sum_pairs_kernel<__nv_bfloat16>, "sum_pairs kernel");
    load_kernel(sum_pairs_kernel<float>, "sum_pairs kernel");
    load_kernel(pair_count_kernel, "pair layout kernel");
    load_kernel(pair_scan_kernel, "pair layout kernel");
    load_kernel(pair_place_kernel, "pair layout kernel");
}

}  // namespace ep_train
