// Plain types shared by host code (runtime, bindings) and kernels: no device code here.
#pragma once

#include <cstdint>

#include "ep_train/buffer_layout.cuh"

namespace ep_train {

enum ErrorCode : int { kErrNone = 0, kErrTimeout = 1, kErrMismatch = 2, kErrCapacity = 3, kErrBadExpert = 4 };

// What a failing wait was waiting for (the host turns it into words).
enum WaitSite : int {
    kWaitBarrier = 1,
    kWaitDispatchSpace = 2,  // dispatch sender: free rows in the peer's ring
    kWaitDispatchTail = 3,   // dispatch receiver: rows from a peer
    kWaitCombineSpace = 4,
    kWaitCombineTail = 5,
    kCheckCallHeader = 6,  // mismatch: `channel` holds the header field index
    kCheckCapacity = 7,    // num_worst_tokens too small: `peer` is the rank that receives too much
    // 8-11: LowLatencySite (low_latency_layout.cuh)
    kCheckExpertIds = 12,  // topk_idx[channel, peer] is neither -1 nor an expert id
};

// Pinned, host-mapped; written by kernels, read by the host after syncs and before calls.
struct HostMailbox {
    volatile int recv_ready;  // notify -> host: the counts below are valid
    int num_recv_tokens;
    int pad0[2];
    int num_recv_tokens_per_expert[kMaxExperts];
    volatile int code;  // ErrorCode of the first failure; written last
    int rank, what, channel, peer, pad1;
    long long expected, seen;
};

struct ErrorSink {
    int* status;           // own buffer's status word (device memory): any kernel that sees it set returns
    HostMailbox* mailbox;  // device pointer of the mapped host mailbox
    int rank;
    long long timeout_cycles;  // clock64 cycles of timeout_s at the SM clock rate
};

struct PeerPtrs {
    void* base[kMaxRanks];  // rank r's NVLink buffer, mapped into this process (own rank: local)
};

struct RankContext {
    int rank;
    int num_ranks;
    PeerPtrs peers;
    ErrorSink err;
};

}  // namespace ep_train
