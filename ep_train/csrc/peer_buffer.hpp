// One rank's device buffer shared with the other ranks of the node, plus the pinned, host-mapped
// error mailbox its kernels report to.  The memory is either its own (cudaMalloc, peers through
// CUDA IPC handles) or adopted (an NVSHMEM symmetric allocation whose peer pointers the caller
// hands over).  The intranode and low-latency runtimes each own one.  No torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "ep_train/types.cuh"

namespace ep_train {

// Throws std::runtime_error naming the CUDA error and the call.
void check_cuda(cudaError_t err, const char* what);

// f(std::integral_constant<int, R>{}) for R = num_ranks: kernels are templates on the rank count.
// Throws std::invalid_argument naming `what` for any count but 2, 4 or 8.
template <typename F>
void with_num_ranks(int num_ranks, const char* what, F&& f) {
    switch (num_ranks) {
        case 2:
            return f(std::integral_constant<int, 2>{});
        case 4:
            return f(std::integral_constant<int, 4>{});
        case 8:
            return f(std::integral_constant<int, 8>{});
    }
    throw std::invalid_argument(std::string(what) + " supports 2, 4 or 8 ranks, got " + std::to_string(num_ranks));
}

class PeerBuffer {
  public:
    // `name` words messages ("NVLink buffer", "low-latency buffer").  1 to kMaxRanks ranks.  With
    // `external` (device memory of at least num_bytes that outlives this object) the buffer adopts
    // it instead of allocating, and its peers come from set_peer_pointers, not IPC handles.
    PeerBuffer(int rank, int num_ranks, int64_t num_bytes, double timeout_s, const char* name,
               void* external = nullptr);
    ~PeerBuffer();
    PeerBuffer(const PeerBuffer&) = delete;
    PeerBuffer& operator=(const PeerBuffer&) = delete;

    std::string ipc_handle() const;                            // bytes of this rank's cudaIpcMemHandle_t
    void open_peers(const std::vector<std::string>& handles);  // every rank's handle, in rank order
    // Adopted memory: every rank's address of the buffer as mapped in this process, in rank order.
    // allow_unmapped: 0 for a rank with no load/store mapping (another node; the low-latency kernels
    // reach it by NVSHMEM puts), else such an entry is refused.
    void set_peer_pointers(const std::vector<uintptr_t>& ptrs, bool allow_unmapped = false);
    // Ranks (bit r) whose entry was 0 in set_peer_pointers.
    uint32_t unmapped_peers() const { return unmapped_; }
    void destroy();  // close peers, free own memory (idempotent)
    bool is_open() const { return opened_; }

    // Pointers and error sink for kernels; `status` is the status word inside this rank's buffer.
    RankContext context(int* status) const;
    void* local() const { return local_; }
    int64_t num_bytes() const { return num_bytes_; }
    int rank() const { return rank_; }
    int device() const { return device_; }
    HostMailbox& mailbox() const { return *mailbox_; }  // host view

    int error_code() const;  // ErrorCode reported by a kernel, 0 if none
    // code, rank, what, channel, peer, expected, seen of the first kernel-reported failure.
    void error_fields(long long out[7]) const;

  private:
    int rank_, num_ranks_, device_ = 0;
    int64_t num_bytes_;
    long long timeout_cycles_ = 0;
    const char* name_;
    void* local_ = nullptr;
    PeerPtrs peers_{};
    HostMailbox* mailbox_ = nullptr;  // host pointer
    HostMailbox* mailbox_dev_ = nullptr;
    bool opened_ = false;
    bool owns_memory_ = true;
    uint32_t unmapped_ = 0;
};

}  // namespace ep_train
