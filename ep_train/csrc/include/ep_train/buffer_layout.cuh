// Byte layout of the NVLink buffer: the single source of truth for offsets on host and device.
// Mirrors ep_train/layout.py (intranode_* functions); tests/gpu/test_layout.py compares both.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define EP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EP_HOST_DEVICE inline
#endif

namespace ep_train {

constexpr int kAlignBytes = 128;  // every region starts on a 128-byte boundary
constexpr int kFp8Block = 128;    // one float32 scale per 128 channels
constexpr int kMaxTopk = 16;
constexpr int kMaxRanks = 8;       // one NVLink domain
constexpr int kMaxExperts = 1024;  // bound of the per-expert counts a notify slot carries
constexpr int kMaxChannels = 64;   // num_sms / 2 <= 64 (H100/H200 have 132 SMs)
constexpr int kInfoWords = 8;      // int64 words of the call header every rank compares

EP_HOST_DEVICE constexpr int64_t align_up(int64_t v, int64_t a = kAlignBytes) {
    return (v + a - 1) / a * a;
}
EP_HOST_DEVICE constexpr int num_fp8_scales(int hidden) {
    return (hidden + kFp8Block - 1) / kFp8Block;
}

// Tokens [begin, end) of channel c when T tokens are cut into C contiguous ranges.
// NOTES: notify, prepare, dispatch and combine must all use this one formula.
EP_HOST_DEVICE int channel_token_begin(int num_tokens, int num_channels, int c) {
    int per = (num_tokens + num_channels - 1) / num_channels;
    int b = per * c;
    return b < num_tokens ? b : num_tokens;
}

// One notify slot: what source rank s tells rank d before a dispatch (or any barrier).
struct NotifySlot {
    static constexpr int64_t kInfo = 0;                                         // int64[kInfoWords]
    static constexpr int64_t kCountRow = kInfo + kInfoWords * 8;                // int32[kMaxRanks]: s -> each rank
    static constexpr int64_t kNumTokens = kCountRow + kMaxRanks * 4;            // int32 (+12 pad): T of s
    static constexpr int64_t kExpertCounts = kNumTokens + 16;                   // int32[kMaxExperts]: d's experts
    static constexpr int64_t kChannelCounts = kExpertCounts + kMaxExperts * 4;  // int32[kMaxChannels]
    static constexpr int64_t kBytes = (kChannelCounts + kMaxChannels * 4 + kAlignBytes - 1) / kAlignBytes * kAlignBytes;
};

// Per rank:
//   [sync:     barrier flags int64[kMaxRanks] (written by peers), own barrier sequence int64, status int32]
//   [notify:   2 parities x kMaxRanks NotifySlot (parity = barrier sequence & 1)]
//   [counters: tail int64[kMaxChannels][kMaxRanks], head int64[kMaxChannels][kMaxRanks]]
//   [rings:    num_channels x num_ranks rings (ring (c, s) holds rows source s sends in channel c)]
// NOTES: the control part does not depend on the call's channel count, so counters keep their
// place when calls use different configs; receivers zero their counters when a call ends.
struct IntranodeLayout {
    static constexpr int64_t kBarrierOffset = 0;
    static constexpr int64_t kSeqOffset = kMaxRanks * 8;
    static constexpr int64_t kStatusOffset = kSeqOffset + 8;
    static constexpr int64_t kNotifyOffset = kAlignBytes;
    static constexpr int64_t kCountersOffset = kNotifyOffset + 2 * kMaxRanks * NotifySlot::kBytes;
    static constexpr int64_t kControlBytes = kCountersOffset + 2 * kMaxChannels * kMaxRanks * 8;

    int num_ranks = 0;
    int num_channels = 0;
    int ring_tokens = 0;
    int64_t row_bytes = 0;
    int64_t scales_offset = 0;  // inside a row
    int64_t topk_idx_offset = 0;
    int64_t weights_offset = 0;
    int64_t src_idx_offset = 0;
    int64_t expert_rank_offset = 0;  // expert-major dispatch: the token's rank among its source's tokens per expert

    IntranodeLayout() = default;

    // hidden_bytes: BF16-sized payload (2 x hidden); FP8 rows use the same stride.
    EP_HOST_DEVICE IntranodeLayout(int64_t hidden_bytes, int num_ranks_, int num_channels_, int ring_tokens_)
        : num_ranks(num_ranks_), num_channels(num_channels_), ring_tokens(ring_tokens_) {
        int hidden = static_cast<int>(hidden_bytes / 2);
        scales_offset = align_up(hidden_bytes, 16);
        topk_idx_offset = scales_offset + num_fp8_scales(hidden) * 4;
        weights_offset = topk_idx_offset + kMaxTopk * 4;
        src_idx_offset = weights_offset + kMaxTopk * 4;
        expert_rank_offset = src_idx_offset + 4;
        int64_t meta = num_fp8_scales(hidden) * 4 + kMaxTopk * 12 + 4;
        row_bytes = scales_offset + align_up(meta, 16);
    }

    static constexpr int64_t kControlAligned = (kControlBytes + kAlignBytes - 1) / kAlignBytes * kAlignBytes;
    EP_HOST_DEVICE static int64_t control_bytes() { return kControlAligned; }
    EP_HOST_DEVICE int64_t rings_offset() const { return control_bytes(); }
    EP_HOST_DEVICE int64_t total_bytes() const {
        return control_bytes() + align_up(int64_t(num_channels) * num_ranks * ring_tokens * row_bytes);
    }

    // Pointers into a rank's buffer `base`.
    EP_HOST_DEVICE static int64_t* barrier(void* base) {
        return reinterpret_cast<int64_t*>(static_cast<char*>(base) + kBarrierOffset);
    }
    EP_HOST_DEVICE static int64_t* seq(void* base) {
        return reinterpret_cast<int64_t*>(static_cast<char*>(base) + kSeqOffset);
    }
    EP_HOST_DEVICE static int* status(void* base) {
        return reinterpret_cast<int*>(static_cast<char*>(base) + kStatusOffset);
    }
    EP_HOST_DEVICE static char* notify_slot(void* base, int parity, int src) {
        return static_cast<char*>(base) + kNotifyOffset + (int64_t(parity) * kMaxRanks + src) * NotifySlot::kBytes;
    }
    EP_HOST_DEVICE static int64_t* tail(void* base, int channel, int src) {
        return reinterpret_cast<int64_t*>(static_cast<char*>(base) + kCountersOffset) + channel * kMaxRanks + src;
    }
    EP_HOST_DEVICE static int64_t* head(void* base, int channel, int src) {
        return reinterpret_cast<int64_t*>(static_cast<char*>(base) + kCountersOffset) +
               (kMaxChannels + channel) * kMaxRanks + src;
    }
    EP_HOST_DEVICE char* ring(void* base, int channel, int src) const {
        return static_cast<char*>(base) + rings_offset() +
               (int64_t(channel) * num_ranks + src) * ring_tokens * row_bytes;
    }
};

}  // namespace ep_train
