// Low-latency dispatch/combine over peer pointers (one NVLink node; the buffer is NVSHMEM symmetric
// memory or CUDA IPC memory): fixed-shape, expert-major slots, no host sync, CUDA-graph capturable.
//
// Protocol of one operation (a dispatch or a combine), sequence number n = own LL counter + 1,
// buffer half h = n & 1:
//   send:    wait until every destination acknowledged receive n - 2 (it no longer reads half h),
//            block 0 writes the call header into each destination's header slot [h][me]; every
//            block writes straight into the destination's half h through the peer pointer
//            (16-byte stores) - dispatch: each token's row once per destination rank, a slot
//            header per (token, expert) and the block's share of the per-expert counts; combine:
//            every row, or with sums per rank one weighted sum per (token, rank) - then fences and
//            adds one arrival to that slot.
//   receive: wait until every block of every source has arrived for n (G blocks per call, G the
//            grid every rank runs), compare the call headers, move the rows out of half h
//            (dispatch: pack into recv_x and record each slot in the slot map; combine: weighted
//            FP32 sum per token, or with sums per rank the sum of its ranks' rows), then every block
//            counts itself done with half h; the last one stores n into every source's ack word.
// Peers in the launch's RMA mask (LowLatencyRma: on another node, or forced) get the same protocol
// through puts instead of stores: the rows are first staged in this rank's send areas (a network
// put reads only symmetric memory), every header, count and slot word is a small put, and a block's
// arrival is a signal after quiet (its puts delivered first).
// NOTES: arrivals, receive counts and acks only grow, so nothing is ever cleaned; the ack makes a
// third call wait instead of overwriting a half that is still being read (at most two calls in
// flight).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <type_traits>

#if defined(EP_TRAIN_NVSHMEM_DEVICE)
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

#include "ep_train/buffer_layout.cuh"
#include "ep_train/low_latency_layout.cuh"
#include "ep_train/ptx.cuh"
#include "ep_train/timeout.cuh"
#include "ep_train/warp.cuh"
#include "low_latency_runtime.hpp"
#include "runtime.hpp"

namespace ep_train {

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRoundPairs = 32;   // (token, top-k) entries warp 0 gives slots per round: one per lane
constexpr int kRoundTokens = 32;  // tokens whose rows a send block writes per round
constexpr int kCopyUnroll = 4;
constexpr int kCombineGroup = 4;  // top-k entries of a token whose loads a combine lane has in flight together
constexpr int kSendPhase = 0;     // the send phase's finish counters in LowLatencyLayout::done
// FP8 arithmetic of ep_train/fp8.py as torch runs it on CUDA.  NOTES: torch divides by a Python
// scalar as a multiplication by its float reciprocal, so scale = amax * (1 / 448), not amax / 448.
constexpr float kFp8Max = 448.0f;
constexpr float kInvFp8Max = 1.0f / 448.0f;
constexpr float kAmaxFloor = 1e-4f;

struct alignas(16) Bf16x8 {
    __nv_bfloat162 v[4];
};

// acc[i] += weight * channel i of 8 BF16 channels (16 bytes), each product and sum rounded to FP32
// on its own (kWeighted false: the plain sum).
template <bool kWeighted = true>
__device__ __forceinline__ void accumulate(float (&acc)[8], const int4& raw, float weight = 1.0f) {
    const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        acc[2 * i] = __fadd_rn(acc[2 * i], kWeighted ? __fmul_rn(f.x, weight) : f.x);
        acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], kWeighted ? __fmul_rn(f.y, weight) : f.y);
    }
}

// Bit r set when token t has an expert on rank r (ids outside [0, E) skipped).
__device__ __forceinline__ int token_ranks(const int64_t* topk_idx, int64_t t, int K, int E, int L) {
    int ranks = 0;
    for (int k = 0; k < K; ++k) {
        const int64_t e = topk_idx[t * K + k];
        if (e >= 0 && e < E) ranks |= 1 << (e / L);
    }
    return ranks;
}

// 8 FP32 sums rounded to BF16 once.
__device__ __forceinline__ Bf16x8 to_bf16x8(const float (&acc)[8]) {
    Bf16x8 o;
#pragma unroll
    for (int i = 0; i < 4; ++i) o.v[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return o;
}

__device__ __forceinline__ uint16_t fp8x2_e4m3(float lo, float hi) {
    uint16_t r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// Traced launches (p.trace non-null): the global timer (ns) at a phase boundary, by thread 0 of
// the block that passes `who`.
__device__ __forceinline__ void trace_mark(int64_t* trace, int point, bool who) {
    if (trace != nullptr && who && threadIdx.x == 0) {
        int64_t now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        trace[point] = now;
    }
}

// ---- Writes to a peer.  Ranks outside the RMA mask get plain stores through their peer pointers;
// for the others each write below is a put (NVSHMEM, or a copy through the peer pointer where
// NVSHMEM is absent).  `own_dst` is the address at the same offset of this rank's buffer: NVSHMEM's
// symmetric address of the word on every peer.
__device__ __forceinline__ bool is_rma(const LowLatencyRma& rma, int r) {
    return (rma.peers >> r) & 1u;
}

template <typename T>
__device__ __forceinline__ T* on_peer(const RankContext& ctx, int r, T* own_dst) {
    const char* own = static_cast<const char*>(ctx.peers.base[ctx.rank]);
    return reinterpret_cast<T*>(static_cast<char*>(ctx.peers.base[r]) + (reinterpret_cast<const char*>(own_dst) - own));
}

// Warp-collective: num_bytes from src (this rank's staging area) to rank r at own_dst's offset.
// NOTES: the staged rows were written by other threads before a __syncthreads or __syncwarp; one
// fence per warp orders them before the put, for a NIC that reads them.
__device__ __forceinline__ void rma_put_warp(const RankContext& ctx, const LowLatencyRma& rma, int r, void* own_dst,
                                             const void* src, int64_t num_bytes) {
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    if (rma.impl == kRmaNvshmem) {
        if (lane_id() == 0) __threadfence();
        __syncwarp();
        nvshmemx_putmem_nbi_warp(own_dst, src, static_cast<size_t>(num_bytes), r);
        return;
    }
#endif
    warp_copy<kCopyUnroll, true>(on_peer(ctx, r, static_cast<char*>(own_dst)), src, num_bytes);
}

// One thread: an int64 or int32 word to rank r at own_dst's offset (store or put).
template <typename T>
__device__ __forceinline__ void put_word(const RankContext& ctx, const LowLatencyRma& rma, int r, T* own_dst, T v) {
    static_assert(std::is_same_v<T, int64_t> || std::is_same_v<T, int>, "an int64 or int32 word");
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    if (is_rma(rma, r) && rma.impl == kRmaNvshmem) {
        if constexpr (std::is_same_v<T, int64_t>)
            nvshmem_int64_p(own_dst, v, r);
        else
            nvshmem_int_p(own_dst, v, r);
        return;
    }
#endif
    *on_peer(ctx, r, own_dst) = v;
}

// One thread: 16 bytes to rank r at own_dst's offset (16-byte aligned).
__device__ __forceinline__ void put_int4(const RankContext& ctx, const LowLatencyRma& rma, int r, void* own_dst,
                                         int4 v) {
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    if (is_rma(rma, r) && rma.impl == kRmaNvshmem) {
        auto* d = static_cast<long long*>(own_dst);
        nvshmem_longlong_p(d, (static_cast<long long>(static_cast<uint32_t>(v.y)) << 32) | static_cast<uint32_t>(v.x),
                           r);
        nvshmem_longlong_p(d + 1,
                           (static_cast<long long>(static_cast<uint32_t>(v.w)) << 32) | static_cast<uint32_t>(v.z), r);
        return;
    }
#endif
    ptx::st_na_v4(on_peer(ctx, r, static_cast<int4*>(own_dst)), v);
}

// One thread, after the block's barrier (and, for NVSHMEM puts, the block's quiet: see
// signal_arrival): one is added to the word at own_dst's offset on rank r, after this block's writes
// to r.
__device__ __forceinline__ void signal_add(const RankContext& ctx, const LowLatencyRma& rma, int r, int64_t* own_dst,
                                           int64_t v) {
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    if (is_rma(rma, r) && rma.impl == kRmaNvshmem) {
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(own_dst), static_cast<uint64_t>(v), NVSHMEM_SIGNAL_ADD, r);
        return;
    }
#endif
    ptx::fence_acq_rel_sys();
    ptx::red_add_release_sys(on_peer(ctx, r, own_dst), v);
}

// One thread: the word at own_dst's offset on rank r becomes v (no ordering with earlier writes).
__device__ __forceinline__ void signal_set(const RankContext& ctx, const LowLatencyRma& rma, int r, int64_t* own_dst,
                                           int64_t v) {
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    if (is_rma(rma, r) && rma.impl == kRmaNvshmem) {
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(own_dst), static_cast<uint64_t>(v), NVSHMEM_SIGNAL_SET, r);
        return;
    }
#endif
    ptx::st_relaxed_sys(on_peer(ctx, r, own_dst), v);
}

