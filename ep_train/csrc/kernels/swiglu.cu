// SwiGLU of the grouped-GEMM experts (ep_train.moe.swiglu): out[r] = silu(a[r]) * b[r] * p[r]
// for h[r] = [a | b] (F channels each, BF16) and p[r] the row's gate probability (FP32; none = 1),
// in FP32 with one rounding per output, instead of one op (and one rounding) per factor.  The
// backward writes grad_h[r] = [da | db] and grad_p[r] (the row's sum of g * silu(a) * b) in one
// pass.  One warp per row; a lane owns 8-channel (16-byte) chunks of a, b, g and the outputs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "ep_train/vec.cuh"
#include "runtime.hpp"

namespace ep_train {

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxBlocks = 132 * 16;  // grid-stride beyond this

__device__ __forceinline__ void widen8(const int4& v, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ float sigmoid(float x) {
    return 1.0f / (1.0f + expf(-x));
}

// This warp's rows: r = first_row(), + row_step(), ... < rows.
__device__ __forceinline__ int64_t first_row() {
    return int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
}
__device__ __forceinline__ int64_t row_step() {
    return int64_t(gridDim.x) * kWarpsPerBlock;
}

// Row r of h as 16-byte chunks: a = h[r, :F], b = h[r, F:]; and its probability (1 without probs).
struct GatedRow {
    const int4* a;
    const int4* b;
    float scale;
};
__device__ __forceinline__ GatedRow gated_row(const __nv_bfloat16* h, const float* p, int64_t r, int ffn) {
    const int4* a = reinterpret_cast<const int4*>(h + r * 2 * ffn);
    return {a, a + ffn / 8, p != nullptr ? p[r] : 1.0f};
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    swiglu_forward_kernel(const __nv_bfloat16* __restrict__ h, const float* __restrict__ p,
                          __nv_bfloat16* __restrict__ out, int64_t rows, int ffn) {
    const int lane = threadIdx.x % 32, chunks = ffn / 8;
    for (int64_t r = first_row(); r < rows; r += row_step()) {
        const GatedRow row = gated_row(h, p, r, ffn);
        int4* o_row = reinterpret_cast<int4*>(out + r * ffn);
        for (int c = lane; c < chunks; c += 32) {
            float a[8], b[8], y[8];
            widen8(row.a[c], a);
            widen8(row.b[c], b);
#pragma unroll
            for (int i = 0; i < 8; ++i) y[i] = a[i] * sigmoid(a[i]) * b[i] * row.scale;
            o_row[c] = pack_bf16x8(y);
        }
    }
}

// d/da silu(a) = s (1 + a (1 - s)) with s = sigmoid(a).
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    swiglu_backward_kernel(const __nv_bfloat16* __restrict__ h, const float* __restrict__ p,
                           const __nv_bfloat16* __restrict__ grad_out, __nv_bfloat16* __restrict__ grad_h,
                           float* __restrict__ grad_p, int64_t rows, int ffn) {
    const int lane = threadIdx.x % 32, chunks = ffn / 8;
    for (int64_t r = first_row(); r < rows; r += row_step()) {
        const GatedRow row = gated_row(h, p, r, ffn);
        const float scale = row.scale;
        const int4* g_row = reinterpret_cast<const int4*>(grad_out + r * ffn);
        int4* da_row = reinterpret_cast<int4*>(grad_h + r * 2 * ffn);
        int4* db_row = da_row + chunks;
        float dp = 0.0f;
        for (int c = lane; c < chunks; c += 32) {
            float a[8], b[8], g[8], da[8], db[8];
            widen8(row.a[c], a);
            widen8(row.b[c], b);
            widen8(g_row[c], g);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float s = sigmoid(a[i]), silu = a[i] * s;
                dp += g[i] * silu * b[i];
                da[i] = g[i] * scale * b[i] * s * (1.0f + a[i] * (1.0f - s));
                db[i] = g[i] * scale * silu;
            }
            da_row[c] = pack_bf16x8(da);
            db_row[c] = pack_bf16x8(db);
        }
        if (grad_p != nullptr) {
            for (int off = 16; off > 0; off >>= 1) dp += __shfl_xor_sync(0xffffffffu, dp, off);
            if (lane == 0) grad_p[r] = dp;
        }
    }
}

int grid_for(int64_t rows) {
    return static_cast<int>(std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
}

}  // namespace

void launch_swiglu_forward(const void* h, const float* probs, void* out, int64_t rows, int ffn, cudaStream_t stream) {
    if (ffn % 8 != 0) throw std::runtime_error("swiglu: the FFN size must be a multiple of 8");
    if (rows == 0 || ffn == 0) return;
    swiglu_forward_kernel<<<grid_for(rows), kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(h), probs, static_cast<__nv_bfloat16*>(out), rows, ffn);
    check_cuda(cudaGetLastError(), "swiglu forward launch");
}

void launch_swiglu_backward(const void* h, const float* probs, const void* grad_out, void* grad_h, float* grad_probs,
                            int64_t rows, int ffn, cudaStream_t stream) {
    if (ffn % 8 != 0) throw std::runtime_error("swiglu: the FFN size must be a multiple of 8");
    if (rows == 0) return;
    swiglu_backward_kernel<<<grid_for(rows), kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(h), probs, static_cast<const __nv_bfloat16*>(grad_out),
        static_cast<__nv_bfloat16*>(grad_h), grad_probs, rows, ffn);
    check_cuda(cudaGetLastError(), "swiglu backward launch");
}

}  // namespace ep_train
