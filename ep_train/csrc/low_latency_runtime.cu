// Host side of the low-latency kernels: the low-latency buffer (a PeerBuffer).
#include <algorithm>

#include "low_latency_runtime.hpp"

namespace ep_train {

LowLatencyRuntime::LowLatencyRuntime(int rank, int num_ranks, int64_t num_bytes, double timeout_s, void* external)
    : PeerBuffer(rank, num_ranks, std::max<int64_t>(num_bytes, LowLatencyLayout::control_bytes()), timeout_s,
                 "low-latency buffer", external) {
    check_cuda(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device()),
               "cudaDeviceGetAttribute(SM count)");
}

}  // namespace ep_train