// True in exactly one block: the last of the grid to get here.  Every block's earlier memory
// operations are ordered (GPU scope) before that block's later ones; the counter is reset for the
// next launch of the same phase and half.  The send phases call it after their arrivals, whose own
// fences ordered their peer writes: what the last block does next (record_seq) is local.
__device__ __forceinline__ bool block_is_last(int* counter, int* s_flag) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const int prev = atomicAdd(counter, 1);
        *s_flag = prev == static_cast<int>(gridDim.x) - 1;
        if (*s_flag) {
            *counter = 0;
            __threadfence();
        }
    }
    __syncthreads();
    return *s_flag != 0;
}

// Sequence number of this call (send phase: own counter + 1) and the ack wait for its half: every
// destination has acknowledged call seq - 2 (acknowledge; receives complete in call order).
// *s_flag becomes 1 when the buffer has failed or an ack wait fails; the caller reads it after its
// next __syncthreads.  NOTES: the status word, the counter and the acks are loaded in one round
// trip; an ack is polled again only when it is behind (the usual case needs no second trip).
__device__ __forceinline__ int64_t begin_send(const RankContext& ctx, int64_t* s_seq, int* s_flag) {
    const int t = threadIdx.x;
    if (t == 0) {
        const int status = ptx::ld_volatile(ctx.err.status);
        *s_seq = ptx::ld_volatile(LowLatencyLayout::seq(ctx.peers.base[ctx.rank])) + 1;
        *s_flag = status != 0;
    }
    // Relaxed like the acknowledgement stores themselves; no write to the peer is issued before the
    // value is compared.  Both halves' acks: the half is known only once the counter is.
    int64_t acked0 = 0, acked1 = 0;
    if (t < ctx.num_ranks) {
        acked0 = ptx::ld_volatile(LowLatencyLayout::ack(ctx.peers.base[ctx.rank], 0, t));
        acked1 = ptx::ld_volatile(LowLatencyLayout::ack(ctx.peers.base[ctx.rank], 1, t));
    }
    __syncthreads();
    const int64_t seq = *s_seq, acked = (seq & 1) ? acked1 : acked0;
    if (t < ctx.num_ranks && seq > 2 && acked < seq - 2 && *s_flag == 0) {
        const int64_t* ack = LowLatencyLayout::ack(ctx.peers.base[ctx.rank], static_cast<int>(seq & 1), t);
        if (wait_at_least(ack, seq - 2, ctx.err, kWaitLowLatencyAck, -1, t) < 0) *s_flag = 1;
    }
    return seq;
}

// Block 0 of a send phase, once the acks have freed this half: the call header words and the grid
// size into every destination's slot [half][me].  They are ordered before block 0's arrival
// (signal_arrival) as its rows are, so a receiver that has seen every block arrive reads them.
__device__ __forceinline__ void write_headers(const RankContext& ctx, const LowLatencyRma& rma, const int64_t* info,
                                              int64_t seq) {
    if (blockIdx.x != 0) return;
    const int half = static_cast<int>(seq & 1), me = ctx.rank;
    int64_t* own_slot = LowLatencyLayout::header(ctx.peers.base[me], half, me);
    for (int i = threadIdx.x; i < ctx.num_ranks * kInfoWords; i += blockDim.x)
        put_word(ctx, rma, i / kInfoWords, own_slot + i % kInfoWords, info[i % kInfoWords]);
    if (threadIdx.x < ctx.num_ranks)
        put_word(ctx, rma, threadIdx.x, own_slot + LowLatencyLayout::kHeaderGridWord, int64_t(gridDim.x));
}

// Every block of a send phase, after its last peer write: one arrival in every destination's slot
// [half][me].  NOTES: this replaces a last-block stamp (counter, fence, then stamp): the receiver
// waits for all the source's blocks itself, so no block waits for the others before signalling.
// The fence in each signalling thread orders the whole block's stores (bar.sync, then fence).  With
// NVSHMEM puts, thread 0 first completes the block's puts (quiet, not fence: the puts were issued
// by other threads, and a fence orders only what the calling thread issued): one quiet per block.
__device__ __forceinline__ void signal_arrival(const RankContext& ctx, const LowLatencyRma& rma, int64_t seq) {
    __syncthreads();
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    if (rma.peers != 0 && rma.impl == kRmaNvshmem) {
        if (threadIdx.x == 0) nvshmem_quiet();
        __syncthreads();
    }
#endif
    if (threadIdx.x < ctx.num_ranks) {
        int64_t* own_slot = LowLatencyLayout::header(ctx.peers.base[ctx.rank], static_cast<int>(seq & 1), ctx.rank);
        signal_add(ctx, rma, threadIdx.x, own_slot + LowLatencyLayout::kHeaderArrivalsWord, 1);
    }
}

