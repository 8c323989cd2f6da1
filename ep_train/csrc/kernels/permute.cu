// sum_pairs: out[n, :] = sum over k of y[pos[n, k], :] for the pairs of received row n (pos < P),
// FP32 accumulation, pairs added in ascending k starting from 0.0f -- the exact order of the
// op-by-op path in ep_train/permute.py, so both give the same bits.  One block per row; each thread
// owns 16-byte column chunks and reads every pair's chunk once.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdexcept>

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

}  // namespace ep_train
