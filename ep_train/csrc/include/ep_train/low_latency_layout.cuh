// Byte layout of the low-latency buffer (the `num_rdma_bytes` region every peer maps): the single source of
// truth for offsets on host and device.  Mirrors ep_train/layout.py (low_latency_* functions);
// tests/gpu/test_low_latency_gpu.py compares both.
//
// Per rank:
//   [control: status int32, LL sequence int64, finish counters int32[2 phases][2 halves],
//             received int64[2 halves] (receive blocks that finished on the half, over all calls),
//             acks int64[2 halves][kMaxRanks] (ack[h][s]: last call on half h whose receive rank s
//             finished; one writer per word, and calls on a half complete in order),
//             header slots [2 halves][kMaxRanks sources] (call header, arrivals, grid size)]
//   [half 0][half 1], each:
//     [counts:   int32 [L][R]          rows source s put into local expert l (dispatch)]
//     [slots:    [L][R][M] x 16 bytes  dispatch slot headers: token, top-k column, gate weight]
//     [tokens:   [R][M] rows           token t of source s, once however many local experts it
//                                      has here: a BF16 row, or an FP8 row + its scales]
//     [combine:  [M][kMaxTopk] rows    one BF16 row per (token, top-k column) of the owner; with
//                                      sums per rank, row token * R + r from rank r]
//     with RMA staging (peers reached by NVSHMEM puts, whose source must be symmetric memory):
//     [send tokens:  [M] rows            this rank's dispatched rows, as they are put]
//     [send combine: [L][R][M] rows      this rank's expert outputs, as they are put (sums per
//                                        rank: row s * M + t for token t of source s)]
// NOTES: the control part never moves, whatever the call's shape, so a header written by a rank
// that disagrees on the shape is still read where it is expected and reported as a mismatch.
#pragma once

#include <cstdint>

#include "ep_train/buffer_layout.cuh"

namespace ep_train {

// What a failing low-latency wait or check was about (continues WaitSite of types.cuh).
enum LowLatencySite : int {
    kWaitLowLatencyAck = 8,       // sender: the receiver still reads this half (more than two calls in flight)
    kWaitLowLatencyDispatch = 9,  // dispatch receiver: every block of a source has sent its rows
    kWaitLowLatencyCombine = 10,  // combine receiver: every block of an expert rank has sent its rows
    kCheckLowLatencySlots = 11,   // a source puts more than M rows into one expert (duplicate expert ids)
};  // 12: kCheckExpertIds of WaitSite

// Slot header of a dispatched row: which token and top-k column it is, and its gate weight.
struct LowLatencySlotHeader {
    int src_token;
    int topk_pos;
    float weight;
    int pad;
};

struct LowLatencyLayout {
    static constexpr int64_t kStatusOffset = 0;
    static constexpr int64_t kSeqOffset = 8;
    static constexpr int64_t kDoneOffset = 16;          // int32 [2 phases (send, recv)][2 halves]
    static constexpr int64_t kReceivedOffset = 32;      // int64 [2 halves]
    static constexpr int64_t kAckOffset = kAlignBytes;  // int64 [2 halves][kMaxRanks]: 128 bytes
    // int64 info[kInfoWords], then arrivals (blocks of the source that finished sending into this
    // half, counted over every call: kGridWord blocks per call) and the source's grid size.
    static constexpr int64_t kHeaderSlotBytes = kAlignBytes;
    static constexpr int64_t kHeaderArrivalsWord = kInfoWords;
    static constexpr int64_t kHeaderGridWord = kInfoWords + 1;
    static constexpr int64_t kHeadersOffset = 2 * kAlignBytes;
    static constexpr int64_t kControlBytes = kHeadersOffset + 2 * kMaxRanks * kHeaderSlotBytes;
    static_assert(kAckOffset + 2 * kMaxRanks * 8 <= kHeadersOffset, "the acks fit before the header slots");
    static_assert(kMaxRanks <= kMaxTopk, "a combine with sums per rank puts its R rows per token in the combine area");

    int num_ranks = 0;
    int num_local_experts = 0;
    int max_tokens = 0;  // M
    int hidden = 0;
    int64_t token_row_bytes = 0;
    int64_t combine_row_bytes = 0;
    int64_t counts_bytes = 0;
    int64_t slots_bytes = 0;
    int64_t tokens_bytes = 0;
    int64_t combine_bytes = 0;
    int64_t send_tokens_bytes = 0;   // 0 without RMA staging
    int64_t send_combine_bytes = 0;  // 0 without RMA staging
    // Bytes from half 0 to half 1: half_bytes() for sizing; the runtime sets it from its buffer's
    // size, so every call puts its halves at the same offsets whatever its shape.  NOTES: packed
    // halves moved with the shape, and a call's half overlapped the other half of a call of another
    // shape that a slower peer was still reading (the acks only guard one half at a time).
    int64_t half_stride = 0;

