// get_dispatch_layout: top-k expert ids -> per-rank / per-expert token counts and the
// token-in-rank mask.  Counts are integer atomics, so the result is exact in any order.
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

}  // namespace

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
}

}  // namespace ep_train
