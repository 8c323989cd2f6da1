// Host side of the intranode (NVLink) backend: buffer allocation, CUDA IPC, the pinned error
// mailbox, and the kernel launchers.  No torch headers: raw pointers and cudaStream_t only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ep_train/buffer_layout.cuh"
#include "ep_train/types.cuh"
#include "peer_buffer.hpp"

namespace ep_train {

// The NVLink buffer of the normal kernels and the one host sync of a layout-free dispatch.
class IntranodeRuntime : public PeerBuffer {
  public:
    // external: adopt that device memory (see PeerBuffer), e.g. every rank's buffer in one process.
    IntranodeRuntime(int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_s, void* external = nullptr);

    RankContext context() const { return PeerBuffer::context(IntranodeLayout::status(local())); }
    int64_t num_nvl_bytes() const { return num_bytes(); }

    // Host sync of a layout-free dispatch: clear before notify, then wait for the counts.
    void clear_recv_ready();
    // Returns 0 with the counts filled, an ErrorCode reported by a kernel (see error_fields), or -1
    // when the host itself waited longer than timeout_s.
    int wait_recv(cudaStream_t stream, double timeout_s, int num_local_experts, int* num_recv_tokens,
                  std::vector<int>* per_expert);
};

// ---------------------------------------------------------------- kernels (launch on `stream`)

// Loads a kernel now (cudaFuncGetAttributes does) rather than at its first launch, as
// CUDA_MODULE_LOADING=LAZY (the default) would.
template <typename Kernel>
void load_kernel(Kernel* kernel, const char* what) {
    cudaFuncAttributes attributes;
    check_cuda(cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel)), what);
}
// Each loads every kernel of its file.  The IntranodeRuntime loads them all when it is created:
// a lazy load at a launch may wait for the process's kernels already running, and those may be
// waiting for peers (with every rank in one process, ep_train.testing.one_gpu, first calls stalled
// for seconds).
void load_layout_kernels();
void load_permute_kernels();
void load_copy_rows_kernels();
void load_notify_kernels();
void load_prepare_kernels();
void load_dispatch_kernels();
void load_combine_kernels();
void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                                int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                                const ErrorSink& err, cudaStream_t stream);
// Megatron's routing map [T, E] bool and probs [T, E] (FP32, or BF16 with probs_bf16) -> topk_idx
// [T, K] int64 (the selected experts, ascending, then -1) and weights [T, K] FP32 (their probs, 0
// for -1).  A row selecting more than K experts keeps its K lowest ids.
void launch_routing_topk(const bool* routing_map, const void* probs, bool probs_bf16, int64_t num_tokens,
                         int num_experts, int num_topk, int64_t* topk_idx, float* weights, cudaStream_t stream);

// out[n] = sum of y[pos[n, k]] over k with pos in [0, num_pair_rows); FP32 accumulation, ascending k.
// y/out are BF16 (bf16=true) or FP32, hidden % (16 bytes / element size) == 0; num_topk <= 32.
void launch_sum_pairs(const void* y, const int64_t* pos, void* out, bool bf16, int64_t num_rows, int num_topk,
                      int64_t num_pair_rows, int hidden, cudaStream_t stream);

// SwiGLU rows of the grouped-GEMM experts: out [rows, ffn] = silu(a) * b * probs for h [rows, 2 ffn]
// = [a | b], BF16, probs FP32 [rows] or null (= 1); FP32 arithmetic, one rounding.  The backward
// writes grad_h [rows, 2 ffn] and, when grad_probs is not null, grad_probs [rows] (FP32).
// ffn % 8 == 0, rows 16-byte aligned.
void launch_swiglu_forward(const void* h, const float* probs, void* out, int64_t rows, int ffn, cudaStream_t stream);
void launch_swiglu_backward(const void* h, const float* probs, const void* grad_out, void* grad_h, float* grad_probs,
                            int64_t rows, int ffn, cudaStream_t stream);

// The expert-major layout of the pairs of idx [num_rows, num_topk] (local expert ids, anything
// outside [0, num_local) = no pair), as ep_train/permute.py's op-by-op path: pos [num_rows *
// num_topk] (num_pair_rows where no pair), row_P / pair_P [num_pair_rows] (num_rows / num_rows *
// num_topk for padding).  scratch: int32 [pair_layout_scratch_ints(num_rows * num_topk, num_local)].
// num_local <= kPairLayoutMaxLocalExperts; num_pair_rows = the sum of the aligned per-expert counts.
constexpr int kPairLayoutMaxLocalExperts = 384;  // a [32 warps][L] int table in 48 KB of shared memory
int64_t pair_layout_scratch_ints(int64_t num_slots, int num_local);
void launch_pair_layout(const int64_t* idx, int64_t num_rows, int num_topk, int num_local, int alignment,
                        int64_t num_pair_rows, int* scratch, int64_t* pos, int64_t* row_P, int64_t* pair_P,
                        cudaStream_t stream);