    LowLatencyLayout() = default;

    EP_HOST_DEVICE LowLatencyLayout(int max_tokens_, int hidden_, int num_ranks_, int num_experts,
                                    bool rma_staging = false)
        : num_ranks(num_ranks_), num_local_experts(num_experts / num_ranks_), max_tokens(max_tokens_), hidden(hidden_) {
        token_row_bytes = align_up(int64_t(hidden) * 2, 16);
        combine_row_bytes = align_up(int64_t(hidden) * 2, 16);
        counts_bytes = align_up(int64_t(num_experts) * 4);
        slots_bytes = align_up(int64_t(num_experts) * max_tokens * int64_t(sizeof(LowLatencySlotHeader)));
        tokens_bytes = align_up(int64_t(num_ranks) * max_tokens * token_row_bytes);
        combine_bytes = align_up(int64_t(max_tokens) * kMaxTopk * combine_row_bytes);
        if (rma_staging) {
            send_tokens_bytes = align_up(int64_t(max_tokens) * token_row_bytes);
            send_combine_bytes = align_up(int64_t(num_experts) * max_tokens * combine_row_bytes);
        }
        half_stride = half_bytes();
    }

    EP_HOST_DEVICE static constexpr int64_t control_bytes() { return kControlBytes; }
    EP_HOST_DEVICE int64_t half_bytes() const {
        return counts_bytes + slots_bytes + tokens_bytes + combine_bytes + send_tokens_bytes + send_combine_bytes;
    }
    EP_HOST_DEVICE int64_t total_bytes() const { return control_bytes() + 2 * half_bytes(); }

    // ---- control (shape-independent)
    EP_HOST_DEVICE static int* status(void* base) {
        return reinterpret_cast<int*>(static_cast<char*>(base) + kStatusOffset);
    }
    EP_HOST_DEVICE static int64_t* seq(void* base) {
        return reinterpret_cast<int64_t*>(static_cast<char*>(base) + kSeqOffset);
    }
    EP_HOST_DEVICE static int* done(void* base, int phase, int half) {
        return reinterpret_cast<int*>(static_cast<char*>(base) + kDoneOffset) + phase * 2 + half;
    }
    EP_HOST_DEVICE static int64_t* received(void* base, int half) {
        return reinterpret_cast<int64_t*>(static_cast<char*>(base) + kReceivedOffset) + half;
    }
    EP_HOST_DEVICE static int64_t* ack(void* base, int half, int src) {
        return reinterpret_cast<int64_t*>(static_cast<char*>(base) + kAckOffset) + half * kMaxRanks + src;
    }
    EP_HOST_DEVICE static int64_t* header(void* base, int half, int src) {
        return reinterpret_cast<int64_t*>(static_cast<char*>(base) + kHeadersOffset +
                                          (int64_t(half) * kMaxRanks + src) * kHeaderSlotBytes);
    }

    // ---- one half (shape-dependent)
    EP_HOST_DEVICE char* half_base(void* base, int half) const {
        return static_cast<char*>(base) + control_bytes() + half * half_stride;
    }
    EP_HOST_DEVICE int* count(void* base, int half, int local_expert, int src) const {
        return reinterpret_cast<int*>(half_base(base, half)) + local_expert * num_ranks + src;
    }
    EP_HOST_DEVICE LowLatencySlotHeader* dispatch_slot(void* base, int half, int local_expert, int src, int j) const {
        return reinterpret_cast<LowLatencySlotHeader*>(half_base(base, half) + counts_bytes) +
               (int64_t(local_expert) * num_ranks + src) * max_tokens + j;
    }
    EP_HOST_DEVICE char* token_row(void* base, int half, int src, int token) const {
        return half_base(base, half) + counts_bytes + slots_bytes +
               (int64_t(src) * max_tokens + token) * token_row_bytes;
    }
    EP_HOST_DEVICE char* combine_slot(void* base, int half, int row) const {
        return half_base(base, half) + counts_bytes + slots_bytes + tokens_bytes + int64_t(row) * combine_row_bytes;
    }
    // RMA staging (only with rma_staging): the source rows of this rank's puts.
    EP_HOST_DEVICE char* send_token(void* base, int half, int token) const {
        return half_base(base, half) + counts_bytes + slots_bytes + tokens_bytes + combine_bytes +
               int64_t(token) * token_row_bytes;
    }
    EP_HOST_DEVICE char* send_combine(void* base, int half, int64_t slot) const {
        return half_base(base, half) + counts_bytes + slots_bytes + tokens_bytes + combine_bytes + send_tokens_bytes +
               slot * combine_row_bytes;
    }
};

}  // namespace ep_train