// Last block of a send phase (local bookkeeping only): this call's sequence number, for the next
// send and for the hook's receive.
__device__ __forceinline__ void record_seq(const RankContext& ctx, int64_t seq, int64_t* call_seq) {
    if (threadIdx.x == 0) {
        *LowLatencyLayout::seq(ctx.peers.base[ctx.rank]) = seq;
        *call_seq = seq;
    }
}

// Spin until the arrivals word of a source's header slot reaches `target`, like wait_at_least; on
// the slow path also watch the grid word its block 0 wrote beside the header: a source running
// fewer blocks than `grid` never reaches the target, and is reported as a mismatch, not a timeout.
// Returns false after a report or a failure elsewhere.
__device__ __forceinline__ bool wait_arrivals(const RankContext& ctx, const int64_t* slot, int64_t target, int64_t grid,
                                              int site, int source) {
    const int64_t* arrivals = slot + LowLatencyLayout::kHeaderArrivalsWord;
    int64_t v = ptx::ld_acquire_sys(arrivals);
    if (v >= target) return true;
    const long long start = clock64();
    for (int iter = 1;; ++iter) {
        v = ptx::ld_acquire_sys(arrivals);
        if (v >= target) return true;
        if ((iter & 63) == 0) {
            if (has_failed(ctx.err)) return false;
            // 0: no call written to this slot yet.  Otherwise every call of a source writes the
            // same grid (the runtime's SM count), so an older call's word tells as much.
            const int64_t theirs = ptx::ld_volatile(slot + LowLatencyLayout::kHeaderGridWord);
            if (theirs != 0 && theirs != grid) {
                report_error(ctx.err, kErrMismatch, kCheckCallHeader, kInfoWords, source, grid, theirs);
                return false;
            }
            if (clock64() - start > ctx.err.timeout_cycles) {
                report_error(ctx.err, kErrTimeout, site, -1, source, target, v);
                return false;
            }
        }
    }
}

// Receive phase start: wait until every block of every source has arrived for this call, then
// compare its call header with ours.  Every rank runs the same grid (the runtime's SM count), so
// call seq on half seq & 1 is complete at gridDim.x * ((seq + 1) / 2) arrivals; a source whose grid
// size differs is reported as a header mismatch rather than read early.  Returns, in every thread
// of the block, whether the block must stop (a failed wait, a mismatch, or a failure elsewhere).
// NOTES: the status word is read with the header words, in the same round trip.
__device__ bool wait_sources(const RankContext& ctx, const int64_t* info, int64_t seq, int site, int* s_flag) {
    const int s = threadIdx.x;
    __syncthreads();  // every thread is done with the flag's previous use (combine shares it)
    if (s == 0) *s_flag = 0;
    __syncthreads();
    if (s < ctx.num_ranks) {
        const int64_t* slot = LowLatencyLayout::header(ctx.peers.base[ctx.rank], static_cast<int>(seq & 1), s);
        const int64_t grid = gridDim.x, target = grid * ((seq + 1) / 2);
        bool failed = !wait_arrivals(ctx, slot, target, grid, site, s);
        if (!failed) {
            int64_t theirs[kInfoWords + 1];
#pragma unroll
            for (int w = 0; w < kInfoWords; ++w) theirs[w] = ptx::ld_volatile(slot + w);
            theirs[kInfoWords] = ptx::ld_volatile(slot + LowLatencyLayout::kHeaderGridWord);
            failed = has_failed(ctx.err);
            int bad = -1;  // the first word that differs, and both values (no dynamic index: registers)
            int64_t bad_ours = 0, bad_theirs = 0;
#pragma unroll
            for (int w = kInfoWords - 1; w >= 0; --w) {
                if (theirs[w] != info[w]) {
                    bad = w;
                    bad_ours = info[w];
                    bad_theirs = theirs[w];
                }
            }
            // NOTES: a source running more blocks reaches the target before all of them arrived,
            // maybe before its block 0's header words show here: on a mismatch, first wait
            // (bounded) for its grid word, so that a grid of another size is what gets reported.
            if (!failed && bad >= 0 && theirs[kInfoWords] == 0) {
                const long long start = clock64();
                while (theirs[kInfoWords] == 0 && clock64() - start < ctx.err.timeout_cycles)
                    theirs[kInfoWords] = ptx::ld_volatile(slot + LowLatencyLayout::kHeaderGridWord);
            }
            if (!failed && theirs[kInfoWords] != grid) {
                report_error(ctx.err, kErrMismatch, kCheckCallHeader, kInfoWords, s, grid, theirs[kInfoWords]);
                failed = true;
            }
            if (!failed && bad >= 0) {
                report_error(ctx.err, kErrMismatch, kCheckCallHeader, bad, s, bad_ours, bad_theirs);
                failed = true;
            }
        }
        if (failed) *s_flag = 1;
    }
    __syncthreads();
    return *s_flag != 0;
}

// Every block of a receive phase, after its last read of half seq & 1: one count in this rank's
// receive counter of the half; the block that completes the call's count (G per call: every rank
// runs the same grid) stores seq into each source's ack word of the half for this rank (a plain
// store: the value there is seq - 2, which the source saw before it sent seq).  NOTES: no fence.
// Every warp used each value it read (copied or summed it) before the barrier, so the reads have
// returned, and a later write by the source cannot change them; what the fence ordered were this
// block's local writes, which the source does not read.  A system-scope fence in every block cost
// ~2 us per call.
__device__ __forceinline__ void acknowledge(const RankContext& ctx, const LowLatencyRma& rma, int64_t seq) {
    __syncthreads();
    if (threadIdx.x != 0) return;
    auto* counter = reinterpret_cast<unsigned long long*>(
        LowLatencyLayout::received(ctx.peers.base[ctx.rank], static_cast<int>(seq & 1)));
    if ((atomicAdd(counter, 1ull) + 1) % gridDim.x != 0) return;
    int64_t* own_ack = LowLatencyLayout::ack(ctx.peers.base[ctx.rank], static_cast<int>(seq & 1), ctx.rank);
    for (int s = 0; s < ctx.num_ranks; ++s) signal_set(ctx, rma, s, own_ack, seq);
}

// Which local experts this block serves in a receive-side loop, and which share of their rows.
struct ExpertShare {
    int first, step, sub, num_subs;
};
__device__ __forceinline__ ExpertShare expert_share(int num_local_experts) {
    const int G = gridDim.x, b = blockIdx.x;
    if (G < num_local_experts) return {b, G, 0, 1};
    const int per = G / num_local_experts;
    return {b < per * num_local_experts ? b / per : num_local_experts, num_local_experts, b % per, per};
}

// 8 channels (16 bytes) of a token row: thread `it` of a send round holds channels [c * 8, c * 8 + 8)
// of token it / chunks, c = it % chunks, chunks = H / 8.
__device__ __forceinline__ int4 load_chunk(const LowLatencyDispatchParams& p, int token, int c) {
    return ptx::ld_nc_v4(
        reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(token) * p.layout.hidden * 2) + c);
}

