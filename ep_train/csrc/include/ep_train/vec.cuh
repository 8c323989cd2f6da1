// 16-byte vectors of BF16 as FP32 accumulators: the one place the kernels widen and round.
#pragma once

#include <cuda_bf16.h>

namespace ep_train {

// acc[i] += float(v[i]) for the 8 BF16 values of v.
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __bfloat1622float2(h[i]);
        acc[2 * i] += f.x;
        acc[2 * i + 1] += f.y;
    }
}

// 8 FP32 values rounded to nearest-even BF16.
__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
    int4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return v;
}

}  // namespace ep_train
