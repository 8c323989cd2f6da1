// PeerBuffer: cudaMalloc + CUDA IPC handles (or adopted memory and peer pointers), the pinned error
// mailbox, bounded-wait cycle budget.
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "peer_buffer.hpp"

namespace ep_train {

void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        std::ostringstream os;
        os << "CUDA error in " << what << ": " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err) << ")";
        throw std::runtime_error(os.str());
    }
}

PeerBuffer::PeerBuffer(int rank, int num_ranks, int64_t num_bytes, double timeout_s, const char* name, void* external)
    : rank_(rank), num_ranks_(num_ranks), num_bytes_(num_bytes), name_(name), owns_memory_(external == nullptr) {
    if (num_ranks < 1 || num_ranks > kMaxRanks)
        throw std::invalid_argument(std::string(name) + ": 1 to " + std::to_string(kMaxRanks) + " ranks, got " +
                                    std::to_string(num_ranks));
    if (rank < 0 || rank >= num_ranks) throw std::invalid_argument(std::string(name) + ": rank out of range");
    check_cuda(cudaGetDevice(&device_), "cudaGetDevice");
    int clock_khz = 0;
    check_cuda(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device_), "cudaDeviceGetAttribute(clock rate)");
    // NOTES: clock64 counts SM cycles; the peak clock makes the bound at least timeout_s long.
    timeout_cycles_ = static_cast<long long>(timeout_s * 1e3 * static_cast<double>(clock_khz));
    if (owns_memory_)
        check_cuda(cudaMalloc(&local_, num_bytes_), name);
    else
        local_ = external;
    check_cuda(cudaMemset(local_, 0, num_bytes_), name);
    // NOTES: finished before the caller tells the peers the buffer is ready (cudaMemset may return early).
    check_cuda(cudaDeviceSynchronize(), name);
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&mailbox_), sizeof(HostMailbox), cudaHostAllocMapped),
               "cudaHostAlloc(error mailbox)");
    std::memset(static_cast<void*>(mailbox_), 0, sizeof(HostMailbox));
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&mailbox_dev_), mailbox_, 0),
               "cudaHostGetDevicePointer(error mailbox)");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after buffer setup");
    peers_.base[rank_] = local_;
}

PeerBuffer::~PeerBuffer() {
    try {
        destroy();
    } catch (...) {
    }
}

std::string PeerBuffer::ipc_handle() const {
    cudaIpcMemHandle_t h;
    check_cuda(cudaIpcGetMemHandle(&h, local_), "cudaIpcGetMemHandle");
    return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

void PeerBuffer::open_peers(const std::vector<std::string>& handles) {
    if (!owns_memory_)
        throw std::logic_error(std::string("the ") + name_ + " adopts its memory: use set_peer_pointers");
    if (static_cast<int>(handles.size()) != num_ranks_) throw std::invalid_argument("open_peers: one handle per rank");
    for (int r = 0; r < num_ranks_; ++r) {
        if (r == rank_) continue;
        if (handles[r].size() != sizeof(cudaIpcMemHandle_t)) throw std::invalid_argument("open_peers: bad handle size");
        cudaIpcMemHandle_t h;
        std::memcpy(&h, handles[r].data(), sizeof(h));
        check_cuda(cudaIpcOpenMemHandle(&peers_.base[r], h, cudaIpcMemLazyEnablePeerAccess),
                   "cudaIpcOpenMemHandle (is every rank on this node, with peer access over NVLink?)");
    }
    opened_ = true;
}

void PeerBuffer::set_peer_pointers(const std::vector<uintptr_t>& ptrs, bool allow_unmapped) {
    if (owns_memory_) throw std::logic_error(std::string("the ") + name_ + " owns its memory: use open_peers");
    if (static_cast<int>(ptrs.size()) != num_ranks_)
        throw std::invalid_argument("set_peer_pointers: " + std::to_string(num_ranks_) + " pointers expected, got " +
                                    std::to_string(ptrs.size()));
    if (ptrs[rank_] != reinterpret_cast<uintptr_t>(local_))
        throw std::invalid_argument("set_peer_pointers: entry " + std::to_string(rank_) +
                                    " must be this rank's buffer");
    uint32_t unmapped = 0;
    for (int r = 0; r < num_ranks_; ++r) {
        if (ptrs[r] == 0 && !allow_unmapped)
            throw std::invalid_argument("set_peer_pointers: rank " + std::to_string(r) +
                                        " is not reachable by loads and stores (another node?)");
        if (ptrs[r] == 0) unmapped |= 1u << r;
        peers_.base[r] = reinterpret_cast<void*>(ptrs[r]);
    }
    unmapped_ = unmapped;
    opened_ = true;
}

void PeerBuffer::destroy() {
    if (local_ == nullptr) return;
    cudaDeviceSynchronize();
    if (owns_memory_) {
        for (int r = 0; r < num_ranks_; ++r)
            if (r != rank_ && peers_.base[r] != nullptr) cudaIpcCloseMemHandle(peers_.base[r]);
        cudaFree(local_);
    }
    cudaFreeHost(mailbox_);
    local_ = nullptr;
    mailbox_ = mailbox_dev_ = nullptr;
    peers_ = PeerPtrs{};
    opened_ = false;
}

RankContext PeerBuffer::context(int* status) const {
    if (!opened_) throw std::runtime_error(std::string("the ") + name_ + " is not open (destroyed?)");
    RankContext ctx{};
    ctx.rank = rank_;
    ctx.num_ranks = num_ranks_;
    ctx.peers = peers_;
    ctx.err.status = status;
    ctx.err.mailbox = mailbox_dev_;
    ctx.err.rank = rank_;
    ctx.err.timeout_cycles = timeout_cycles_;
    return ctx;
}

int PeerBuffer::error_code() const {
    return mailbox_ == nullptr ? 0 : mailbox_->code;
}

void PeerBuffer::error_fields(long long out[7]) const {
    for (int i = 0; i < 7; ++i) out[i] = 0;
    if (mailbox_ == nullptr || mailbox_->code == 0) return;
    const HostMailbox& m = *mailbox_;
    out[0] = m.code;
    out[1] = m.rank;
    out[2] = m.what;
    out[3] = m.channel;
    out[4] = m.peer;
    out[5] = m.expected;
    out[6] = m.seen;
}

}  // namespace ep_train
