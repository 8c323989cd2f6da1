// Warp-level helpers: row copies with many 16-byte accesses in flight, reductions, bit positions.
#pragma once

#include <cstdint>

#include "ep_train/ptx.cuh"

namespace ep_train {

constexpr int kWarpSize = 32;

__device__ __forceinline__ int lane_id() {
    return threadIdx.x % kWarpSize;
}

// Position of the (n+1)-th set bit of mask (n counted from 0); mask must have more than n bits.
__device__ __forceinline__ int nth_set_bit(uint32_t mask, int n) {
    return __fns(mask, 0, n + 1);
}

// Warp copies `num_bytes` from a read-only source to dst.  16-byte path when both are 16-byte
// aligned and num_bytes % 16 == 0, else 2-byte elements (hidden sizes that are not a multiple of 8).
// NOTES: kUnroll independent loads are issued before the first store to keep NVLink busy.
template <int kUnroll, bool kSrcIsRing>
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int64_t num_bytes) {
    const int lane = lane_id();
    bool vec = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | num_bytes) & 15) == 0;
    if (vec) {
        const int4* s = static_cast<const int4*>(src);
        int4* d = static_cast<int4*>(dst);
        const int n = static_cast<int>(num_bytes / 16);
        int i = lane;
        for (; i + (kUnroll - 1) * kWarpSize < n; i += kUnroll * kWarpSize) {
            int4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                v[u] = kSrcIsRing ? ptx::ld_cg_v4(s + i + u * kWarpSize) : ptx::ld_nc_v4(s + i + u * kWarpSize);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) ptx::st_na_v4(d + i + u * kWarpSize, v[u]);
        }
        for (; i < n; i += kWarpSize) ptx::st_na_v4(d + i, kSrcIsRing ? ptx::ld_cg_v4(s + i) : ptx::ld_nc_v4(s + i));
    } else {
        const volatile uint16_t* s = static_cast<const uint16_t*>(src);
        uint16_t* d = static_cast<uint16_t*>(dst);
        for (int64_t i = lane; i < num_bytes / 2; i += kWarpSize) d[i] = s[i];
        if ((num_bytes & 1) && lane == 0)
            static_cast<char*>(dst)[num_bytes - 1] = static_cast<const volatile char*>(src)[num_bytes - 1];
    }
}

// Warp copies one row to dsts[0 .. count) (warp-uniform, e.g. in shared memory), reading it once.
// 16-byte path when src, num_bytes and every destination are 16-byte aligned, else 2-byte elements.
template <int kUnroll, bool kSrcIsRing>
__device__ __forceinline__ void warp_copy_fanout(char* const* dsts, int count, bool aligned, const void* src,
                                                 int64_t num_bytes) {
    const int lane = lane_id();
    if (aligned && ((reinterpret_cast<uintptr_t>(src) | num_bytes) & 15) == 0) {
        const int4* s = static_cast<const int4*>(src);
        const int n = static_cast<int>(num_bytes / 16);
        int i = lane;
        for (; i + (kUnroll - 1) * kWarpSize < n; i += kUnroll * kWarpSize) {
            int4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                v[u] = kSrcIsRing ? ptx::ld_cg_v4(s + i + u * kWarpSize) : ptx::ld_nc_v4(s + i + u * kWarpSize);
            for (int b = 0; b < count; ++b) {
                int4* d = reinterpret_cast<int4*>(dsts[b]) + i;
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) ptx::st_na_v4(d + u * kWarpSize, v[u]);
            }
        }
        for (; i < n; i += kWarpSize) {
            const int4 v = kSrcIsRing ? ptx::ld_cg_v4(s + i) : ptx::ld_nc_v4(s + i);
            for (int b = 0; b < count; ++b) ptx::st_na_v4(reinterpret_cast<int4*>(dsts[b]) + i, v);
        }
    } else {
        const volatile uint16_t* s = static_cast<const uint16_t*>(src);
        for (int b = 0; b < count; ++b) {
            char* d = dsts[b];
            for (int64_t i = lane; i < num_bytes / 2; i += kWarpSize) reinterpret_cast<uint16_t*>(d)[i] = s[i];
            if ((num_bytes & 1) && lane == 0) d[num_bytes - 1] = static_cast<const volatile char*>(src)[num_bytes - 1];
        }
    }
}

}  // namespace ep_train
