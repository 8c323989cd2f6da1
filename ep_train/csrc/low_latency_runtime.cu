// Host side of the low-latency kernels: the low-latency buffer (a PeerBuffer).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "low_latency_runtime.hpp"

namespace ep_train {

namespace {

// Bytes of the buffer: at least the control block.  Adopted memory cannot grow, so it must hold it.
int64_t buffer_bytes(int64_t num_bytes, void* external) {
    const int64_t control = LowLatencyLayout::control_bytes();
    if (external != nullptr && num_bytes < control)
        throw std::invalid_argument("adopted low-latency memory of " + std::to_string(num_bytes) +
                                    " bytes is below the control block (" + std::to_string(control) + " bytes)");
    return std::max(num_bytes, control);
}

}  // namespace

LowLatencyRuntime::LowLatencyRuntime(int rank, int num_ranks, int64_t num_bytes, double timeout_s, void* external)
    : PeerBuffer(rank, num_ranks, buffer_bytes(num_bytes, external), timeout_s, "low-latency buffer", external) {
    check_cuda(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device()),
               "cudaDeviceGetAttribute(SM count)");
    load_low_latency_kernels();
}

void LowLatencyRuntime::set_num_sms(int num_sms) {
    int max_sms = 0;
    check_cuda(cudaDeviceGetAttribute(&max_sms, cudaDevAttrMultiProcessorCount, device()),
               "cudaDeviceGetAttribute(SM count)");
    if (num_sms < 1 || num_sms > max_sms)
        throw std::invalid_argument("low-latency num_sms must be in [1, " + std::to_string(max_sms) + "], got " +
                                    std::to_string(num_sms));
    num_sms_ = num_sms;
}

}  // namespace ep_train