// Tokens [q0, q0 + n) to every rank that holds one of their experts (s_ranks: bit r per token),
// one 8-channel chunk per thread and pass.  `first` is this thread's chunk of the first pass when
// `have_first`: the caller loaded it already (before the send began, so that the load overlapped the ack wait).
// FP8: the 16 lanes of a 128-channel block (16-aligned: chunks is a multiple of 16) share its amax
// by shuffles, so each lane casts its own channels from registers: x is read once.  The arithmetic
// is ep_train/fp8.py's (see kInvFp8Max); every lane of the block computes the same scale.
// Tokens with an RMA destination are also written once into this rank's staging row; put_rows
// sends them after the block's barrier.
__device__ void send_rows(const LowLatencyDispatchParams& p, const RankContext& ctx, const LowLatencyRma& rma,
                          const int* s_ranks, int q0, int n, int half, int4 first, bool have_first) {
    const int H = p.layout.hidden, chunks = H / 8, items = n * chunks, R = ctx.num_ranks, me = ctx.rank;
    void* own = ctx.peers.base[me];
    const int lane = lane_id(), warp_first = static_cast<int>(threadIdx.x) - lane;
    for (int base = warp_first; base < items; base += blockDim.x) {  // warp-uniform: the shuffles need every lane
        const int it = base + lane, q = it / chunks, c = it % chunks;
        const bool valid = it < items;
        int4 v = make_int4(0, 0, 0, 0);
        if (valid) v = have_first && base == warp_first ? first : load_chunk(p, q0 + q, c);
        const int ranks = valid ? s_ranks[q] : 0, stores = ranks & ~static_cast<int>(rma.peers);
        if (p.use_fp8) {
            const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
            float f[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 t = __bfloat1622float2(h[i]);
                f[2 * i] = t.x;
                f[2 * i + 1] = t.y;
            }
            float amax = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(f[i]));
            for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
            float scale = __fmul_rn(fmaxf(amax, kAmaxFloor), kInvFp8Max);
            if (p.round_scale) scale = exp2f(ceilf(log2f(scale)));
            const float inv = __fdiv_rn(1.0f, scale);
            auto cast = [inv](float a, float b) {
                return fp8x2_e4m3(fminf(fmaxf(__fmul_rn(a, inv), -kFp8Max), kFp8Max),
                                  fminf(fmaxf(__fmul_rn(b, inv), -kFp8Max), kFp8Max));
            };
            const uint2 out = make_uint2(uint32_t(cast(f[0], f[1])) | (uint32_t(cast(f[2], f[3])) << 16),
                                         uint32_t(cast(f[4], f[5])) | (uint32_t(cast(f[6], f[7])) << 16));
            for (int r = 0; r <= R; ++r) {  // r == R: the staging row
                if (r < R ? !((stores >> r) & 1) : ranks == stores) continue;
                char* row = r < R ? p.layout.token_row(ctx.peers.base[r], half, me, q0 + q)
                                  : p.layout.send_token(own, half, q0 + q);
                ptx::st_na_v2(reinterpret_cast<uint2*>(row) + c, out);
                if (c % (kFp8Block / 8) == 0) reinterpret_cast<float*>(row + H)[c / (kFp8Block / 8)] = scale;
            }
        } else {
            for (int r = 0; r < R; ++r)
                if ((stores >> r) & 1)
                    ptx::st_na_v4(reinterpret_cast<int4*>(p.layout.token_row(ctx.peers.base[r], half, me, q0 + q)) + c,
                                  v);
            if (ranks != stores) ptx::st_na_v4(reinterpret_cast<int4*>(p.layout.send_token(own, half, q0 + q)) + c, v);
        }
    }
}

// After the round's barrier: each staged row of tokens [q0, q0 + n) to every RMA rank that holds one
// of its experts, one (token, rank) per warp.
__device__ void put_rows(const LowLatencyDispatchParams& p, const RankContext& ctx, const LowLatencyRma& rma,
                         const int* s_ranks, int q0, int n, int half) {
    if (rma.peers == 0) return;
    const int R = ctx.num_ranks, H = p.layout.hidden, warp = threadIdx.x / kWarpSize;
    const int64_t bytes = p.use_fp8 ? H + int64_t(H / kFp8Block) * 4 : int64_t(H) * 2;
    void* own = ctx.peers.base[ctx.rank];
    __syncthreads();
    for (int it = warp; it < n * R; it += kWarps) {
        const int q = it / R, r = it % R;
        if (!((s_ranks[q] >> r) & 1) || !is_rma(rma, r)) continue;
        rma_put_warp(ctx, rma, r, p.layout.token_row(own, half, ctx.rank, q0 + q),
                     p.layout.send_token(own, half, q0 + q), bytes);
    }
}

struct SendShared {
    int hist[kMaxExperts];    // entries before the current round, per global expert
    int total[kMaxExperts];   // all entries, per global expert
    int ranks[kRoundTokens];  // per token of the round: bit r set when rank r holds one of its experts
    int64_t seq;
    int flag;
};

