// Python module ep_train._C: checks tensor arguments, turns them into raw pointers and launches the
// kernels on the current CUDA stream (Buffer has made that its communication stream).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "low_latency_runtime.hpp"
#include "nvshmem_host.hpp"
#include "runtime.hpp"

namespace py = pybind11;
using ep_train::IntranodeLayout;
using ep_train::IntranodeRuntime;
using ep_train::LowLatencyLayout;
using ep_train::LowLatencyRuntime;
using OptTensor = std::optional<torch::Tensor>;

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype, int64_t dim) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
}

template <typename T>
T* ptr_or_null(const OptTensor& t) {
    return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

void fill_info(int64_t (&dst)[ep_train::kInfoWords], const std::vector<int64_t>& info) {
    TORCH_CHECK(info.size() == ep_train::kInfoWords, "call header must have ", ep_train::kInfoWords, " words, got ",
                info.size());
    for (int i = 0; i < ep_train::kInfoWords; ++i) dst[i] = info[i];
}

IntranodeLayout make_layout(const IntranodeRuntime& rt, int64_t hidden, int num_sms, int ring_tokens) {
    TORCH_CHECK(num_sms >= 2 && num_sms % 2 == 0, "num_sms must be even and >= 2, got ", num_sms);
    TORCH_CHECK(num_sms / 2 <= ep_train::kMaxChannels, "num_sms must be <= ", 2 * ep_train::kMaxChannels, ", got ",
                num_sms);
    IntranodeLayout layout(hidden * 2, rt.context().num_ranks, num_sms / 2, ring_tokens);
    TORCH_CHECK(layout.total_bytes() <= rt.num_nvl_bytes(), "num_nvl_bytes=", rt.num_nvl_bytes(),
                " is too small: this call needs ", layout.total_bytes());
    return layout;
}

cudaStream_t stream() {
    return c10::cuda::getCurrentCUDAStream().stream();
}

// runtime: None, or the IntranodeRuntime / LowLatencyRuntime whose mailbox hears of ids out of range.
void get_dispatch_layout(const torch::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, torch::Tensor& per_rank,
                         torch::Tensor& per_expert, torch::Tensor& in_rank, const py::object& runtime) {
    check(topk_idx, "topk_idx", torch::kInt64, 2);
    check(per_rank, "num_tokens_per_rank", torch::kInt32, 1);
    check(per_expert, "num_tokens_per_expert", torch::kInt32, 1);
    check(in_rank, "is_token_in_rank", torch::kBool, 2);
    TORCH_CHECK(num_experts <= ep_train::kMaxExperts, "num_experts must be <= ", ep_train::kMaxExperts);
    TORCH_CHECK(num_ranks <= ep_train::kMaxRanks, "num_ranks must be <= ", ep_train::kMaxRanks);
    c10::cuda::CUDAGuard guard(topk_idx.device());
    ep_train::ErrorSink err{};
    if (py::isinstance<IntranodeRuntime>(runtime))
        err = runtime.cast<const IntranodeRuntime&>().context().err;
    else if (py::isinstance<LowLatencyRuntime>(runtime))
        err = runtime.cast<const LowLatencyRuntime&>().context().err;
    else
        TORCH_CHECK(runtime.is_none(), "runtime must be None, an IntranodeRuntime or a LowLatencyRuntime");
    ep_train::launch_get_dispatch_layout(topk_idx.data_ptr<int64_t>(), topk_idx.size(0), topk_idx.size(1), num_experts,
                                         num_ranks, per_rank.data_ptr<int>(), per_expert.data_ptr<int>(),
                                         in_rank.data_ptr<bool>(), err, stream());
}

void notify(IntranodeRuntime& rt, const torch::Tensor& in_rank, const OptTensor& per_expert, int64_t num_experts,
            int64_t num_channels, int64_t expert_alignment, int64_t num_worst_tokens, bool host_sync,
            const std::vector<int64_t>& info, torch::Tensor& rank_prefix, torch::Tensor& recv_chan_start,
            torch::Tensor& send_chan_base, torch::Tensor& num_tokens_per_source, torch::Tensor& num_recv_per_expert,
            torch::Tensor& num_recv_tokens, const OptTensor& pair_base) {
    auto ctx = rt.context();
    check(in_rank, "is_token_in_rank", torch::kBool, 2);
    TORCH_CHECK(in_rank.size(1) == ctx.num_ranks, "is_token_in_rank must have ", ctx.num_ranks, " columns");
    TORCH_CHECK(num_experts / ctx.num_ranks <= ep_train::kMaxExperts, "too many local experts");
    TORCH_CHECK(num_channels >= 1 && num_channels <= ep_train::kMaxChannels, "bad channel count ", num_channels);
    if (per_expert) check(*per_expert, "num_tokens_per_expert", torch::kInt32, 1);
    ep_train::NotifyParams p{};
    p.is_token_in_rank = in_rank.data_ptr<bool>();
    p.num_tokens_per_expert = ptr_or_null<const int>(per_expert);
    p.num_tokens = in_rank.size(0);
    p.num_experts = num_experts;
    p.num_channels = num_channels;
    p.expert_alignment = expert_alignment;
    p.num_worst_tokens = num_worst_tokens;
    p.host_sync = host_sync;
    fill_info(p.info, info);
    p.rank_prefix_matrix = rank_prefix.data_ptr<int>();
    p.recv_chan_start = recv_chan_start.data_ptr<int>();
    p.send_chan_base = send_chan_base.data_ptr<int>();
    p.num_tokens_per_source = num_tokens_per_source.data_ptr<int>();
    p.num_recv_per_expert = num_recv_per_expert.data_ptr<int>();
    p.num_recv_tokens = num_recv_tokens.data_ptr<int>();
    if (pair_base) {
        check(*pair_base, "pair_base", torch::kInt32, 2);
        TORCH_CHECK(pair_base->size(0) == ctx.num_ranks && pair_base->size(1) == num_experts / ctx.num_ranks,
                    "pair_base must be [num_ranks, num_local_experts]");
        p.pair_base = pair_base->data_ptr<int>();
    }
    if (host_sync) rt.clear_recv_ready();
    ep_train::launch_notify(p, ctx, stream());
}

py::tuple wait_recv(IntranodeRuntime& rt, double timeout_s, int64_t num_local_experts) {
    int num_recv = 0;
    std::vector<int> per_expert;
    int code;
    {
        py::gil_scoped_release release;
        code = rt.wait_recv(stream(), timeout_s, num_local_experts, &num_recv, &per_expert);
    }
    return py::make_tuple(code, num_recv, per_expert);
}

void prepare(IntranodeRuntime& rt, const torch::Tensor& recv_src_idx, const torch::Tensor& rank_prefix,
             const torch::Tensor& num_tokens_per_source, int64_t num_channels, const std::vector<int64_t>& info,
             torch::Tensor& recv_chan_start) {
    auto ctx = rt.context();
    check(recv_src_idx, "recv_src_idx", torch::kInt32, 1);
    check(rank_prefix, "rank_prefix_matrix", torch::kInt32, 2);
    check(recv_chan_start, "recv_chan_start", torch::kInt32, 2);
    TORCH_CHECK(num_channels >= 1 && num_channels <= ep_train::kMaxChannels, "bad channel count ", num_channels);
    ep_train::PrepareParams p{};
    p.recv_src_idx = recv_src_idx.data_ptr<int>();
    p.rank_prefix_matrix = rank_prefix.data_ptr<int>();
    p.num_tokens_per_source = num_tokens_per_source.data_ptr<int>();
    p.num_channels = num_channels;
    fill_info(p.info, info);
    p.recv_chan_start = recv_chan_start.data_ptr<int>();
    ep_train::launch_prepare(p, ctx, stream());
}

void dispatch(IntranodeRuntime& rt, const torch::Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
              const OptTensor& topk_weights, const torch::Tensor& in_rank, torch::Tensor& recv_x,
              const OptTensor& recv_scales, const OptTensor& recv_topk_idx, const OptTensor& recv_topk_weights,
              const OptTensor& recv_src_idx, const OptTensor& send_pos, const OptTensor& send_chan_base,
              const torch::Tensor& recv_chan_start, int64_t num_local_experts, int64_t num_sms, int64_t chunk_tokens,
              int64_t ring_tokens, const OptTensor& pair_pos, const OptTensor& expert_rank, const OptTensor& pair_base,
              const OptTensor& pair_probs, int64_t num_pair_rows) {
    auto ctx = rt.context();
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous 2-D CUDA tensor");
    TORCH_CHECK(x.element_size() <= 2, "dispatch moves BF16 or FP8 rows");
    TORCH_CHECK(recv_x.is_contiguous() && recv_x.size(1) == x.size(1), "recv_x must match x's hidden");
    check(in_rank, "is_token_in_rank", torch::kBool, 2);
    TORCH_CHECK(!send_pos || send_chan_base, "send_pos needs send_chan_base");
    const int64_t num_topk = topk_idx ? topk_idx->size(1) : 0;
    TORCH_CHECK(num_topk <= ep_train::kMaxTopk, "top-k must be <= ", ep_train::kMaxTopk);
    TORCH_CHECK(chunk_tokens >= 1 && ring_tokens >= 2 * chunk_tokens, "ring must hold two chunks");
    ep_train::DispatchParams p{};
    p.x = x.data_ptr();
    p.x_scales = ptr_or_null<const float>(x_scales);
    p.topk_idx = ptr_or_null<const int64_t>(topk_idx);
    p.topk_weights = ptr_or_null<const float>(topk_weights);
    p.is_token_in_rank = in_rank.data_ptr<bool>();
    p.recv_x = recv_x.data_ptr();
    p.recv_x_scales = ptr_or_null<float>(recv_scales);
    p.recv_topk_idx = ptr_or_null<int64_t>(recv_topk_idx);
    p.recv_topk_weights = ptr_or_null<float>(recv_topk_weights);
    p.recv_src_idx = ptr_or_null<int>(recv_src_idx);
    p.send_pos = ptr_or_null<int>(send_pos);
    p.send_chan_base = ptr_or_null<const int>(send_chan_base);
    p.recv_chan_start = recv_chan_start.data_ptr<int>();
    p.num_tokens = x.size(0);
    p.num_scales = x_scales ? x_scales->size(1) : 0;
    p.num_topk = num_topk;
    p.num_local_experts = num_local_experts;
    p.chunk_tokens = chunk_tokens;
    p.payload_bytes = x.size(1) * x.element_size();
    p.layout = make_layout(rt, x.size(1), num_sms, ring_tokens);
    if (pair_pos) {  // expert-major: recv_x [P, H], one row per (received row, local expert) pair
        check(*pair_pos, "pair_pos", torch::kInt64, 2);
        TORCH_CHECK(pair_pos->size(1) >= 1 && pair_pos->size(1) <= ep_train::kMaxTopk, "pair_pos must have 1 to ",
                    ep_train::kMaxTopk, " columns");
        TORCH_CHECK(recv_x.size(0) == num_pair_rows, "recv_x must have num_pair_rows=", num_pair_rows, " rows");
        TORCH_CHECK(!recv_scales || recv_scales->size(0) == num_pair_rows, "recv_x_scales must have ", num_pair_rows,
                    " rows");
        TORCH_CHECK(!recv_src_idx || recv_src_idx->size(0) == pair_pos->size(0),
                    "pair_pos must have a row per "
                    "received row");
        if (expert_rank) {  // first call: places rows from the ranks the senders send along
            check(*expert_rank, "expert_rank", torch::kInt64, 2);
            TORCH_CHECK(topk_idx && expert_rank->sizes() == topk_idx->sizes(), "expert_rank must match topk_idx");
            TORCH_CHECK(pair_pos->size(1) == num_topk, "pair_pos must have top-k columns");
            TORCH_CHECK(pair_base.has_value(), "expert_rank needs pair_base (from notify)");
            check(*pair_base, "pair_base", torch::kInt32, 2);
            p.pair_mode = ep_train::kPairsFromRanks;
            p.expert_rank = expert_rank->data_ptr<int64_t>();
            p.pair_base = pair_base->data_ptr<int>();
            if (pair_probs) {
                check(*pair_probs, "pair_probs", torch::kFloat32, 1);
                TORCH_CHECK(topk_weights.has_value(), "pair_probs needs topk_weights");
                p.pair_probs = pair_probs->data_ptr<float>();
            }
        } else {
            TORCH_CHECK(!topk_idx, "a cached expert-major dispatch takes its rows from pair_pos, not topk_idx");
            p.pair_mode = ep_train::kPairsFromPos;
        }
        p.pair_pos = pair_pos->data_ptr<int64_t>();
        p.pair_topk = pair_pos->size(1);
        p.num_pair_rows = num_pair_rows;
    }
    ep_train::launch_dispatch(p, ctx, num_sms, stream());
}

void combine(IntranodeRuntime& rt, const torch::Tensor& x, const OptTensor& topk_weights, const OptTensor& bias0,
             const OptTensor& bias1, const torch::Tensor& in_rank, const torch::Tensor& recv_chan_start,
             torch::Tensor& combined, const OptTensor& combined_weights, int64_t num_sms, int64_t chunk_tokens,
             int64_t ring_tokens, const OptTensor& pair_pos, int64_t num_pair_rows) {
    auto ctx = rt.context();
    check(x, "x", torch::kBFloat16, 2);
    check(combined, "combined_x", torch::kBFloat16, 2);
    check(in_rank, "is_token_in_rank", torch::kBool, 2);
    TORCH_CHECK(combined.size(1) == x.size(1), "combined_x must match x's hidden");
    const int64_t num_topk = topk_weights ? topk_weights->size(1) : 0;
    TORCH_CHECK(num_topk <= ep_train::kMaxTopk, "top-k must be <= ", ep_train::kMaxTopk);
    TORCH_CHECK(chunk_tokens >= 1 && ring_tokens >= 2 * chunk_tokens, "ring must hold two chunks");
    ep_train::CombineParams p{};
    p.x = x.data_ptr();
    p.topk_weights = ptr_or_null<const float>(topk_weights);
    p.bias0 = ptr_or_null<const void>(bias0);
    p.bias1 = ptr_or_null<const void>(bias1);
    p.is_token_in_rank = in_rank.data_ptr<bool>();
    p.recv_chan_start = recv_chan_start.data_ptr<int>();
    p.combined_x = combined.data_ptr();
    p.combined_topk_weights = ptr_or_null<float>(combined_weights);
    p.num_tokens = combined.size(0);
    p.hidden = x.size(1);
    p.num_topk = num_topk;
    p.chunk_tokens = chunk_tokens;
    p.layout = make_layout(rt, x.size(1), num_sms, ring_tokens);
    if (pair_pos) {  // expert-major: x [P, H], each received row the sum of its pair rows
        check(*pair_pos, "pair_pos", torch::kInt64, 2);
        TORCH_CHECK(pair_pos->size(1) >= 1 && pair_pos->size(1) <= ep_train::kMaxTopk, "pair_pos must have 1 to ",
                    ep_train::kMaxTopk, " columns");
        TORCH_CHECK(x.size(0) == num_pair_rows, "x must have num_pair_rows=", num_pair_rows, " rows");
        TORCH_CHECK(x.size(1) % 8 == 0, "an expert-major combine needs hidden % 8 == 0, got ", x.size(1));
        TORCH_CHECK(!topk_weights || topk_weights->size(0) == pair_pos->size(0),
                    "topk_weights must have a row per received row");
        p.expert_major = true;
        p.pair_pos = pair_pos->data_ptr<int64_t>();
        p.pair_topk = pair_pos->size(1);
        p.num_pair_rows = num_pair_rows;
    }
    ep_train::launch_combine(p, ctx, num_sms, stream());
}

// (pos [N, K], row_P [P], pair_P [P]) int64: where each pair of idx [N, K] sits in expert-major
// order (see permute.cu and ep_train/permute.py); P = num_pair_rows, the aligned total.
std::vector<torch::Tensor> pair_layout(const torch::Tensor& idx, int64_t num_local, int64_t alignment,
                                       int64_t num_pair_rows) {
    check(idx, "recv_topk_idx", torch::kInt64, 2);
    TORCH_CHECK(num_local >= 1 && num_local <= ep_train::kPairLayoutMaxLocalExperts,
                "num_local_experts must be in [1, ", ep_train::kPairLayoutMaxLocalExperts, "], got ", num_local);
    TORCH_CHECK(alignment >= 1, "alignment must be >= 1, got ", alignment);
    TORCH_CHECK(num_pair_rows >= 0, "num_pair_rows must be >= 0, got ", num_pair_rows);
    c10::cuda::CUDAGuard guard(idx.device());
    const int64_t n = idx.size(0), k = idx.size(1);
    auto opts = idx.options();
    auto pos = torch::empty({n, k}, opts);
    auto row_P = torch::empty({num_pair_rows}, opts);
    auto pair_P = torch::empty({num_pair_rows}, opts);
    auto scratch = torch::empty({ep_train::pair_layout_scratch_ints(n * k, static_cast<int>(num_local))},
                                opts.dtype(torch::kInt32));
    ep_train::launch_pair_layout(idx.data_ptr<int64_t>(), n, static_cast<int>(k), static_cast<int>(num_local),
                                 static_cast<int>(alignment), num_pair_rows, scratch.data_ptr<int>(),
                                 pos.data_ptr<int64_t>(), row_P.data_ptr<int64_t>(), pair_P.data_ptr<int64_t>(),
                                 stream());
    return {pos, row_P, pair_P};
}

// rank [T, K] int64: each (token, k)'s rank among the tokens before it with the same expert (see
// launch_expert_ranks); what an expert-major dispatch sends along.
torch::Tensor expert_ranks(const torch::Tensor& topk_idx, int64_t num_experts) {
    check(topk_idx, "topk_idx", torch::kInt64, 2);
    TORCH_CHECK(num_experts >= 1 && num_experts <= ep_train::kPairLayoutMaxLocalExperts, "num_experts must be in [1, ",
                ep_train::kPairLayoutMaxLocalExperts, "], got ", num_experts);
    c10::cuda::CUDAGuard guard(topk_idx.device());
    const int64_t t = topk_idx.size(0), k = topk_idx.size(1);
    auto rank = torch::empty({t, k}, topk_idx.options());
    auto scratch = torch::empty({ep_train::pair_layout_scratch_ints(t * k, static_cast<int>(num_experts))},
                                topk_idx.options().dtype(torch::kInt32));
    ep_train::launch_expert_ranks(topk_idx.data_ptr<int64_t>(), t, static_cast<int>(k), static_cast<int>(num_experts),
                                  scratch.data_ptr<int>(), rank.data_ptr<int64_t>(), stream());
    return rank;
}

// out [N, H] in y's dtype = per row the FP32 sum of its pairs' rows of y [P, H] (see permute.cu).
torch::Tensor sum_pairs(const torch::Tensor& y, const torch::Tensor& pos) {
    TORCH_CHECK(y.is_cuda() && y.is_contiguous() && y.dim() == 2, "y must be a contiguous 2-D CUDA tensor");
    TORCH_CHECK(y.scalar_type() == torch::kBFloat16 || y.scalar_type() == torch::kFloat32,
                "y must be bfloat16 or float32, got ", y.scalar_type());
    check(pos, "pos", torch::kInt64, 2);
    TORCH_CHECK(pos.size(1) <= 32, "pos must have at most 32 columns (top-k), got ", pos.size(1));
    TORCH_CHECK(y.size(1) * y.element_size() % 16 == 0, "y rows must be a multiple of 16 bytes, got ", y.size(1),
                " elements");
    c10::cuda::CUDAGuard guard(y.device());
    auto out = torch::empty({pos.size(0), y.size(1)}, y.options());
    ep_train::launch_sum_pairs(y.data_ptr(), pos.data_ptr<int64_t>(), out.data_ptr(),
                               y.scalar_type() == torch::kBFloat16, pos.size(0), static_cast<int>(pos.size(1)),
                               y.size(0), static_cast<int>(y.size(1)), stream());
    return out;
}

// Megatron's routing map -> (topk_idx [T, K] int64, ascending then -1; weights [T, K] FP32): see
// launch_routing_topk.
std::vector<torch::Tensor> routing_topk(const torch::Tensor& routing_map, const torch::Tensor& probs,
                                        int64_t num_topk) {
    check(routing_map, "routing_map", torch::kBool, 2);
    TORCH_CHECK(probs.is_cuda() && probs.is_contiguous() && probs.dim() == 2,
                "probs must be a contiguous 2-D CUDA tensor");
    TORCH_CHECK(probs.scalar_type() == torch::kFloat32 || probs.scalar_type() == torch::kBFloat16,
                "probs must be float32 or bfloat16, got ", probs.scalar_type());
    TORCH_CHECK(probs.sizes() == routing_map.sizes(), "probs must have the routing map's shape ", routing_map.sizes(),
                ", got ", probs.sizes());
    TORCH_CHECK(probs.device() == routing_map.device(), "probs must be on the routing map's device");
    TORCH_CHECK(num_topk >= 1 && num_topk <= ep_train::kMaxExperts, "num_topk must be in [1, ", ep_train::kMaxExperts,
                "], got ", num_topk);
    TORCH_CHECK(routing_map.size(1) <= std::numeric_limits<int>::max(),
                "routing_map has too many columns: ", routing_map.size(1));
    c10::cuda::CUDAGuard guard(routing_map.device());
    auto topk_idx = torch::empty({routing_map.size(0), num_topk}, routing_map.options().dtype(torch::kInt64));
    auto weights = torch::empty({routing_map.size(0), num_topk}, routing_map.options().dtype(torch::kFloat32));
    ep_train::launch_routing_topk(routing_map.data_ptr<bool>(), probs.data_ptr(),
                                  probs.scalar_type() == torch::kBFloat16, routing_map.size(0),
                                  static_cast<int>(routing_map.size(1)), static_cast<int>(num_topk),
                                  topk_idx.data_ptr<int64_t>(), weights.data_ptr<float>(), stream());
    return {topk_idx, weights};
}

// SwiGLU of the grouped-GEMM experts (see swiglu.cu): h [P, 2F] BF16, probs [P] FP32 or none.
void check_swiglu(const torch::Tensor& h, const OptTensor& probs) {
    check(h, "h", torch::kBFloat16, 2);
    TORCH_CHECK(h.size(1) % 16 == 0, "h must have 2 * F columns with F a multiple of 8, got ", h.size(1));
    if (probs) {
        check(*probs, "probs", torch::kFloat32, 1);
        TORCH_CHECK(probs->size(0) == h.size(0), "probs must have one entry per row of h (", h.size(0), "), got ",
                    probs->size(0));
    }
}

torch::Tensor swiglu_forward(const torch::Tensor& h, const OptTensor& probs) {
    check_swiglu(h, probs);
    c10::cuda::CUDAGuard guard(h.device());
    auto out = torch::empty({h.size(0), h.size(1) / 2}, h.options());
    ep_train::launch_swiglu_forward(h.data_ptr(), ptr_or_null<const float>(probs), out.data_ptr(), h.size(0),
                                    static_cast<int>(h.size(1) / 2), stream());
    return out;
}

// (grad_h [P, 2F], grad_probs [P] FP32 or an empty tensor without probs)
std::vector<torch::Tensor> swiglu_backward(const torch::Tensor& h, const OptTensor& probs,
                                           const torch::Tensor& grad_out) {
    check_swiglu(h, probs);
    check(grad_out, "grad_out", torch::kBFloat16, 2);
    TORCH_CHECK(grad_out.size(0) == h.size(0) && grad_out.size(1) * 2 == h.size(1), "grad_out must be [", h.size(0),
                ", ", h.size(1) / 2, "], got [", grad_out.size(0), ", ", grad_out.size(1), "]");
    c10::cuda::CUDAGuard guard(h.device());
    auto grad_h = torch::empty_like(h);
    auto grad_probs = probs ? torch::empty_like(*probs) : torch::empty({0}, h.options().dtype(torch::kFloat32));
    ep_train::launch_swiglu_backward(h.data_ptr(), ptr_or_null<const float>(probs), grad_out.data_ptr(),
                                     grad_h.data_ptr(), probs ? grad_probs.data_ptr<float>() : nullptr, h.size(0),
                                     static_cast<int>(h.size(1) / 2), stream());
    return {grad_h, grad_probs};
}

// ---------------------------------------------------------------- low latency
void check_low_latency_topk(const torch::Tensor& topk_idx) {
    check(topk_idx, "topk_idx", torch::kInt64, 2);
    TORCH_CHECK(topk_idx.size(1) >= 1 && topk_idx.size(1) <= ep_train::kMaxTopk, "topk_idx must have 1..",
                ep_train::kMaxTopk, " columns (top-k), got ", topk_idx.size(1));
}

// hidden_multiple: 128 for FP8 dispatch (one scale per 128 channels), 8 for BF16 dispatch (16-byte
// vectors), 1 for combine.
LowLatencyLayout make_low_latency_layout(const LowLatencyRuntime& rt, int64_t max_tokens, int64_t hidden,
                                         int64_t num_experts, int64_t hidden_multiple) {
    const int R = rt.context().num_ranks;
    TORCH_CHECK(num_experts % R == 0 && num_experts <= ep_train::kMaxExperts, "num_experts must be a multiple of ", R,
                " and <= ", ep_train::kMaxExperts, ", got ", num_experts);
    TORCH_CHECK(hidden >= 1 && hidden % hidden_multiple == 0 && hidden <= 16384,
                "this low-latency call takes hidden % ", hidden_multiple, " == 0 and hidden <= 16384, got ", hidden);
    const uint32_t unreachable = rt.unmapped_peers() & ~(rt.rma().impl == ep_train::kRmaNvshmem ? rt.rma().peers : 0u);
    TORCH_CHECK(unreachable == 0, "low-latency buffer: the ranks of mask ", unreachable,
                " have no load/store mapping and are not reached by NVSHMEM puts (LowLatencyRuntime.set_rma)");
    LowLatencyLayout layout(static_cast<int>(max_tokens), static_cast<int>(hidden), R, static_cast<int>(num_experts),
                            rt.rma().peers != 0);
    TORCH_CHECK(layout.total_bytes() <= rt.num_bytes(), "num_rdma_bytes=", rt.num_bytes(),
                " is too small for this low-latency call: it needs ", layout.total_bytes(),
                " (Buffer.get_low_latency_rdma_size_hint",
                rt.rma().peers != 0 ? ", rma_staging=True: ranks reached by puts need send areas)" : ")");
    // Halves at fixed offsets (every rank's buffer has the same size): half_bytes() <= the stride
    // follows from the check above, as every region is a multiple of the alignment.
    layout.half_stride =
        (rt.num_bytes() - LowLatencyLayout::control_bytes()) / 2 / ep_train::kAlignBytes * ep_train::kAlignBytes;
    return layout;
}

void low_latency_dispatch(LowLatencyRuntime& rt, const torch::Tensor& x, const torch::Tensor& topk_idx,
                          const OptTensor& topk_weights, int64_t max_tokens, int64_t num_experts, bool use_fp8,
                          bool round_scale, torch::Tensor& recv_x, const OptTensor& recv_scales,
                          torch::Tensor& recv_src_info, torch::Tensor& recv_topk_pos, torch::Tensor& recv_topk_weights,
                          torch::Tensor& recv_layout_range, torch::Tensor& recv_count, const OptTensor& stats,
                          const OptTensor& slot_of, torch::Tensor& call_seq, const std::vector<int64_t>& info,
                          int64_t phases) {
    auto ctx = rt.context();
    check(x, "x", torch::kBFloat16, 2);
    check_low_latency_topk(topk_idx);
    TORCH_CHECK(topk_idx.size(0) == x.size(0) && x.size(0) <= max_tokens,
                "x and topk_idx must have the same rows, at most ", max_tokens, ", got ", x.size(0), " and ",
                topk_idx.size(0));
    if (topk_weights) check(*topk_weights, "topk_weights", torch::kFloat32, 2);
    TORCH_CHECK(recv_x.is_contiguous() && recv_x.dim() == 3 && recv_x.element_size() == (use_fp8 ? 1 : 2),
                "recv_x must be a contiguous [L, R*M, H] tensor of the sent dtype");
    TORCH_CHECK(!use_fp8 || recv_scales, "FP8 dispatch needs recv_scales");
    check(recv_src_info, "recv_src_info", torch::kInt32, 2);
    check(recv_topk_pos, "recv_topk_pos", torch::kInt32, 2);
    check(recv_topk_weights, "recv_topk_weights", torch::kFloat32, 2);
    check(recv_layout_range, "recv_layout_range", torch::kInt64, 2);
    check(recv_count, "recv_count", torch::kInt32, 1);
    check(call_seq, "call_seq", torch::kInt64, 1);
    if (stats) check(*stats, "cumulative_local_expert_recv_stats", torch::kInt32, 1);
    if (slot_of) {
        check(*slot_of, "slot_of", torch::kInt32, 2);
        TORCH_CHECK(slot_of->size(0) == rt.context().num_ranks * max_tokens && slot_of->size(1) == topk_idx.size(1),
                    "slot_of must be [R*M, K]");
    }
    ep_train::LowLatencyDispatchParams p{};
    p.trace = rt.trace(0);
    p.x = x.data_ptr();
    p.topk_idx = topk_idx.data_ptr<int64_t>();
    p.topk_weights = ptr_or_null<const float>(topk_weights);
    p.recv_x = recv_x.data_ptr();
    p.recv_scales = ptr_or_null<float>(recv_scales);
    p.recv_src_info = recv_src_info.data_ptr<int>();
    p.recv_topk_pos = recv_topk_pos.data_ptr<int>();
    p.recv_topk_weights = recv_topk_weights.data_ptr<float>();
    p.recv_layout_range = recv_layout_range.data_ptr<int64_t>();
    p.recv_count = recv_count.data_ptr<int>();
    p.cumulative_stats = ptr_or_null<int>(stats);
    p.slot_of = ptr_or_null<int>(slot_of);
    p.call_seq = call_seq.data_ptr<int64_t>();
    p.num_tokens = x.size(0);
    p.num_topk = topk_idx.size(1);
    p.num_experts = num_experts;
    p.use_fp8 = use_fp8;
    p.round_scale = round_scale;
    fill_info(p.info, info);
    p.layout = make_low_latency_layout(rt, max_tokens, x.size(1), num_experts, use_fp8 ? 128 : 8);
    p.rma = rt.rma();
    c10::cuda::CUDAGuard guard(x.device());
    ep_train::launch_low_latency_dispatch(p, ctx, static_cast<int>(phases), rt.num_sms(), stream());
}

void low_latency_combine(LowLatencyRuntime& rt, const torch::Tensor& x, const torch::Tensor& recv_src_info,
                         const torch::Tensor& recv_topk_pos, const torch::Tensor& recv_layout_range,
                         const torch::Tensor& topk_idx, const OptTensor& topk_weights, torch::Tensor& out,
                         int64_t max_tokens, int64_t num_experts, const OptTensor& slot_of,
                         const OptTensor& slot_weights, torch::Tensor& call_seq, const std::vector<int64_t>& info,
                         int64_t phases) {
    auto ctx = rt.context();
    check(x, "x", torch::kBFloat16, 3);
    check(recv_src_info, "recv_src_info", torch::kInt32, 2);
    check(recv_topk_pos, "recv_topk_pos", torch::kInt32, 2);
    check(recv_layout_range, "recv_layout_range", torch::kInt64, 2);
    check_low_latency_topk(topk_idx);
    if (topk_weights) check(*topk_weights, "topk_weights", torch::kFloat32, 2);
    check(out, "out", torch::kBFloat16, 2);
    check(call_seq, "call_seq", torch::kInt64, 1);
    TORCH_CHECK(out.size(0) == topk_idx.size(0) && out.size(0) <= max_tokens && out.size(1) == x.size(2),
                "out must be [T, H] with T <= M");
    // Sums per rank: the dispatch's slot map, and its slot weights or none (every row weighted 1).
    // The default combine weights with topk_weights; sums per rank never read them.
    TORCH_CHECK(slot_of || topk_weights, "a combine without sums per rank needs topk_weights");
    TORCH_CHECK(slot_of || !slot_weights, "slot_weights go with slot_of");
    if (slot_of) {
        check(*slot_of, "slot_of", torch::kInt32, 2);
        if (slot_weights) check(*slot_weights, "slot_weights", torch::kFloat32, 2);
        TORCH_CHECK(slot_of->size(0) == ctx.num_ranks * max_tokens && slot_of->size(1) == topk_idx.size(1),
                    "slot_of must be [R*M, K]");
        TORCH_CHECK(!slot_weights || slot_weights->sizes() == recv_src_info.sizes(), "slot_weights must be [L, R*M]");
        TORCH_CHECK(x.size(2) % 8 == 0, "sums per rank need hidden % 8 == 0, got ", x.size(2));
    }
    ep_train::LowLatencyCombineParams p{};
    p.trace = rt.trace(1);
    p.x = x.data_ptr();
    p.recv_src_info = recv_src_info.data_ptr<int>();
    p.recv_topk_pos = recv_topk_pos.data_ptr<int>();
    p.recv_layout_range = recv_layout_range.data_ptr<int64_t>();
    p.topk_idx = topk_idx.data_ptr<int64_t>();
    p.topk_weights = ptr_or_null<const float>(topk_weights);
    p.slot_of = ptr_or_null<const int>(slot_of);
    p.slot_weights = ptr_or_null<const float>(slot_weights);
    p.out = out.data_ptr();
    p.call_seq = call_seq.data_ptr<int64_t>();
    p.num_tokens = topk_idx.size(0);
    p.num_topk = topk_idx.size(1);
    p.num_experts = num_experts;
    fill_info(p.info, info);
    p.layout = make_low_latency_layout(rt, max_tokens, x.size(2), num_experts, 1);
    p.rma = rt.rma();
    TORCH_CHECK(x.size(0) == p.layout.num_local_experts && x.size(1) == ctx.num_ranks * max_tokens,
                "x must be [L, R*M, H]");
    c10::cuda::CUDAGuard guard(x.device());
    ep_train::launch_low_latency_combine(p, ctx, static_cast<int>(phases), rt.num_sms(), stream());
}

// dst = src, row by row, on num_sms blocks: 16-byte warp copies or bulk copies (see copy_rows.cu).
void copy_rows(torch::Tensor& dst, const torch::Tensor& src, int64_t num_sms, bool use_bulk) {
    TORCH_CHECK(dst.is_cuda() && src.is_cuda() && dst.is_contiguous() && src.is_contiguous() && src.dim() == 2,
                "dst and src must be contiguous 2-D CUDA tensors");
    TORCH_CHECK(dst.sizes() == src.sizes() && dst.scalar_type() == src.scalar_type(), "dst and src must match");
    TORCH_CHECK(num_sms >= 1, "num_sms must be >= 1, got ", num_sms);
    c10::cuda::CUDAGuard guard(src.device());
    ep_train::launch_copy_rows(dst.data_ptr(), src.data_ptr(), src.size(0), src.size(1) * src.element_size(),
                               static_cast<int>(num_sms), use_bulk, stream());
}

// The PeerBuffer methods of a runtime class.  Constructors: (rank, num_ranks, bytes, timeout_s) with
// its own memory (peers through open_peers), or with `external` device memory to adopt (peers
// through set_peer_pointers).
template <typename Runtime>
py::class_<Runtime>& bind_peer_buffer(py::class_<Runtime>& cls) {
    cls.def(py::init<int, int, int64_t, double>())
        .def(py::init([](int rank, int num_ranks, int64_t num_bytes, double timeout_s, uintptr_t external) {
                 TORCH_CHECK(external != 0, "external memory must not be null");
                 return new Runtime(rank, num_ranks, num_bytes, timeout_s, reinterpret_cast<void*>(external));
             }),
             py::arg("rank"), py::arg("num_ranks"), py::arg("num_bytes"), py::arg("timeout_s"), py::arg("external"))
        .def("set_peer_pointers", [](Runtime& rt, const std::vector<uintptr_t>& ptrs) { rt.set_peer_pointers(ptrs); })
        .def("ipc_handle", [](const Runtime& rt) { return py::bytes(rt.ipc_handle()); })
        .def("open_peers",
             [](Runtime& rt, const std::vector<py::bytes>& handles) {
                 std::vector<std::string> hs;
                 for (const auto& h : handles) hs.push_back(std::string(h));
                 rt.open_peers(hs);
             })
        .def("destroy", [](Runtime& rt) { rt.destroy(); })
        .def("error_code", [](const Runtime& rt) { return rt.error_code(); })
        .def("error_fields", [](const Runtime& rt) {
            long long f[7];
            rt.error_fields(f);
            return std::vector<long long>(f, f + 7);
        });
    return cls;
}

void bind_nvshmem(py::module_ m) {
    namespace nv = ep_train::nvshmem;
    m.def("compiled", &nv::compiled);
    m.def("load", &nv::load, py::arg("path"));
    m.def("loaded", &nv::loaded);
    m.def("unique_id", []() { return py::bytes(nv::unique_id()); });
    m.def(
        "init", [](int rank, int num_ranks, const py::bytes& uid) { nv::init(rank, num_ranks, std::string(uid)); },
        py::arg("rank"), py::arg("num_ranks"), py::arg("uid"));
    m.def("malloc", [](int64_t num_bytes) { return reinterpret_cast<uintptr_t>(nv::malloc(num_bytes)); });
    m.def("peer_ptr", [](uintptr_t local, int pe) {
        return reinterpret_cast<uintptr_t>(nv::peer_ptr(reinterpret_cast<void*>(local), pe));
    });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "ep_train CUDA kernels (intranode NVLink dispatch/combine)";
    m.attr("MAX_CHANNELS") = ep_train::kMaxChannels;
    m.attr("MAX_EXPERTS") = ep_train::kMaxExperts;
    m.def("control_bytes", []() { return IntranodeLayout::control_bytes(); });
    m.def("buffer_bytes", [](int64_t hidden_bytes, int num_ranks, int num_channels, int ring_tokens) {
        return IntranodeLayout(hidden_bytes, num_ranks, num_channels, ring_tokens).total_bytes();
    });
    py::class_<IntranodeRuntime> intranode(m, "IntranodeRuntime");
    bind_peer_buffer(intranode).def("num_nvl_bytes", &IntranodeRuntime::num_nvl_bytes).def("wait_recv", &wait_recv);
    m.def("get_dispatch_layout", &get_dispatch_layout);
    m.def("notify", &notify);
    m.def("prepare", &prepare);
    m.def("dispatch", &dispatch);
    m.def("combine", &combine);
    m.def("sum_pairs", &sum_pairs);
    m.def("pair_layout", &pair_layout);
    m.def("expert_ranks", &expert_ranks);
    m.attr("PAIR_LAYOUT_MAX_LOCAL_EXPERTS") = ep_train::kPairLayoutMaxLocalExperts;
    m.def("routing_topk", &routing_topk, py::arg("routing_map"), py::arg("probs"), py::arg("num_topk"));
    m.def("swiglu_forward", &swiglu_forward, py::arg("h"), py::arg("probs") = py::none());
    m.def("swiglu_backward", &swiglu_backward, py::arg("h"), py::arg("probs"), py::arg("grad_out"));
    m.def("copy_rows", &copy_rows);
    m.def(
        "low_latency_bytes",
        [](int64_t max_tokens, int64_t hidden, int num_ranks, int64_t num_experts, bool rma_staging) {
            return LowLatencyLayout(max_tokens, hidden, num_ranks, num_experts, rma_staging).total_bytes();
        },
        py::arg("max_tokens"), py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"),
        py::arg("rma_staging") = false);
    py::class_<LowLatencyRuntime> low_latency(m, "LowLatencyRuntime");
    bind_peer_buffer(low_latency)
        .def("num_sms", &LowLatencyRuntime::num_sms)
        .def("set_num_sms", &LowLatencyRuntime::set_num_sms)
        .def("set_trace",
             [](LowLatencyRuntime& rt, uintptr_t trace) { rt.set_trace(reinterpret_cast<int64_t*>(trace)); })
        .def("num_bytes", [](const LowLatencyRuntime& rt) { return rt.num_bytes(); })
        .def("set_peer_pointers", &LowLatencyRuntime::set_peer_pointers, py::arg("ptrs"), py::arg("allow_unmapped"))
        .def("unmapped_peers", &LowLatencyRuntime::unmapped_peers)
        .def("set_rma", &LowLatencyRuntime::set_rma, py::arg("peers"), py::arg("impl"));
    m.attr("LOW_LATENCY_RMA_PEER_COPIES") = static_cast<int>(ep_train::kRmaPeerCopies);
    m.attr("LOW_LATENCY_RMA_NVSHMEM") = static_cast<int>(ep_train::kRmaNvshmem);
    m.attr("NVSHMEM_DEVICE") = ep_train::nvshmem_device_compiled();
    m.def("low_latency_control_bytes", []() { return LowLatencyLayout::control_bytes(); });
    m.attr("LOW_LATENCY_TRACE_POINTS") = static_cast<int>(ep_train::kTracePoints);
    bind_nvshmem(m.def_submodule("nvshmem", "NVSHMEM's host library, loaded at run time (see nvshmem_host.hpp)"));
    m.def("low_latency_dispatch", &low_latency_dispatch);
    m.def("low_latency_combine", &low_latency_combine);
}
