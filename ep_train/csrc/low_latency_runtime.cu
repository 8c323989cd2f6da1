// Host side of the low-latency kernels: the low-latency buffer (a PeerBuffer).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "low_latency_runtime.hpp"
#include "nvshmem_host.hpp"

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

bool nvshmem_device_compiled() {
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    return true;
#else
    return false;
#endif
}

void LowLatencyRuntime::set_rma(uint32_t peers, int impl) {
    const int R = context().num_ranks;
    if (R < 32 && (peers >> R) != 0)
        throw std::invalid_argument("low-latency RMA peers must be a mask of the " + std::to_string(R) +
                                    " ranks, got " + std::to_string(peers));
    if (impl != kRmaNone && impl != kRmaPeerCopies && impl != kRmaNvshmem)
        throw std::invalid_argument("low-latency RMA impl must be 0, 1 or 2, got " + std::to_string(impl));
    if (impl == kRmaNvshmem) {
        if (!nvshmem_device_compiled())
            throw std::invalid_argument(
                "low-latency RMA over NVSHMEM needs ep_train._C built with NVSHMEM's device library "
                "(libnvshmem_device.a)");
        if (!nvshmem::is_symmetric_block(local(), context().rank, R))
            throw std::invalid_argument(
                "low-latency RMA over NVSHMEM needs the buffer in NVSHMEM's symmetric heap, with the group's "
                "ranks as its PEs (this is rank " +
                std::to_string(context().rank) + " of " + std::to_string(R) + ")");
    }
    if ((peers != 0) != (impl != kRmaNone))
        throw std::invalid_argument("low-latency RMA: peers " + std::to_string(peers) + " with impl " +
                                    std::to_string(impl) + " (a mask needs an impl, and impl 0 no mask)");
    rma_ = LowLatencyRma{peers, impl};
}

}  // namespace ep_train
