// Bounded waits and the error mailbox: no spin-wait runs forever, and the first failure is
// reported (code, rank, channel, peer, expected, seen) to pinned host memory before the kernel
// returns early, so the CUDA context survives and the host raises a Python exception.
#pragma once

#include <cstdint>

#include "ep_train/ptx.cuh"
#include "ep_train/types.cuh"

namespace ep_train {

__device__ __forceinline__ bool has_failed(const ErrorSink& e) {
    return ptx::ld_volatile(e.status) != 0;
}

static __device__ __noinline__ void report_error(const ErrorSink& e, int code, int what, int channel, int peer,
                                                 long long expected, long long seen) {
    if (atomicCAS(e.status, 0, code) != 0) return;  // first failure wins
    HostMailbox* m = e.mailbox;
    m->rank = e.rank;
    m->what = what;
    m->channel = channel;
    m->peer = peer;
    m->expected = expected;
    m->seen = seen;
    __threadfence_system();
    m->code = code;
    __threadfence_system();
}

// Spin until *p >= target (acquire, system scope) and return *p.  Returns -1, after reporting, on timeout or
// when another thread already failed.
__device__ __forceinline__ int64_t wait_at_least(const int64_t* p, int64_t target, const ErrorSink& e, int what,
                                                 int channel, int peer) {
    int64_t v = ptx::ld_acquire_sys(p);
    if (v >= target) return v;
    const long long start = clock64();
    for (int iter = 1;; ++iter) {
        v = ptx::ld_acquire_sys(p);
        if (v >= target) return v;
        if ((iter & 63) == 0) {
            if (has_failed(e)) return -1;
            if (clock64() - start > e.timeout_cycles) {
                report_error(e, kErrTimeout, what, channel, peer, target, v);
                return -1;
            }
        }
    }
}

}  // namespace ep_train
