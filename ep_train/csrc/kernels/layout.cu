// get_dispatch_layout: top-k expert ids -> per-rank / per-expert token counts and the
// token-in-rank mask.  Counts are integer atomics, so the result is exact in any order.
// routing_topk: Megatron's routing map and probs -> top-k expert ids and their weights.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "ep_train/buffer_layout.cuh"
#include "ep_train/timeout.cuh"
#include "runtime.hpp"

namespace ep_train {

namespace {

constexpr int kLayoutThreads = 256;

// Grid: one thread per token, kLayoutThreads tokens per block.  Each block histograms its tokens
// in shared memory and adds the non-zero bins to the (zeroed) global counts.  An id that is neither
// -1 nor an expert is counted nowhere and reported to `err` (when it has a status word): the next
// call of that buffer raises, so no token is dropped in silence.
__global__ void __launch_bounds__(kLayoutThreads)
    get_dispatch_layout_kernel(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                               int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                               ErrorSink err) {
    __shared__ int s_expert[kMaxExperts];
    __shared__ int s_rank[kMaxRanks];
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x) s_expert[i] = 0;
    if (threadIdx.x < kMaxRanks) s_rank[threadIdx.x] = 0;
    __syncthreads();

    const int num_local = num_experts / num_ranks;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < num_tokens) {
        unsigned mask = 0;
        for (int k = 0; k < num_topk; ++k) {
            int64_t e = topk_idx[int64_t(t) * num_topk + k];
            if (e < 0 || e >= num_experts) {  // -1: no expert
                if (e != -1 && err.status != nullptr)
                    report_error(err, kErrBadExpert, kCheckExpertIds, t, k, num_experts, e);
                continue;
            }
            atomicAdd(&s_expert[e], 1);
            mask |= 1u << (static_cast<int>(e) / num_local);
        }
        for (int r = 0; r < num_ranks; ++r) {
            bool in = (mask >> r) & 1u;
            is_token_in_rank[int64_t(t) * num_ranks + r] = in;
            if (in) atomicAdd(&s_rank[r], 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x)
        if (s_expert[i] != 0) atomicAdd(&num_tokens_per_expert[i], s_expert[i]);
    if (threadIdx.x < num_ranks && s_rank[threadIdx.x] != 0)
        atomicAdd(&num_tokens_per_rank[threadIdx.x], s_rank[threadIdx.x]);
}

__device__ __forceinline__ float to_float(float v) {
    return v;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

// Grid: one warp per token, kLayoutThreads / 32 tokens per block.  The warp reads the token's row
// of the routing map 32 experts at a time; each selected expert takes the next top-k column
// (ascending ids), with its probability as weight; columns left over get -1 and weight 0.  Selected
// experts past num_topk are not kept (the router selects at most num_topk), and the scan stops once
// num_topk are found.
template <typename P>
__global__ void __launch_bounds__(kLayoutThreads)
    routing_topk_kernel(const bool* routing_map, const P* probs, int64_t num_tokens, int num_experts, int num_topk,
                        int64_t* topk_idx, float* weights) {
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    if (t >= num_tokens) return;  // whole warps: blockDim.x is a multiple of 32
    const bool* row = routing_map + t * num_experts;
    int64_t* idx = topk_idx + t * num_topk;
    float* w = weights + t * num_topk;
    int taken = 0;  // the same in every lane
    for (int e0 = 0; e0 < num_experts && taken < num_topk; e0 += 32) {
        const int e = e0 + lane;
        const bool on = e < num_experts && row[e];
        const unsigned mask = __ballot_sync(0xffffffffu, on);
        const int col = taken + __popc(mask & ((1u << lane) - 1u));
        if (on && col < num_topk) {
            idx[col] = e;
            w[col] = to_float(probs[t * num_experts + e]);
        }
        taken += __popc(mask);
    }
    for (int col = taken + lane; col < num_topk; col += 32) {
        idx[col] = -1;
        w[col] = 0.0f;
    }
}

}  // namespace

void launch_routing_topk(const bool* routing_map, const void* probs, bool probs_bf16, int64_t num_tokens,
                         int num_experts, int num_topk, int64_t* topk_idx, float* weights, cudaStream_t stream) {
    if (num_tokens == 0) return;
    constexpr int kTokensPerBlock = kLayoutThreads / 32;
    const auto blocks = static_cast<unsigned>((num_tokens + kTokensPerBlock - 1) / kTokensPerBlock);
    if (probs_bf16)
        routing_topk_kernel<<<blocks, kLayoutThreads, 0, stream>>>(routing_map,
                                                                   static_cast<const __nv_bfloat16*>(probs), num_tokens,
                                                                   num_experts, num_topk, topk_idx, weights);
    else
        routing_topk_kernel<<<blocks, kLayoutThreads, 0, stream>>>(
            routing_map, static_cast<const float*>(probs), num_tokens, num_experts, num_topk, topk_idx, weights);
    check_cuda(cudaGetLastError(), "routing_topk launch");
}

void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                                int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                                const ErrorSink& err, cudaStream_t stream) {
    check_cuda(cudaMemsetAsync(num_tokens_per_rank, 0, sizeof(int) * num_ranks, stream), "memset layout counts");
    check_cuda(cudaMemsetAsync(num_tokens_per_expert, 0, sizeof(int) * num_experts, stream), "memset layout counts");
    if (num_tokens == 0) return;
    const int blocks = (num_tokens + kLayoutThreads - 1) / kLayoutThreads;
    get_dispatch_layout_kernel<<<blocks, kLayoutThreads, 0, stream>>>(topk_idx, num_tokens, num_topk, num_experts,
                                                                      num_ranks, num_tokens_per_rank,
                                                                      num_tokens_per_expert, is_token_in_rank, err);
    check_cuda(cudaGetLastError(), "get_dispatch_layout launch");
}

void load_layout_kernels() {
    load_kernel(get_dispatch_layout_kernel, "dispatch layout kernel");
    load_kernel(routing_topk_kernel<float>, "routing top-k kernel");
    load_kernel(routing_topk_kernel<__nv_bfloat16>, "routing top-k kernel");
}

}  // namespace ep_train
