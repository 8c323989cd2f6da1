// NVSHMEM through dlopen: ep_train._C never links against libnvshmem_host, so it imports (and the
// CUDA IPC path works) on machines without the wheel.  The declarations come from the wheel's
// headers; each entry point is looked up by name and called through a pointer of the declared type.
// Built with NVSHMEM's device library (EP_TRAIN_NVSHMEM_DEVICE: -rdc and a device link with
// libnvshmem_device.a, for the low-latency kernels' puts), init goes through that library so the
// host library fills in this module's device state; the library's host objects call three
// nvshmemid_* functions of the host library, which this file forwards to the loaded one.
#include "nvshmem_host.hpp"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstring>
#include <stdexcept>

#if defined(EP_TRAIN_WITH_NVSHMEM)
#define NVSHMEM_HOSTLIB_ONLY
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace ep_train::nvshmem {

#if defined(EP_TRAIN_WITH_NVSHMEM)

namespace {

struct Api {
    void* handle = nullptr;
    decltype(&::nvshmemx_get_uniqueid) get_uniqueid = nullptr;
    decltype(&::nvshmemx_set_attr_uniqueid_args) set_attr_uniqueid_args = nullptr;
    decltype(&::nvshmemx_hostlib_init_attr) hostlib_init_attr = nullptr;
    decltype(&::nvshmemx_init_status) init_status = nullptr;
    decltype(&::nvshmem_my_pe) my_pe = nullptr;
    decltype(&::nvshmem_n_pes) n_pes = nullptr;
    decltype(&::nvshmem_malloc) malloc = nullptr;
    decltype(&::nvshmem_ptr) ptr = nullptr;
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    decltype(&::nvshmemid_hostlib_init_attr) id_init_attr = nullptr;
    decltype(&::nvshmemid_init_status) id_init_status = nullptr;
    decltype(&::nvshmemid_hostlib_finalize) id_finalize = nullptr;
#endif
};

Api api;
bool g_initialized = false;

template <typename F>
bool find(void* handle, const char* name, F& out, std::string& missing) {
    out = reinterpret_cast<F>(dlsym(handle, name));
    if (out == nullptr) missing += missing.empty() ? name : std::string(", ") + name;
    return out != nullptr;
}

const Api& need_loaded(const char* what) {
    if (api.handle == nullptr) throw std::runtime_error(std::string("NVSHMEM ") + what + ": the library is not loaded");
    return api;
}

const Api& need_initialized(const char* what) {
    need_loaded(what);
    if (!g_initialized) throw std::runtime_error(std::string("NVSHMEM ") + what + ": not initialised");
    return api;
}

}  // namespace

bool compiled() {
    return true;
}

std::string load(const std::string& path) {
    if (api.handle != nullptr) return "";
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (handle == nullptr) {
        const char* err = dlerror();
        return "dlopen(" + path + ") failed: " + (err != nullptr ? err : "unknown error");
    }
    Api a;
    a.handle = handle;
    std::string missing;
    find(handle, "nvshmemx_get_uniqueid", a.get_uniqueid, missing);
    find(handle, "nvshmemx_set_attr_uniqueid_args", a.set_attr_uniqueid_args, missing);
    find(handle, "nvshmemx_hostlib_init_attr", a.hostlib_init_attr, missing);
    find(handle, "nvshmemx_init_status", a.init_status, missing);
    find(handle, "nvshmem_my_pe", a.my_pe, missing);
    find(handle, "nvshmem_n_pes", a.n_pes, missing);
    find(handle, "nvshmem_malloc", a.malloc, missing);
    find(handle, "nvshmem_ptr", a.ptr, missing);
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    find(handle, "nvshmemid_hostlib_init_attr", a.id_init_attr, missing);
    find(handle, "nvshmemid_init_status", a.id_init_status, missing);
    find(handle, "nvshmemid_hostlib_finalize", a.id_finalize, missing);
#endif
    if (!missing.empty()) {
        dlclose(handle);
        return path + " lacks " + missing + " (NVSHMEM 3.3 or newer has them)";
    }
    api = a;
    return "";
}

bool loaded() {
    return api.handle != nullptr;
}

std::string unique_id() {
    const Api& a = need_loaded("unique_id");
    nvshmemx_uniqueid_t uid = NVSHMEMX_UNIQUEID_INITIALIZER;
    const int status = a.get_uniqueid(&uid);
    if (status != 0) throw std::runtime_error("nvshmemx_get_uniqueid failed with status " + std::to_string(status));
    return std::string(reinterpret_cast<const char*>(&uid), sizeof(uid));
}

void init(int rank, int num_ranks, const std::string& uid_bytes) {
    const Api& a = need_loaded("init");
    if (g_initialized) throw std::runtime_error("NVSHMEM is already initialised in this process");
    if (uid_bytes.size() != sizeof(nvshmemx_uniqueid_t))
        throw std::invalid_argument("NVSHMEM init: the unique id must be " +
                                    std::to_string(sizeof(nvshmemx_uniqueid_t)) + " bytes, got " +
                                    std::to_string(uid_bytes.size()));
    if (num_ranks < 1 || rank < 0 || rank >= num_ranks)
        throw std::invalid_argument("NVSHMEM init: rank " + std::to_string(rank) + " of " + std::to_string(num_ranks));
    nvshmemx_uniqueid_t uid;
    std::memcpy(&uid, uid_bytes.data(), sizeof(uid));
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
    int status = a.set_attr_uniqueid_args(rank, num_ranks, &uid, &attr);
    if (status != 0)
        throw std::runtime_error("nvshmemx_set_attr_uniqueid_args failed with status " + std::to_string(status));
    // NOTES: NVSHMEM binds the PE to the current device; a CUDA context must exist first.
    cudaFree(nullptr);
#if defined(EP_TRAIN_NVSHMEM_DEVICE)
    // The device library's init: the host library's, plus this module's device state registered.
    const char* entry =
        "nvshmemi_init_thread (NVSHMEM's device library, built in; the host library found at run "
        "time must be of the same major version)";
    int provided = 0;
    const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                        NVSHMEM_VENDOR_PATCH_VERSION};
    status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
#else
    const char* entry = "nvshmemx_hostlib_init_attr";
    status = a.hostlib_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
#endif
    if (status != 0)
        throw std::runtime_error(std::string(entry) + " failed with status " + std::to_string(status) +
                                 " (NVSHMEM_DEBUG=WARN prints why)");
    if (a.init_status() == NVSHMEM_STATUS_NOT_INITIALIZED || a.my_pe() != rank || a.n_pes() != num_ranks)
        throw std::runtime_error("NVSHMEM init returned, but as PE " + std::to_string(a.my_pe()) + " of " +
                                 std::to_string(a.n_pes()) + " (status " + std::to_string(a.init_status()) +
                                 "), not rank " + std::to_string(rank) + " of " + std::to_string(num_ranks));
    g_initialized = true;
}

