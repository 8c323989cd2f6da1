// prepare: the first step of a cached dispatch and of a combine.  Rebuilds the per-(source,
// channel) row ranges of recv_x for this call's channel count from the handle (binary search in
// recv_src_idx, which is sorted within each source's block), then passes the cross-rank barrier
// with the call-header check.
#include <cuda_runtime.h>

#include "ep_train/barrier.cuh"
#include "ep_train/buffer_layout.cuh"
#include "runtime.hpp"

namespace ep_train {

namespace {

constexpr int kPrepareThreads = 256;

// Grid: one block; thread i computes entry i of recv_chan_start [R, C + 1], then all threads
// take part in the barrier.
__global__ void __launch_bounds__(kPrepareThreads, 1)
    prepare_kernel(const __grid_constant__ PrepareParams p, const __grid_constant__ RankContext ctx) {
    __shared__ int64_t s_seq;
    if (has_failed(ctx.err)) return;
    const int R = ctx.num_ranks, C = p.num_channels, me = ctx.rank;
    for (int i = threadIdx.x; i < R * (C + 1); i += blockDim.x) {
        const int s = i / (C + 1), c = i % (C + 1);
        int lo = s == 0 ? 0 : p.rank_prefix_matrix[(s - 1) * R + me];
        int hi = p.rank_prefix_matrix[s * R + me];
        const int first_token = channel_token_begin(p.num_tokens_per_source[s], C, c);
        while (lo < hi) {  // first row of block s whose source token >= first_token
            const int mid = (lo + hi) / 2;
            if (p.recv_src_idx[mid] < first_token)
                lo = mid + 1;
            else
                hi = mid;
        }
        p.recv_chan_start[i] = lo;
    }
    barrier_begin(ctx, &s_seq);
    barrier_finish(ctx, p.info, s_seq);
}

}  // namespace

void launch_prepare(const PrepareParams& p, const RankContext& ctx, cudaStream_t stream) {
    prepare_kernel<<<1, kPrepareThreads, 0, stream>>>(p, ctx);
    check_cuda(cudaGetLastError(), "prepare launch");
}

void load_prepare_kernels() {
    load_kernel(prepare_kernel, "prepare kernel");
}

}  // namespace ep_train