// Dispatch send.  Grid: every block takes a contiguous range of tokens, hence of the T*K (token,
// top-k) entries.
// - Slots: in rounds of 32 entries warp 0 gives each entry its slot j = number of earlier entries
//   (row-major) with the same expert, so slots within (expert, source) are in token order, then
//   top-k order (the reference layout), and writes the slot header (token, top-k column, weight).
// - Rows: in rounds of 32 tokens every token's row goes once to each rank that holds one of its
//   experts, into that rank's token area [me][token] (FP8: cast once per token); the receiver
//   copies it into each of its slots.  NVLink carries a token once per rank, not once per expert.
// - Every block counts all entries up front and writes its share of the per-expert counts, then
//   signals its own arrival: no block waits for the others.
// NOTES: the critical path of a block with one or two tokens is its chain of dependent loads, so
// each thread loads its chunk of the first round before the ack wait, the count loop also gives
// the first round's tokens their ranks, and the FP8 cast needs no second pass over x.
__device__ void dispatch_send(const LowLatencyDispatchParams& p, const RankContext& ctx, const LowLatencyRma& rma,
                              SendShared& sh) {
    const int K = p.num_topk, E = p.num_experts, L = p.layout.num_local_experts, M = p.layout.max_tokens;
    const int me = ctx.rank, lane = lane_id();
    const int T = p.num_tokens, num_entries = T * K;
    const int per = (T + gridDim.x - 1) / gridDim.x;
    const int t0 = min(T, per * static_cast<int>(blockIdx.x)), t1 = min(T, t0 + per);
    const int i0 = t0 * K, i1 = t1 * K;
    const int n0 = min(kRoundTokens, t1 - t0), chunks = p.layout.hidden / 8;
    int4 first = make_int4(0, 0, 0, 0);
    if (static_cast<int>(threadIdx.x) < n0 * chunks)
        first = load_chunk(p, t0 + static_cast<int>(threadIdx.x) / chunks, static_cast<int>(threadIdx.x) % chunks);
    // The count loop's first entry is loaded beside the begin's loads, and the shared counts are
    // cleared before its barrier, so counting starts as soon as the begin returns.
    const int64_t e_first = static_cast<int>(threadIdx.x) < num_entries ? p.topk_idx[threadIdx.x] : -1;
    for (int e = threadIdx.x; e < E; e += blockDim.x) sh.hist[e] = sh.total[e] = 0;
    if (threadIdx.x < kRoundTokens) sh.ranks[threadIdx.x] = 0;
    const int64_t seq = begin_send(ctx, &sh.seq, &sh.flag);
    trace_mark(p.trace, kTraceBegun, blockIdx.x == 0);
    const int half = static_cast<int>(seq & 1);
    for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
        const int64_t e = i == static_cast<int>(threadIdx.x) ? e_first : p.topk_idx[i];
        if (e >= 0 && e < E) {
            if (i < i0) atomicAdd(&sh.hist[e], 1);
            atomicAdd(&sh.total[e], 1);
            if (i >= i0 && i < i0 + n0 * K) atomicOr(&sh.ranks[(i - i0) / K], 1 << (e / L));
        } else if (e != -1) {  // skipped like -1, but never silently: the call is reported as failed
            report_error(ctx.err, kErrBadExpert, kCheckExpertIds, i / K, i % K, E, e);
        }
    }
    __syncthreads();
    if (sh.flag) return;
    write_headers(ctx, rma, p.info, seq);
    // Counts per (destination expert, me); the half is free (acknowledged), and each block's arrival
    // comes after its fence.
    void* own = ctx.peers.base[me];
    for (int e = blockIdx.x + static_cast<int>(threadIdx.x) * gridDim.x; e < E; e += gridDim.x * blockDim.x)
        put_word(ctx, rma, e / L, p.layout.count(own, half, e % L, me), min(sh.total[e], M));

    if (threadIdx.x < kWarpSize) {  // slot headers; the other warps go on to the rows
        for (int r0 = i0; r0 < i1; r0 += kRoundPairs) {
            const int i = r0 + lane;
            const int64_t e64 = i < i1 ? p.topk_idx[i] : -1;
            const int e = e64 >= 0 && e64 < E ? static_cast<int>(e64) : -1;
            const uint32_t peers = __match_any_sync(0xffffffffu, e);
            const int j = e < 0 ? 0 : sh.hist[e] + __popc(peers & ((1u << lane) - 1u));
            __syncwarp();
            if (e >= 0 && lane == __ffs(peers) - 1) sh.hist[e] += __popc(peers);
            __syncwarp();
            if (e >= 0 && j >= M) {
                report_error(ctx.err, kErrCapacity, kCheckLowLatencySlots, e, me, M, j + 1);
            } else if (e >= 0) {
                const float w = p.topk_weights != nullptr ? p.topk_weights[i] : 0.0f;
                put_int4(ctx, rma, e / L, p.layout.dispatch_slot(own, half, e % L, me, j),
                         make_int4(i / K, i % K, __float_as_int(w), 0));
            }
        }
    }

    for (int q0 = t0; q0 < t1; q0 += kRoundTokens) {
        const int n = min(kRoundTokens, t1 - q0);
        if (q0 != t0) {       // the first round's ranks came from the count loop
            __syncthreads();  // the previous round is done with sh.ranks
            if (threadIdx.x < n) sh.ranks[threadIdx.x] = token_ranks(p.topk_idx, q0 + threadIdx.x, K, E, L);
            __syncthreads();
        }
        send_rows(p, ctx, rma, sh.ranks, q0, n, half, first, q0 == t0);
        put_rows(p, ctx, rma, sh.ranks, q0, n, half);
    }

    trace_mark(p.trace, kTraceSent, blockIdx.x == 0);
    signal_arrival(ctx, rma, seq);
    trace_mark(p.trace, kTraceSignalled, blockIdx.x == 0);
    if (block_is_last(LowLatencyLayout::done(ctx.peers.base[me], kSendPhase, half), &sh.flag))
        record_seq(ctx, seq, p.call_seq);
}

struct RecvShared {
    int count[kMaxRanks];
    int offset[kMaxRanks + 1];
    int64_t seq;
    int flag;
};

// Dispatch receive.  Grid: blocks share the local experts (several blocks per expert when there
// are more blocks than experts); a warp moves one slot at a time from the source-major staging
// area [l][s][j] into recv_x[l][offset(l, s) + j], offsets = prefix of the counts over sources.
__device__ void dispatch_recv(const LowLatencyDispatchParams& p, const RankContext& ctx, const LowLatencyRma& rma,
                              RecvShared& sh, int64_t seq) {
    const int R = ctx.num_ranks, L = p.layout.num_local_experts, M = p.layout.max_tokens, H = p.layout.hidden;
    const int S = H / kFp8Block, RM = R * M, warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int half = static_cast<int>(seq & 1);
    void* own = ctx.peers.base[ctx.rank];
    if (wait_sources(ctx, p.info, seq, kWaitLowLatencyDispatch, &sh.flag)) return;
    trace_mark(p.trace, kTraceSourcesSeen, blockIdx.x == 0);

    const ExpertShare share = expert_share(L);
    const int64_t payload = p.use_fp8 ? H : int64_t(H) * 2;
    for (int l = share.first; l < L; l += share.step) {
        if (threadIdx.x == 0) {
            int count[kMaxRanks];
#pragma unroll
            for (int s = 0; s < kMaxRanks; ++s)  // all loads in flight before the first use
                count[s] = s < R ? ptx::ld_volatile(p.layout.count(own, half, l, s)) : 0;
            int acc = 0;
#pragma unroll
            for (int s = 0; s < kMaxRanks; ++s) {
                if (s >= R) break;
                sh.count[s] = min(max(count[s], 0), M);
                sh.offset[s] = acc;
                acc += sh.count[s];
            }
            sh.offset[R] = acc;
        }
        __syncthreads();
        const int total = sh.offset[R];
        if (share.sub == 0 && static_cast<int>(threadIdx.x) < R) {
            const int s = threadIdx.x;
            p.recv_layout_range[l * R + s] = (int64_t(sh.offset[s]) << 32) | sh.count[s];
            if (s == 0) {
                p.recv_count[l] = total;
                if (p.cumulative_stats != nullptr) p.cumulative_stats[l] += total;
            }
        }
        for (int j = total + share.sub * kThreads + threadIdx.x; j < RM; j += share.num_subs * kThreads) {
            p.recv_src_info[int64_t(l) * RM + j] = -1;
            p.recv_topk_pos[int64_t(l) * RM + j] = -1;
            p.recv_topk_weights[int64_t(l) * RM + j] = 0.0f;
        }
        for (int j = share.sub * kWarps + warp; j < total; j += share.num_subs * kWarps) {
            int s = 0;
            while (j >= sh.offset[s + 1]) ++s;
            // Every lane reads the slot header (one broadcast load): its token names the row to copy.
            const int4 hdr =
                ptx::ld_cg_v4(reinterpret_cast<const int4*>(p.layout.dispatch_slot(own, half, l, s, j - sh.offset[s])));
            const int64_t out = int64_t(l) * RM + j;
            if (lane == 0) {
                p.recv_src_info[out] = hdr.x;
                p.recv_topk_pos[out] = hdr.y;
                p.recv_topk_weights[out] = __int_as_float(hdr.z);
                if (p.slot_of != nullptr && hdr.x >= 0 && hdr.x < M && hdr.y >= 0 && hdr.y < p.num_topk)
                    p.slot_of[(int64_t(s) * M + hdr.x) * p.num_topk + hdr.y] = static_cast<int>(out);
            }
            const char* row = p.layout.token_row(own, half, s, hdr.x);
            warp_copy<kCopyUnroll, true>(static_cast<char*>(p.recv_x) + out * payload, row, payload);
            if (p.use_fp8)
                for (int i = lane; i < S; i += kWarpSize)
                    reinterpret_cast<int*>(p.recv_scales)[out * S + i] =
                        ptx::ld_cg(reinterpret_cast<const int*>(row + H) + i);
        }
        __syncthreads();
    }
    trace_mark(p.trace, kTraceReceived, blockIdx.x == 0);
    acknowledge(ctx, rma, seq);
    trace_mark(p.trace, kTraceAcked, blockIdx.x == 0);
}

