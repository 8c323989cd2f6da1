// NVSHMEM's host library, loaded at run time (dlopen), for the symmetric memory of the low-latency
// buffer.  Only the host API: one heap allocation whose peer pointers (nvshmem_ptr) the existing
// kernels use over NVLink.  NVSHMEM is bootstrapped from a unique id that the caller distributes
// (ep_train does it over the torch process group), so no MPI or launcher is needed.  No torch
// headers.
#pragma once

#include <cstdint>
#include <string>

namespace ep_train::nvshmem {

// Whether ep_train._C was compiled with NVSHMEM's headers (setup.py finds the pip wheel's).
bool compiled();
// Loads the host library at `path` (libnvshmem_host.so.3).  Returns "" on success, else why not.
std::string load(const std::string& path);
bool loaded();
// 128 opaque bytes; rank 0 of the group creates them, every rank passes them to init.
std::string unique_id();
// Collective over the num_ranks processes that share `uid`.  Throws std::runtime_error on failure.
void init(int rank, int num_ranks, const std::string& uid);
// Collective: every PE asks for the same size.  Not cleared (the PeerBuffer that adopts it zero-fills
// it).  Throws when the heap is exhausted.
void* malloc(int64_t num_bytes);
// The address of `local` (a symmetric allocation) in PE `pe`'s memory, mapped into this process;
// nullptr when `pe` is not reachable by loads and stores (another node).
void* peer_ptr(void* local, int pe);
// Whether `local` is this process's NVSHMEM symmetric memory, this process being PE `pe` of
// `num_pes` (false when NVSHMEM is not loaded or not initialised).
bool is_symmetric_block(void* local, int pe, int num_pes);

}  // namespace ep_train::nvshmem
