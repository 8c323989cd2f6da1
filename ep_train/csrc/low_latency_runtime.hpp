// Host side of the low-latency (single-node) kernels: the low-latency buffer (CUDA IPC, or an
// adopted NVSHMEM symmetric allocation) and the kernel launchers.  No torch headers: raw pointers
// only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ep_train/buffer_layout.cuh"
#include "ep_train/low_latency_layout.cuh"
#include "ep_train/types.cuh"
#include "peer_buffer.hpp"

namespace ep_train {

// Phase boundaries a traced launch records (LowLatencyRuntime::set_trace): block 0 starts, has
// begun the send (counter and acks read), has sent its rows, has signalled its arrival to every
// destination, has seen every source's arrivals, has received, has acknowledged; block 0 ends.
enum LowLatencyTracePoint : int {
    kTraceStart = 0,
    kTraceBegun,
    kTraceSent,
    kTraceSignalled,
    kTraceSourcesSeen,
    kTraceReceived,
    kTraceAcked,
    kTraceEnd,
    kTracePoints
};

// How the low-latency kernels reach the ranks in `peers` (bit r = rank r); the others get plain
// stores through their peer pointers.  kRmaNvshmem: NVSHMEM device puts and signals (peers with no
// load/store mapping, i.e. on other nodes; the buffer is then NVSHMEM symmetric memory); the rows
// are staged in the buffer's send areas first, as a network put reads only symmetric memory.
// kRmaPeerCopies: the same staged protocol with each put done as a copy through the peer pointer,
// so it runs where NVSHMEM does not (the one-GPU group tests it).
enum LowLatencyRmaImpl : int { kRmaNone = 0, kRmaPeerCopies = 1, kRmaNvshmem = 2 };
struct LowLatencyRma {
    uint32_t peers = 0;
    int impl = kRmaNone;
};

// Whether ep_train._C was built with NVSHMEM's device library (kRmaNvshmem available).
bool nvshmem_device_compiled();

// The low-latency buffer: its own PeerBuffer, so normal and low-latency calls never share memory.
class LowLatencyRuntime : public PeerBuffer {
  public:
    // external: memory to adopt (see PeerBuffer), e.g. from nvshmem::malloc; null = cudaMalloc.
    LowLatencyRuntime(int rank, int num_ranks, int64_t num_bytes, double timeout_s, void* external = nullptr);

    RankContext context() const { return PeerBuffer::context(LowLatencyLayout::status(local())); }
    // Blocks of every launch: all SMs unless set (1 .. SM count); every rank must use the same.
    // ep_train.testing.one_gpu gives each of the ranks sharing one GPU its share.
    int num_sms() const { return num_sms_; }
    void set_num_sms(int num_sms);
    // Device memory of int64 [2 ops (dispatch, combine)][kTracePoints] or null: the kernels write
    // the global timer (ns) at their phase boundaries there (a diagnostic; see low_latency.cu).
    void set_trace(int64_t* trace) { trace_ = trace; }
    // Throws std::invalid_argument on a mask beyond the ranks or an impl this build lacks.
    void set_rma(uint32_t peers, int impl);
    LowLatencyRma rma() const { return rma_; }
    int64_t* trace(int op) const { return trace_ == nullptr ? nullptr : trace_ + op * kTracePoints; }

  private:
    int num_sms_ = 0;
    int64_t* trace_ = nullptr;
    LowLatencyRma rma_;
};

// Loads both low-latency kernels now (see load_kernel in runtime.hpp); the runtime does so when created.
void load_low_latency_kernels();

// Phases of one low-latency kernel launch: send only (hook mode), receive only (the hook), or both.
enum LowLatencyPhase : int { kPhaseSend = 1, kPhaseRecv = 2, kPhaseBoth = 3 };

struct LowLatencyDispatchParams {
    const void* x;               // [T, H] BF16
    const int64_t* topk_idx;     // [T, K], -1 = none
    const float* topk_weights;   // [T, K] or null
    void* recv_x;                // [L, R*M, H] BF16 or e4m3
    float* recv_scales;          // [L, R*M, S] (FP8) or null
    int* recv_src_info;          // [L, R*M]
    int* recv_topk_pos;          // [L, R*M]
    float* recv_topk_weights;    // [L, R*M]
    int64_t* recv_layout_range;  // [L, R]
    int* recv_count;             // [L]
    // [R*M, K] or null: the slot l * R*M + j of each (source s * M + token, top-k column), for a
    // combine with sums per rank.  Only entries whose slot holds them are written: the combine
    // checks an entry against the slot's source, token and column before using it.
    int* slot_of;
    int* cumulative_stats;  // [L] or null
    int64_t* call_seq;      // [1]: the send phase stores this call's sequence, the receive reads it
    int64_t* trace;         // [kTracePoints] or null
    int num_tokens, num_topk, num_experts;
    bool use_fp8, round_scale;
    int64_t info[kInfoWords];
    LowLatencyLayout layout;
    LowLatencyRma rma;
};
void launch_low_latency_dispatch(const LowLatencyDispatchParams& p, const RankContext& ctx, int phases, int num_sms,
                                 cudaStream_t stream);

struct LowLatencyCombineParams {
    const void* x;                     // [L, R*M, H] BF16 expert outputs
    const int* recv_src_info;          // [L, R*M] of the dispatch handle
    const int* recv_topk_pos;          // [L, R*M]
    const int64_t* recv_layout_range;  // [L, R]
    const int64_t* topk_idx;           // [T, K]
    const float* topk_weights;         // [T, K] (not read with sums per rank: may be null then)
    // Sums per rank when slot_of is set: each expert rank sums the rows of a token's experts it
    // holds, weighted by the dispatch's slot weights (FP32, ascending top-k column), and sends one
    // BF16 row per (token, rank); the token's rank adds those rows in ascending rank order.
    const int* slot_of;         // [R*M, K] of the dispatch, or null: one row per slot
    const float* slot_weights;  // [L, R*M] of the dispatch, or null: every row weighted 1
    void* out;                  // [T, H] BF16
    int64_t* call_seq;          // [1]
    int64_t* trace;             // [kTracePoints] or null
    int num_tokens, num_topk, num_experts;
    int64_t info[kInfoWords];
    LowLatencyLayout layout;
    LowLatencyRma rma;
};
void launch_low_latency_combine(const LowLatencyCombineParams& p, const RankContext& ctx, int phases, int num_sms,
                                cudaStream_t stream);

}  // namespace ep_train