// Grid: one block per SM (all co-resident: the fused send + receive waits inside one launch).
// kRma: the launch has RMA peers; without, every RMA branch folds away (rma is all zero), so the
// store-only kernels carry none of NVSHMEM's device code.
template <bool kRma>
__global__ void __launch_bounds__(kThreads, 1)
    low_latency_dispatch_kernel(const __grid_constant__ LowLatencyDispatchParams p,
                                const __grid_constant__ RankContext ctx, int phases) {
    const LowLatencyRma rma = kRma ? p.rma : LowLatencyRma{};
    __shared__ SendShared send_sh;
    __shared__ RecvShared recv_sh;
    int64_t seq;
    trace_mark(p.trace, kTraceStart, blockIdx.x == 0);
    // NOTES: no status check between the phases: a failure stops the receive phase at its first wait.
    if (phases & kPhaseSend) {
        dispatch_send(p, ctx, rma, send_sh);
        seq = send_sh.seq;
    } else {
        if (has_failed(ctx.err)) return;
        seq = ptx::ld_volatile(p.call_seq);
    }
    if (phases & kPhaseRecv) dispatch_recv(p, ctx, rma, recv_sh, seq);
    trace_mark(p.trace, kTraceEnd, blockIdx.x == 0);
}

// (source, token) pairs a block of a combine with sums per rank resolves per round: one per warp.
constexpr int kPairRound = kWarps;

struct PairShared {
    int num[kPairRound];                 // entries of the pair on this rank (0: none)
    int slot[kPairRound][kMaxTopk];      // their slots l * R*M + j, in ascending top-k column
    float weight[kPairRound][kMaxTopk];  // and their dispatch weights
};

// Warp-collective: the entries on this rank of pair q = s * M + t into row w of ps, with their slot
// weights (1 without slot weights: the weighted sum is then the plain sum, as 1 * x == x).  Lane k reads
// the slot the dispatch recorded for top-k column k and keeps it only if that slot holds (s, t, k)
// in this call: the map is never cleared, so entries of tokens that have no expert here are stale.
__device__ __forceinline__ void resolve_pair(const LowLatencyCombineParams& p, int R, int q, PairShared& ps, int w) {
    const int K = p.num_topk, M = p.layout.max_tokens, RM = R * M, L = p.layout.num_local_experts;
    const int lane = lane_id(), s = q / M, t = q % M;
    int v = -1;
    if (lane < K) v = p.slot_of[int64_t(q) * K + lane];
    bool valid = v >= 0 && v < L * RM;
    float weight = 0.0f;
    if (valid) {
        const int l = v / RM, j = v % RM;
        const int64_t range = p.recv_layout_range[l * R + s];
        const int src = p.recv_src_info[v], pos = p.recv_topk_pos[v];
        weight = p.slot_weights != nullptr ? p.slot_weights[v] : 1.0f;
        const int off = static_cast<int>(range >> 32), count = static_cast<int>(range & 0xffffffff);
        valid = j >= off && j < off + count && src == t && pos == lane;
    }
    const unsigned mask = __ballot_sync(0xffffffffu, valid);
    if (valid) {
        const int at = __popc(mask & ((1u << lane) - 1u));
        ps.slot[w][at] = v;
        ps.weight[w][at] = weight;
    }
    if (lane == 0) ps.num[w] = __popc(mask);
}

// Combine send with sums per rank.  Block b takes the pairs b, b + G, b + 2G, ... (every block gets
// tokens of every source, whatever their counts), a round of one pair per warp at a time: the
// warps resolve the round's pairs, then the block's threads sweep (pair, 8-channel chunk) items:
// the weighted FP32 sum of the pair's rows in ascending top-k column, rounded to BF16 once, into
// row (token * R + this rank) of the source's combine area.  Rows for RMA ranks are staged at
// index s * M + t and put after the round's barrier.
__device__ void combine_send_per_rank(const LowLatencyCombineParams& p, const RankContext& ctx,
                                      const LowLatencyRma& rma, PairShared& ps, int half) {
    const int R = ctx.num_ranks, M = p.layout.max_tokens, H = p.layout.hidden, chunks = H / 8, me = ctx.rank;
    const int G = gridDim.x, warp = threadIdx.x / kWarpSize, pairs = R * M;
    void* own = ctx.peers.base[me];
    for (int first = blockIdx.x; first < pairs; first += kPairRound * G) {  // pair of warp w: first + w * G
        const int round_pairs = min(kPairRound, (pairs - first + G - 1) / G);
        __syncthreads();  // the previous round is done with ps
        if (warp < round_pairs) resolve_pair(p, R, first + warp * G, ps, warp);
        __syncthreads();
        for (int it = threadIdx.x; it < round_pairs * chunks; it += blockDim.x) {
            const int w = it / chunks, c = it % chunks, n = ps.num[w];
            if (n == 0) continue;
            const int q = first + w * G, s = q / M, t = q % M;
            float acc[8] = {};
            for (int u0 = 0; u0 < n; u0 += kCombineGroup) {
                int4 raw[kCombineGroup];
#pragma unroll
                for (int u = 0; u < kCombineGroup; ++u)
                    if (u0 + u < n)
                        raw[u] = ptx::ld_nc_v4(reinterpret_cast<const int4*>(static_cast<const char*>(p.x) +
                                                                             int64_t(ps.slot[w][u0 + u]) * H * 2) +
                                               c);
#pragma unroll
                for (int u = 0; u < kCombineGroup; ++u)
                    if (u0 + u < n) accumulate(acc, raw[u], ps.weight[w][u0 + u]);
            }
            const Bf16x8 o = to_bf16x8(acc);
            char* dst = is_rma(rma, s) ? p.layout.send_combine(own, half, q)
                                       : on_peer(ctx, s, p.layout.combine_slot(own, half, t * R + me));
            ptx::st_na_v4(reinterpret_cast<int4*>(dst) + c, *reinterpret_cast<const int4*>(&o));
        }
        if (rma.peers != 0) {  // staged rows to their RMA ranks (see rma_put_warp)
            __syncthreads();
            const int q = first + warp * G;
            if (warp < round_pairs && ps.num[warp] > 0 && is_rma(rma, q / M))
                rma_put_warp(ctx, rma, q / M, p.layout.combine_slot(own, half, (q % M) * R + me),
                             p.layout.send_combine(own, half, q), int64_t(H) * 2);
        }
    }
}