// rank[t, k] = how many slots before t * K + k hold the expert idx[t, k] (global ids in
// [0, num_experts), anything else: no expert, rank unspecified): a token's place among this rank's
// tokens of that expert, which an expert-major dispatch sends along.  Same launches as
// launch_pair_layout with every expert starting at 0; num_experts <= kPairLayoutMaxLocalExperts.
void launch_expert_ranks(const int64_t* idx, int64_t num_tokens, int num_topk, int num_experts, int* scratch,
                         int64_t* rank, cudaStream_t stream);

// dst[i] = src[i] for num_rows rows of row_bytes on num_sms blocks: 16-byte warp copies, or bulk
// copies through shared memory (row_bytes % 16 == 0, at most 24 KB).
void launch_copy_rows(void* dst, const void* src, int64_t num_rows, int64_t row_bytes, int num_sms, bool use_bulk,
                      cudaStream_t stream);

struct NotifyParams {
    const bool* is_token_in_rank;      // [T, R]
    const int* num_tokens_per_expert;  // [E] or null (no top-k)
    int num_tokens, num_experts, num_channels, expert_alignment, num_worst_tokens;
    bool host_sync;  // report the counts to the mailbox (false on the num_worst_tokens path)
    int64_t info[kInfoWords];
    int* rank_prefix_matrix;     // [R, R] inclusive over source rank
    int* recv_chan_start;        // [R, C + 1] rows of source s, channel c in recv_x
    int* send_chan_base;         // [R, C] first recv row (at rank r) of my channel-c tokens
    int* num_tokens_per_source;  // [R]
    int* num_recv_per_expert;    // [L], aligned
    int* num_recv_tokens;        // [1]
    int* pair_base;              // [R, L] or null: first expert-major row of (source s, local expert e)
};
void launch_notify(const NotifyParams& p, const RankContext& ctx, cudaStream_t stream);

struct PrepareParams {
    const int* recv_src_idx;           // [N] of the handle
    const int* rank_prefix_matrix;     // [R, R]
    const int* num_tokens_per_source;  // [R]
    int num_channels;
    int64_t info[kInfoWords];
    int* recv_chan_start;  // [R, C + 1]
};
void launch_prepare(const PrepareParams& p, const RankContext& ctx, cudaStream_t stream);

// How an expert-major dispatch places rows: not at all (plain dispatch), from the ranks the senders
// send along with each row (first call), or from pair_pos (cached call).
enum PairMode : int { kPairsOff = 0, kPairsFromRanks = 1, kPairsFromPos = 2 };

struct DispatchParams {
    const void* x;                 // [T, H] BF16 or FP8 rows
    const float* x_scales;         // [T, S] or null
    const int64_t* topk_idx;       // [T, K] or null
    const float* topk_weights;     // [T, K] or null
    const bool* is_token_in_rank;  // [T, R]
    void* recv_x;
    float* recv_x_scales;
    int64_t* recv_topk_idx;
    float* recv_topk_weights;
    int* recv_src_idx;
    int* send_pos;               // [T, R] or null (cached mode)
    const int* send_chan_base;   // [R, C] (with send_pos)
    const int* recv_chan_start;  // [R, C + 1]
    // Expert-major mode (pair_mode != kPairsOff): recv_x / recv_x_scales are [P, ...] with one row
    // per (received row, local expert) pair; rows of an expert by source rank, then source token.
    // NOTES: the mode is a field of its own, not "pointer set": a rank that receives nothing (N = 0)
    // or sends nothing (T = 0) has empty, null tensors but must still run the senders' pair protocol.
    PairMode pair_mode;
    int64_t* pair_pos;           // [N, K]: row of each pair, num_pair_rows where none (written, or read when cached)
    const int64_t* expert_rank;  // [T, K] (kPairsFromRanks): token's rank among this rank's tokens of the expert
    const int* pair_base;        // [R, L] (kPairsFromRanks): first row of (source, local expert)
    float* pair_probs;           // [P] or null: topk_weights of each pair
    int64_t num_pair_rows;
    int pair_topk;  // K of pair_pos (num_topk is 0 in cached mode)
    int num_tokens, num_scales, num_topk, num_local_experts, chunk_tokens;
    int64_t payload_bytes;  // bytes of one x row
    IntranodeLayout layout;
};
void launch_dispatch(const DispatchParams& p, const RankContext& ctx, int num_sms, cudaStream_t stream);

struct CombineParams {
    const void* x;              // [N, H] BF16
    const float* topk_weights;  // [N, K] or null
    const void* bias0;          // [T, H] or null
    const void* bias1;
    const bool* is_token_in_rank;  // [T, R]
    const int* recv_chan_start;    // [R, C + 1]
    void* combined_x;              // [T, H]
    float* combined_topk_weights;  // [T, K] or null
    // Expert-major mode: x is [P, H] expert-major rows, and received row n is the FP32 sum of rows
    // pair_pos[n, :] (ascending k) rounded to BF16, as sum_pairs computes it.
    bool expert_major;
    const int64_t* pair_pos;  // [N, pair_topk] (null when N = 0)
    int64_t num_pair_rows;
    int pair_topk;
    int num_tokens, hidden, num_topk, chunk_tokens;
    IntranodeLayout layout;
};
void launch_combine(const CombineParams& p, const RankContext& ctx, int num_sms, cudaStream_t stream);

}  // namespace ep_train
