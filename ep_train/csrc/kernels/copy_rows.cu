// copy_rows: dst[i] = src[i] for num_rows rows of row_bytes, on num_sms blocks, with either the
// 16-byte load/store warp copy the ring kernels use or bulk copies (one thread per block pipelining
// rows through kBulkStages shared-memory stages).  Measures what one SM can move each way
// (benchmarks/bench_copy.py) and tests the bulk primitives on their own.
#include <cuda_runtime.h>

#include <stdexcept>

#include "ep_train/bulk.cuh"
#include "ep_train/warp.cuh"
#include "runtime.hpp"

namespace ep_train {

namespace {

constexpr int kLsuWarps = 24;
constexpr int kBulkStages = 8;
constexpr int kBulkMaxRowBytes = 24 * 1024;  // 8 stages x 24 KB = 192 KB of shared memory

__global__ void __launch_bounds__(kLsuWarps * 32)
    copy_rows_lsu(char* dst, const char* src, int64_t num_rows, int64_t row_bytes) {
    const int warp = threadIdx.x / kWarpSize;
    for (int64_t r = int64_t(blockIdx.x) * kLsuWarps + warp; r < num_rows; r += int64_t(gridDim.x) * kLsuWarps)
        warp_copy<8, false>(dst + r * row_bytes, src + r * row_bytes, row_bytes);
}

// One thread per block: rows blockIdx.x, blockIdx.x + gridDim.x, ...; loads run kBulkStages - 1
// rows ahead of stores.  Stage s is refilled only after the store that read it has finished reading.
__global__ void __launch_bounds__(32) copy_rows_bulk(char* dst, const char* src, int64_t num_rows, int row_bytes) {
    extern __shared__ __align__(128) char smem[];
    __shared__ __align__(8) uint64_t full[kBulkStages];
    if (threadIdx.x != 0) return;
    for (int s = 0; s < kBulkStages; ++s) bulk::mbarrier_init(&full[s], 1);
    bulk::fence_barrier_init();
    const int64_t first = blockIdx.x, step = gridDim.x;
    const int64_t mine = first < num_rows ? (num_rows - first + step - 1) / step : 0;
    auto issue_load = [&](int64_t j) {
        const int s = static_cast<int>(j % kBulkStages);
        bulk::arrive_expect_tx(&full[s], row_bytes);
        bulk::load(smem + s * kBulkMaxRowBytes, src + (first + j * step) * row_bytes, row_bytes, &full[s]);
    };
    for (int64_t j = 0; j < mine && j < kBulkStages - 1; ++j) issue_load(j);
    for (int64_t j = 0; j < mine; ++j) {
        const int s = static_cast<int>(j % kBulkStages);
        bulk::wait_parity(&full[s], static_cast<uint32_t>((j / kBulkStages) & 1));
        bulk::store(dst + (first + j * step) * row_bytes, smem + s * kBulkMaxRowBytes, row_bytes);
        bulk::commit();
        if (j + kBulkStages - 1 < mine) {
            // The stage about to be refilled held row j - 1, whose store is the second newest group.
            bulk::wait_read<1>();
            issue_load(j + kBulkStages - 1);
        }
    }
    bulk::wait_written<0>();
}

}  // namespace

void launch_copy_rows(void* dst, const void* src, int64_t num_rows, int64_t row_bytes, int num_sms, bool use_bulk,
                      cudaStream_t stream) {
    if (num_rows == 0) return;
    if (use_bulk) {
        if (row_bytes % 16 != 0 || row_bytes > kBulkMaxRowBytes)
            throw std::invalid_argument("copy_rows: bulk rows must be a multiple of 16 bytes and at most 24 KB");
        const int smem = kBulkStages * kBulkMaxRowBytes;
        check_cuda(cudaFuncSetAttribute(copy_rows_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                   "copy_rows shared memory");
        copy_rows_bulk<<<num_sms, 32, smem, stream>>>(static_cast<char*>(dst), static_cast<const char*>(src), num_rows,
                                                      static_cast<int>(row_bytes));
    } else {
        copy_rows_lsu<<<num_sms, kLsuWarps * 32, 0, stream>>>(static_cast<char*>(dst), static_cast<const char*>(src),
                                                              num_rows, row_bytes);
    }
    check_cuda(cudaGetLastError(), "copy_rows launch");
}

void load_copy_rows_kernels() {
    load_kernel(copy_rows_lsu, "copy_rows kernel");
    load_kernel(copy_rows_bulk, "copy_rows kernel");
}

}  // namespace ep_train