// Combine send, one row per slot.  Grid as the dispatch receive: a warp sends one filled slot
// (l, j) of x back to its source rank s, into row (token * K + top-k column) of s's combine area.
__device__ void combine_send_slots(const LowLatencyCombineParams& p, const RankContext& ctx, const LowLatencyRma& rma,
                                   RecvShared& sh, int half) {
    const int R = ctx.num_ranks, L = p.layout.num_local_experts, M = p.layout.max_tokens, K = p.num_topk;
    const int RM = R * M, warp = threadIdx.x / kWarpSize;
    const int64_t row_bytes = int64_t(p.layout.hidden) * 2;
    void* own = ctx.peers.base[ctx.rank];
    const ExpertShare share = expert_share(L);
    for (int l = share.first; l < L; l += share.step) {
        if (threadIdx.x == 0) {
            int64_t ranges[kMaxRanks];
#pragma unroll
            for (int s = 0; s < kMaxRanks; ++s) ranges[s] = s < R ? p.recv_layout_range[l * R + s] : 0;
            int64_t end = 0;
#pragma unroll
            for (int s = 0; s < kMaxRanks; ++s) {
                if (s >= R) break;
                const int64_t range = ranges[s];
                sh.offset[s] = static_cast<int>(range >> 32);
                sh.count[s] = static_cast<int>(range & 0xffffffff);
                end = max(end, (range >> 32) + (range & 0xffffffff));
            }
            sh.offset[R] = static_cast<int>(min(end, int64_t(RM)));
        }
        __syncthreads();
        for (int j = share.sub * kWarps + warp; j < sh.offset[R]; j += share.num_subs * kWarps) {
            int s = 0;
            while (s < R && !(j >= sh.offset[s] && j < sh.offset[s] + sh.count[s])) ++s;
            const int t = p.recv_src_info[int64_t(l) * RM + j], k = p.recv_topk_pos[int64_t(l) * RM + j];
            if (s == R || t < 0 || t >= M || k < 0 || k >= K) continue;
            char* own_dst = p.layout.combine_slot(own, half, t * K + k);
            const char* src = static_cast<const char*>(p.x) + (int64_t(l) * RM + j) * row_bytes;
            if (is_rma(rma, s)) {  // staged, then put (see rma_put_warp)
                char* staged = p.layout.send_combine(own, half, int64_t(l) * RM + j);
                warp_copy<kCopyUnroll, false>(staged, src, row_bytes);
                __syncwarp();
                rma_put_warp(ctx, rma, s, own_dst, staged, row_bytes);
            } else {
                warp_copy<kCopyUnroll, false>(on_peer(ctx, s, own_dst), src, row_bytes);
            }
        }
        __syncthreads();
    }
}

// Combine send (sums per rank: combine_send_per_rank, else combine_send_slots), then the arrivals.
template <bool kPerRank>
__device__ void combine_send(const LowLatencyCombineParams& p, const RankContext& ctx, const LowLatencyRma& rma,
                             RecvShared& sh, PairShared* ps) {
    const int64_t seq = begin_send(ctx, &sh.seq, &sh.flag);
    trace_mark(p.trace, kTraceBegun, blockIdx.x == 0);
    const int half = static_cast<int>(seq & 1);
    __syncthreads();
    if (sh.flag) return;
    write_headers(ctx, rma, p.info, seq);
    if constexpr (kPerRank)
        combine_send_per_rank(p, ctx, rma, *ps, half);
    else
        combine_send_slots(p, ctx, rma, sh, half);
    trace_mark(p.trace, kTraceSent, blockIdx.x == 0);
    signal_arrival(ctx, rma, seq);
    trace_mark(p.trace, kTraceSignalled, blockIdx.x == 0);
    if (block_is_last(LowLatencyLayout::done(ctx.peers.base[ctx.rank], kSendPhase, half), &sh.flag))
        record_seq(ctx, seq, p.call_seq);
}

// Rows of hidden % 8 != 0 (e.g. the top-k-wide rows of the weight gradient): one channel per thread.
__device__ void combine_reduce_scalar(const LowLatencyCombineParams& p, void* own, int half) {
    const int K = p.num_topk, H = p.layout.hidden;
    const int64_t items = int64_t(p.num_tokens) * H;
    for (int64_t it = blockIdx.x * int64_t(kThreads) + threadIdx.x; it < items; it += int64_t(gridDim.x) * kThreads) {
        const int t = static_cast<int>(it / H), c = static_cast<int>(it % H);
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
            const int64_t e = p.topk_idx[int64_t(t) * K + k];
            if (e < 0 || e >= p.num_experts) continue;
            const auto* row = reinterpret_cast<const unsigned short*>(p.layout.combine_slot(own, half, t * K + k));
            const unsigned short bits = __ldcg(row + c);
            acc = __fadd_rn(
                acc, __fmul_rn(__bfloat162float(__ushort_as_bfloat16(bits)), p.topk_weights[int64_t(t) * K + k]));
        }
        static_cast<__nv_bfloat16*>(p.out)[it] = __float2bfloat16_rn(acc);
    }
}

// Combine receive with sums per rank: out = the sum of the rows the token's ranks sent (one per
// rank that holds one of its experts), FP32 in ascending rank order, BF16 once.
__device__ void combine_sum_ranks(const LowLatencyCombineParams& p, int R, void* own, int half) {
    const int K = p.num_topk, H = p.layout.hidden, chunks = H / 8, L = p.layout.num_local_experts;
    const int64_t items = int64_t(p.num_tokens) * chunks;
    for (int64_t it = blockIdx.x * int64_t(kThreads) + threadIdx.x; it < items; it += int64_t(gridDim.x) * kThreads) {
        const int t = static_cast<int>(it / chunks), c = static_cast<int>(it % chunks);
        int ranks = token_ranks(p.topk_idx, t, K, p.num_experts, L);
        float acc[8] = {};
        while (ranks != 0) {
            int4 raw[kCombineGroup];
            int n = 0;
#pragma unroll
            for (int u = 0; u < kCombineGroup; ++u) {
                if (ranks == 0) break;
                const int r = __ffs(ranks) - 1;
                ranks &= ranks - 1;
                raw[u] = ptx::ld_cg_v4(reinterpret_cast<const int4*>(p.layout.combine_slot(own, half, t * R + r)) + c);
                n = u + 1;
            }
#pragma unroll
            for (int u = 0; u < kCombineGroup; ++u)
                if (u < n) accumulate<false>(acc, raw[u]);
        }
        reinterpret_cast<Bf16x8*>(static_cast<char*>(p.out) + int64_t(t) * H * 2)[c] = to_bf16x8(acc);
    }
}