void* malloc(int64_t num_bytes) {
    const Api& a = need_initialized("malloc");
    if (num_bytes <= 0)
        throw std::invalid_argument("NVSHMEM malloc: num_bytes must be > 0, got " + std::to_string(num_bytes));
    void* p = a.malloc(static_cast<size_t>(num_bytes));
    if (p == nullptr)
        throw std::runtime_error("nvshmem_malloc(" + std::to_string(num_bytes) +
                                 " bytes) failed: the symmetric heap is too small (NVSHMEM_SYMMETRIC_SIZE)");
    return p;
}

void* peer_ptr(void* local, int pe) {
    return need_initialized("peer_ptr").ptr(local, pe);
}

bool is_symmetric_block(void* local, int pe, int num_pes) {
    if (api.handle == nullptr || !g_initialized) return false;
    return api.my_pe() == pe && api.n_pes() == num_pes && api.ptr(local, pe) == local;
}

#if defined(EP_TRAIN_NVSHMEM_DEVICE)
}  // namespace ep_train::nvshmem

// The host library entry points libnvshmem_device.a's host objects call, forwarded to the library
// loaded above (they run only after load(): init is what calls them first).
extern "C" int nvshmemid_hostlib_init_attr(int requested, int* provided, unsigned int bootstrap_flags,
                                           nvshmemx_init_attr_t* attr, nvshmemi_version_t version,
                                           nvshmemx_device_lib_init_cb cb) {
    return ep_train::nvshmem::need_loaded("init").id_init_attr(requested, provided, bootstrap_flags, attr, version, cb);
}
extern "C" int nvshmemid_init_status() {
    return ep_train::nvshmem::api.handle == nullptr ? NVSHMEM_STATUS_NOT_INITIALIZED
                                                    : ep_train::nvshmem::api.id_init_status();
}
extern "C" void nvshmemid_hostlib_finalize(void* device_ctx, void* transport_device_ctx) {
    if (ep_train::nvshmem::api.handle != nullptr) ep_train::nvshmem::api.id_finalize(device_ctx, transport_device_ctx);
}

namespace ep_train::nvshmem {
#endif

#else  // built without NVSHMEM headers

namespace {
[[noreturn]] void unavailable() {
    throw std::runtime_error("ep_train._C was built without NVSHMEM headers");
}
}  // namespace

bool compiled() {
    return false;
}
std::string load(const std::string&) {
    return "ep_train._C was built without NVSHMEM headers";
}
bool loaded() {
    return false;
}
std::string unique_id() {
    unavailable();
}
void init(int, int, const std::string&) {
    unavailable();
}
void* malloc(int64_t) {
    unavailable();
}
void* peer_ptr(void*, int) {
    unavailable();
}
bool is_symmetric_block(void*, int, int) {
    return false;
}

#endif

}  // namespace ep_train::nvshmem
