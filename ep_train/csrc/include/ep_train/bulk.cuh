// Bulk copies through the copy engine (Hopper TMA, cp.async.bulk): one thread moves whole rows
// global -> shared memory -> global, completion tracked by an mbarrier (loads) and bulk groups
// (stores).  No registers hold the data, so an SM keeps far more bytes in flight than with 16-byte
// loads and stores.  Sizes and addresses must be multiples of 16 bytes.
#pragma once

#include <cstdint>

namespace ep_train::bulk {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}

// Make mbarrier initialisation visible to the copy engine (the async proxy).
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// This thread's arrival, announcing `bytes` of copies that will complete on the barrier.
__device__ __forceinline__ void arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Spin until the barrier's phase with parity `parity` has completed.
__device__ __forceinline__ void wait_parity(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "wait_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra wait_%=;\n"
        "}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}

// Global -> shared, completing `bytes` on `bar`.
__device__ __forceinline__ void load(void* smem_dst, const void* global_src, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_addr(smem_dst)),
                 "l"(global_src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

// Shared -> global (local or a peer's memory mapped into this process), in the current bulk group.
__device__ __forceinline__ void store(void* global_dst, const void* smem_src, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(global_dst),
                 "r"(smem_addr(smem_src)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void commit() {
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Wait until at most kPending of this thread's bulk groups still read shared memory.
template <int kPending>
__device__ __forceinline__ void wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}

// Wait until at most kPending of this thread's bulk groups are still writing (writes performed).
template <int kPending>
__device__ __forceinline__ void wait_written() {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
}

}  // namespace ep_train::bulk