// Combine receive, one row per slot (hidden % 8 == 0).  Grid-strided over (token, 8-channel
// chunk): out = sum over k ascending of w[t, k] * row(t, k), FP32 products and sums rounded one by
// one (as the reference), BF16 once.  A lane takes the top-k entries kCombineGroup at a time: the
// ids and weights of the group are loaded together, then the group's row chunks, so a token costs
// two round trips per group instead of two per entry.
__device__ void combine_reduce_slots(const LowLatencyCombineParams& p, void* own, int half) {
    const int K = p.num_topk, H = p.layout.hidden, chunks = H / 8;
    const int64_t items = int64_t(p.num_tokens) * chunks;
    for (int64_t it = blockIdx.x * int64_t(kThreads) + threadIdx.x; it < items; it += int64_t(gridDim.x) * kThreads) {
        const int t = static_cast<int>(it / chunks), c = static_cast<int>(it % chunks);
        float acc[8] = {};
        for (int k0 = 0; k0 < K; k0 += kCombineGroup) {
            bool valid[kCombineGroup];
            float w[kCombineGroup];
            int4 raw[kCombineGroup];
#pragma unroll
            for (int u = 0; u < kCombineGroup; ++u) {
                const int k = k0 + u;
                const int64_t e = k < K ? p.topk_idx[int64_t(t) * K + k] : -1;
                w[u] = k < K ? p.topk_weights[int64_t(t) * K + k] : 0.0f;
                valid[u] = e >= 0 && e < p.num_experts;
            }
#pragma unroll
            for (int u = 0; u < kCombineGroup; ++u)
                if (valid[u])
                    raw[u] = ptx::ld_cg_v4(
                        reinterpret_cast<const int4*>(p.layout.combine_slot(own, half, t * K + k0 + u)) + c);
#pragma unroll
            for (int u = 0; u < kCombineGroup; ++u)
                if (valid[u]) accumulate(acc, raw[u], w[u]);
        }
        reinterpret_cast<Bf16x8*>(static_cast<char*>(p.out) + int64_t(t) * H * 2)[c] = to_bf16x8(acc);
    }
}

// Combine receive: wait for every source, reduce (sums per rank: combine_sum_ranks; else one row
// per slot, vectorised or one channel per thread), acknowledge.
template <bool kPerRank>
__device__ void combine_recv(const LowLatencyCombineParams& p, const RankContext& ctx, const LowLatencyRma& rma,
                             RecvShared& sh, int64_t seq) {
    const int half = static_cast<int>(seq & 1);
    void* own = ctx.peers.base[ctx.rank];
    if (wait_sources(ctx, p.info, seq, kWaitLowLatencyCombine, &sh.flag)) return;
    trace_mark(p.trace, kTraceSourcesSeen, blockIdx.x == 0);
    if constexpr (kPerRank)
        combine_sum_ranks(p, ctx.num_ranks, own, half);
    else if (p.layout.hidden % 8 != 0)
        combine_reduce_scalar(p, own, half);
    else
        combine_reduce_slots(p, own, half);
    trace_mark(p.trace, kTraceReceived, blockIdx.x == 0);
    acknowledge(ctx, rma, seq);
    trace_mark(p.trace, kTraceAcked, blockIdx.x == 0);
}

template <bool kRma, bool kPerRank>
__global__ void __launch_bounds__(kThreads, 1)
    low_latency_combine_kernel(const __grid_constant__ LowLatencyCombineParams p,
                               const __grid_constant__ RankContext ctx, int phases) {
    const LowLatencyRma rma = kRma ? p.rma : LowLatencyRma{};
    __shared__ RecvShared sh;
    int64_t seq;
    trace_mark(p.trace, kTraceStart, blockIdx.x == 0);
    if (phases & kPhaseSend) {  // a failure stops the receive phase at its first wait (see dispatch)
        if constexpr (kPerRank) {
            __shared__ PairShared pair_sh;
            combine_send<true>(p, ctx, rma, sh, &pair_sh);
        } else {
            combine_send<false>(p, ctx, rma, sh, nullptr);
        }
        seq = sh.seq;
    } else {
        if (has_failed(ctx.err)) return;
        seq = ptx::ld_volatile(p.call_seq);
    }
    if (phases & kPhaseRecv) combine_recv<kPerRank>(p, ctx, rma, sh, seq);
    trace_mark(p.trace, kTraceEnd, blockIdx.x == 0);
}

}  // namespace

void load_low_latency_kernels() {
    load_kernel(low_latency_dispatch_kernel<false>, "low_latency_dispatch kernel");
    load_kernel(low_latency_combine_kernel<false, false>, "low_latency_combine kernel");
    load_kernel(low_latency_combine_kernel<false, true>, "low_latency_combine kernel (sums per rank)");
    load_kernel(low_latency_dispatch_kernel<true>, "low_latency_dispatch kernel (RMA)");
    load_kernel(low_latency_combine_kernel<true, false>, "low_latency_combine kernel (RMA)");
    load_kernel(low_latency_combine_kernel<true, true>, "low_latency_combine kernel (RMA, sums per rank)");
}

void launch_low_latency_dispatch(const LowLatencyDispatchParams& p, const RankContext& ctx, int phases, int num_sms,
                                 cudaStream_t stream) {
    if (p.rma.peers != 0)
        low_latency_dispatch_kernel<true><<<num_sms, kThreads, 0, stream>>>(p, ctx, phases);
    else
        low_latency_dispatch_kernel<false><<<num_sms, kThreads, 0, stream>>>(p, ctx, phases);
    check_cuda(cudaGetLastError(), "low_latency_dispatch launch");
}

void launch_low_latency_combine(const LowLatencyCombineParams& p, const RankContext& ctx, int phases, int num_sms,
                                cudaStream_t stream) {
    auto* kernel =
        p.rma.peers != 0
            ? (p.slot_of != nullptr ? low_latency_combine_kernel<true, true> : low_latency_combine_kernel<true, false>)
            : (p.slot_of != nullptr ? low_latency_combine_kernel<false, true>
                                    : low_latency_combine_kernel<false, false>);
    kernel<<<num_sms, kThreads, 0, stream>>>(p, ctx, phases);
    check_cuda(cudaGetLastError(), "low_latency_combine launch");
}

}  // namespace ep_train
