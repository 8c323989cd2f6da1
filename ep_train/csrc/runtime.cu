// Host side of the intranode backend: the NVLink buffer (a PeerBuffer) and the one host sync of a
// layout-free dispatch.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

#include "runtime.hpp"

namespace ep_train {

IntranodeRuntime::IntranodeRuntime(int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_s, void* external)
    : PeerBuffer(rank, num_ranks, std::max<int64_t>(num_nvl_bytes, IntranodeLayout::control_bytes()), timeout_s,
                 "NVLink buffer", external) {
    if (num_ranks != 2 && num_ranks != 4 && num_ranks != 8)  // the kernels' rank-count instantiations
        throw std::invalid_argument("NVLink buffer: 2, 4 or 8 ranks on one node, got " + std::to_string(num_ranks));
    load_layout_kernels();
    load_permute_kernels();
    load_copy_rows_kernels();
    load_notify_kernels();
    load_prepare_kernels();
    load_dispatch_kernels();
    load_combine_kernels();
}

void IntranodeRuntime::clear_recv_ready() {
    mailbox().recv_ready = 0;
}

// The host spins without sleeping this long: the counts of a dispatch come within tens to
// hundreds of microseconds (notify is one exchange after every rank's layout), and a sleep there
// adds its length, rounded up by the OS, to every dispatch (the GPU waits for the host's next
// launch).  Past it (a peer that is late by milliseconds or more) it sleeps between polls.
constexpr double kSpinSeconds = 2e-3;

int IntranodeRuntime::wait_recv(cudaStream_t stream, double timeout_s, int num_local_experts, int* num_recv_tokens,
                                std::vector<int>* per_expert) {
    HostMailbox& box = mailbox();
    const auto start = std::chrono::steady_clock::now();
    for (long iter = 0;; ++iter) {
        if (box.recv_ready) break;
        if (box.code != 0) return box.code;
        if ((iter & 255) == 255) {
            cudaError_t q = cudaStreamQuery(stream);
            if (q != cudaSuccess && q != cudaErrorNotReady) check_cuda(q, "stream of the notify kernel");
            if (q == cudaSuccess && !box.recv_ready) {
                if (box.code != 0) return box.code;
                throw std::runtime_error("notify finished without reporting receive counts");
            }
            const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            if (waited > timeout_s) return -1;
            if (waited > kSpinSeconds) std::this_thread::sleep_for(std::chrono::microseconds(20));
        }
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    *num_recv_tokens = box.num_recv_tokens;
    per_expert->assign(box.num_recv_tokens_per_expert, box.num_recv_tokens_per_expert + num_local_experts);
    return 0;
}

}  // namespace ep_train
