// One rank's device buffer shared with the other ranks of the node through CUDA IPC, plus the
// pinned, host-mapped error mailbox its kernels report to.  The intranode and low-latency
// runtimes each own one.  No torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ep_train/types.cuh"

namespace ep_train {

// Throws std::runtime_error naming the CUDA error and the call.
void check_cuda(cudaError_t err, const char* what);

class PeerBuffer {
  public:
    // `name` words messages ("NVLink buffer", "low-latency buffer").  2, 4 or 8 ranks.
    PeerBuffer(int rank, int num_ranks, int64_t num_bytes, double timeout_s, const char* name);
    ~PeerBuffer();
    PeerBuffer(const PeerBuffer&) = delete;
    PeerBuffer& operator=(const PeerBuffer&) = delete;

    std::string ipc_handle() const;                            // bytes of this rank's cudaIpcMemHandle_t
    void open_peers(const std::vector<std::string>& handles);  // every rank's handle, in rank order
    void destroy();                                            // close peers, free memory (idempotent)
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
};

}  // namespace ep_train
