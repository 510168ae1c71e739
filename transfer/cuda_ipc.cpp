#include "transfer/cuda_ipc.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>

#include "csrc/build_info.h"

#ifdef KVBM_WITH_CUDA
#include <cuda.h>  // driver types only: the functions are reached through cudaGetDriverEntryPointByVersion
#include <cuda_runtime_api.h>

#include "csrc/cuda/chunk_copy.cuh"
#include "csrc/cuda/runtime.h"
#endif

namespace kvbm::transfer::cuda_ipc {

namespace {

constexpr char kMagic[] = "KVIPC1";  // 6 bytes + version in the name
constexpr size_t kMagicBytes = 6;

void put_u64(std::string* s, uint64_t v) { s->append(reinterpret_cast<const char*>(&v), 8); }
void put_str(std::string* s, const std::string& v) {
  uint16_t n = static_cast<uint16_t>(std::min<size_t>(v.size(), UINT16_MAX));
  s->append(reinterpret_cast<const char*>(&n), 2);
  s->append(v.data(), n);
}

// A bounds-checked reader over an encoded descriptor.
struct Reader {
  const std::string& s;
  size_t o = 0;
  bool ok = true;
  bool take(void* out, size_t n) {
    if (!ok || s.size() - o < n) return ok = false;
    std::memcpy(out, s.data() + o, n);
    o += n;
    return true;
  }
  std::string str() {
    uint16_t n = 0;
    if (!take(&n, 2) || s.size() - o < n) {
      ok = false;
      return {};
    }
    std::string v = s.substr(o, n);
    o += n;
    return v;
  }
};

std::string read_boot_id() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(f, id);
  return id;
}

}  // namespace

std::string encode(const Descriptor& d) {
  std::string s(kMagic, kMagicBytes);
  put_str(&s, d.handle);
  put_u64(&s, d.offset);
  put_u64(&s, static_cast<uint64_t>(static_cast<int64_t>(d.device)));
  put_u64(&s, d.process);
  put_str(&s, d.host);
  put_str(&s, d.pci_bus_id);
  return s;
}

StatusOr<Descriptor> decode(const std::string& blob) {
  if (blob.size() < kMagicBytes || blob.compare(0, kMagicBytes, kMagic, kMagicBytes) != 0)
    return InvalidArgument("CUDA IPC descriptor: bad magic (" + std::to_string(blob.size()) + " bytes)");
  Reader r{blob, kMagicBytes};
  Descriptor d;
  uint64_t dev = 0;
  d.handle = r.str();
  r.take(&d.offset, 8);
  r.take(&dev, 8);
  r.take(&d.process, 8);
  d.host = r.str();
  d.pci_bus_id = r.str();
  if (!r.ok || r.o != blob.size()) return InvalidArgument("CUDA IPC descriptor: truncated or trailing bytes");
  if (d.handle.size() != kHandleBytes)
    return InvalidArgument("CUDA IPC descriptor: handle of " + std::to_string(d.handle.size()) + " bytes, expected " +
                           std::to_string(kHandleBytes));
  d.device = static_cast<int32_t>(static_cast<int64_t>(dev));
  return d;
}

const std::string& host_identity() {
  static const std::string id = [] {
    char host[256] = {0};
    if (gethostname(host, sizeof(host) - 1) != 0) host[0] = 0;
    return read_boot_id() + "/" + host;
  }();
  return id;
}

uint64_t process_token() {
  static std::mutex mu;
  static pid_t pid = -1;
  static uint64_t token = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (pid != getpid()) {  // first use, or a forked child: a child is another process
    std::random_device rd;
    token = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(getpid());
    pid = getpid();
  }
  return token;
}

bool available() {
#ifdef KVBM_WITH_CUDA
  return cuda_available();
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// RemoteState (no CUDA calls of its own besides Mapping)

StatusOr<RemoteState> RemoteState::from_blob(const std::string& blob) {
  RemoteState st;
  if (blob.empty()) return st;
  StatusOr<Descriptor> d = decode(blob);
  if (!d.ok()) return d.status();
  st.desc_ = std::move(d.value());
  st.kind_ = st.desc_.host == host_identity() ? Kind::kUsable : Kind::kOtherHost;
  return st;
}

StatusOr<std::shared_ptr<Mapping>> RemoteState::map(int device, uint64_t region_addr) {
  if (kind_ != Kind::kUsable) return Unsupported("CUDA IPC: region is " + describe());
  for (auto& m : maps_)
    if (m->device() == device) return m;
  Status fail;
  if (desc_.process == process_token()) {
    // Exported by this process: its address is valid here already; kernels on another device
    // would need peer access, which kvbm does not enable behind the caller's back.
    if (desc_.device == device) {
      maps_.push_back(std::make_shared<Mapping>(region_addr - desc_.offset, device, false));
      return maps_.back();
    }
    fail = Unsupported("exported by this process on device " + std::to_string(desc_.device) + ", used from device " +
                       std::to_string(device));
  } else {
#ifdef KVBM_WITH_CUDA
    cuda::DeviceGuard guard;
    fail = guard.enter(device);
    if (fail.ok()) {
      cudaIpcMemHandle_t h;
      static_assert(sizeof(h) == kHandleBytes, "cudaIpcMemHandle_t size");
      std::memcpy(&h, desc_.handle.data(), kHandleBytes);
      void* p = nullptr;
      fail = cuda::cuda_status(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess),
                               "cudaIpcOpenMemHandle (memory of GPU " + desc_.pci_bus_id + " on device " +
                                   std::to_string(device) + ")");
      if (fail.ok()) {
        maps_.push_back(std::make_shared<Mapping>(reinterpret_cast<uint64_t>(p), device, true));
        return maps_.back();
      }
    }
#else
    fail = CudaUnavailable("kvbm was built without CUDA");
#endif
  }
  kind_ = Kind::kFailed;
  why_ = fail.message();
  return fail;
}

std::string RemoteState::describe() const {
  switch (kind_) {
    case Kind::kNone: return "none";
    case Kind::kOtherHost: return "other host";
    case Kind::kUsable: return maps_.empty() ? "not mapped" : "mapped";
    case Kind::kFailed: return "failed: " + why_;
  }
  return "?";
}

#ifdef KVBM_WITH_CUDA
// ---------------------------------------------------------------------------------------------
// CUDA: export, mappings, the copier

namespace {

using PointerGetAttribute = CUresult(CUDAAPI*)(void*, CUpointer_attribute, CUdeviceptr);

// cuPointerGetAttribute from the driver cudart already loaded (nullptr when there is none).
PointerGetAttribute pointer_get_attribute() {
  static PointerGetAttribute fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<PointerGetAttribute>(nullptr);
    }
    return reinterpret_cast<PointerGetAttribute>(p);
  }();
  return fn;
}

}  // namespace

std::string export_region(uint64_t addr, uint64_t length, int* device, std::string* why_not) {
  *device = -1;
  auto no = [&](std::string why) {
    *why_not = std::move(why);
    return std::string();
  };
  if (!available()) return no("no usable CUDA device");
  cudaPointerAttributes a{};
  Status st = cuda::cuda_status(cudaPointerGetAttributes(&a, reinterpret_cast<const void*>(addr)),
                                "cudaPointerGetAttributes");
  if (!st.ok()) return no(st.message());
  if (a.type != cudaMemoryTypeDevice) return no("not device memory (cudaPointerGetAttributes type " + std::to_string(static_cast<int>(a.type)) + ")");
  *device = a.device;
  cuda::DeviceGuard guard;
  st = guard.enter(a.device);
  if (!st.ok()) return no(st.message());
  PointerGetAttribute get = pointer_get_attribute();
  if (get == nullptr) return no("the driver's cuPointerGetAttribute is not reachable");
  // 8 zeroed bytes for each answer: the driver writes an int or a pointer-sized value.
  uint64_t base = 0, size = 0, capable = 0;
  if (get(&base, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, addr) != CUDA_SUCCESS ||
      get(&size, CU_POINTER_ATTRIBUTE_RANGE_SIZE, addr) != CUDA_SUCCESS)
    return no("cuPointerGetAttribute(RANGE_START_ADDR/RANGE_SIZE) failed");
  if (addr < base || addr + length > base + size)
    return no("the range spans more than one allocation");
  if (get(&capable, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, addr) == CUDA_SUCCESS && capable == 0)
    return no("the allocation does not support cudaIpcGetMemHandle (VMM / expandable segments or a memory pool)");
  cudaIpcMemHandle_t h;
  st = cuda::cuda_status(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(base)), "cudaIpcGetMemHandle");
  if (!st.ok()) return no(st.message());
  char pci[32] = {0};
  if (cudaDeviceGetPCIBusId(pci, sizeof(pci) - 1, a.device) != cudaSuccess) {
    cudaGetLastError();
    pci[0] = 0;
  }
  Descriptor d;
  d.handle.assign(reinterpret_cast<const char*>(&h), sizeof(h));
  d.offset = addr - base;
  d.device = a.device;
  d.process = process_token();
  d.host = host_identity();
  d.pci_bus_id = pci;
  return encode(d);
}

Mapping::~Mapping() {
  if (!owned_) return;
  cuda::DeviceGuard guard;
  if (guard.enter(device_).ok() && cudaIpcCloseMemHandle(reinterpret_cast<void*>(base_)) != cudaSuccess)
    cudaGetLastError();  // at process exit the runtime may be gone already: nothing left to close
}

struct CopySlot {
  uint64_t* host = nullptr;  // pinned staging: pairs, then lengths
  uint64_t* dev = nullptr;   // the kernel's copy of it
  uint64_t cap = 0;          // entries (u64) of both
  cudaEvent_t done = nullptr;
  bool busy = false;
};

struct Copier::Queue {
  int device = -1;
  cudaStream_t stream = nullptr;
  int sm_count = 0;
  std::vector<std::unique_ptr<CopySlot>> slots;
};

namespace {

void free_slot(CopySlot* s) {
  if (s->host) cudaFreeHost(s->host);
  if (s->dev) cudaFree(s->dev);
  s->host = nullptr;
  s->dev = nullptr;
  s->cap = 0;
}

Status alloc_slot(CopySlot* s, uint64_t entries) {
  uint64_t cap = 4096;  // 32 KiB: 2,048 pairs
  while (cap < entries) cap *= 2;
  const size_t bytes = cap * sizeof(uint64_t);
  KVBM_RETURN_IF_ERROR(cuda::cuda_status(cudaHostAlloc(reinterpret_cast<void**>(&s->host), bytes, cudaHostAllocDefault),
                                         "cudaHostAlloc(" + std::to_string(bytes) + ") for a pair table"));
  Status st = cuda::cuda_status(cudaMalloc(reinterpret_cast<void**>(&s->dev), bytes),
                                "cudaMalloc(" + std::to_string(bytes) + ") for a pair table");
  if (!st.ok()) {
    free_slot(s);
    return st;
  }
  if (s->done == nullptr) {
    st = cuda::cuda_status(cudaEventCreateWithFlags(&s->done, cudaEventDisableTiming), "cudaEventCreate");
    if (!st.ok()) {
      free_slot(s);
      return st;
    }
  }
  s->cap = cap;
  return Status::Ok();
}

}  // namespace

Copier::Copier() = default;

Copier::~Copier() {
  for (auto& q : queues_) {
    cuda::DeviceGuard guard;
    if (!guard.enter(q->device).ok()) continue;
    if (q->stream) cudaStreamSynchronize(q->stream);
    for (auto& s : q->slots) {
      free_slot(s.get());
      if (s->done) cudaEventDestroy(s->done);
    }
    if (q->stream) cudaStreamDestroy(q->stream);
    cudaGetLastError();
  }
}

StatusOr<Copier::Queue*> Copier::queue(int device) {
  for (auto& q : queues_)
    if (q->device == device) return q.get();
  auto q = std::make_unique<Queue>();
  q->device = device;
  KVBM_RETURN_IF_ERROR(cuda::cuda_status(cudaDeviceGetAttribute(&q->sm_count, cudaDevAttrMultiProcessorCount, device),
                                         "cudaDeviceGetAttribute(multiProcessorCount)"));
  KVBM_RETURN_IF_ERROR(cuda::cuda_status(cudaStreamCreateWithFlags(&q->stream, cudaStreamNonBlocking),
                                         "cudaStreamCreate for CUDA IPC copies"));
  queues_.push_back(std::move(q));
  return queues_.back().get();
}

StatusOr<Copier::Ticket> Copier::submit(int device, uint64_t n, bool per_chunk, uint64_t length, uint64_t total_bytes,
                                        const std::function<void(uint64_t*, uint64_t*)>& fill) {
  if (n == 0) return InvalidArgument("CUDA IPC copy of 0 chunks");
  cuda::DeviceGuard guard;
  KVBM_RETURN_IF_ERROR(guard.enter(device));
  StatusOr<Queue*> qr = queue(device);
  if (!qr.ok()) return qr.status();
  Queue* q = qr.value();
  const uint64_t entries = n * (per_chunk ? 3 : 2);
  // A free slot large enough; else grow a free one; else a new one. Busy slots are never touched:
  // their kernel may still be reading the device table (and their upload the pinned one).
  CopySlot* slot = nullptr;
  for (auto& s : q->slots)
    if (!s->busy && s->cap >= entries) {
      slot = s.get();
      break;
    }
  if (slot == nullptr) {
    for (auto& s : q->slots)
      if (!s->busy) {
        slot = s.get();
        break;
      }
    if (slot == nullptr) {
      q->slots.push_back(std::make_unique<CopySlot>());
      slot = q->slots.back().get();
    }
    free_slot(slot);
    KVBM_RETURN_IF_ERROR(alloc_slot(slot, entries));
  }
  fill(slot->host, per_chunk ? slot->host + 2 * n : nullptr);
  const size_t bytes = entries * sizeof(uint64_t);
  cuda::ChunkCopyArgs args;
  args.pairs = slot->dev;
  args.lengths = per_chunk ? slot->dev + 2 * n : nullptr;
  args.length = length;
  args.n = n;
  const cuda::ChunkCopyPlan plan = cuda::plan_chunk_copy(n, length, !per_chunk, total_bytes, q->sm_count);
  args.piece = plan.piece;
  KVBM_RETURN_IF_ERROR(cuda::cuda_status(cudaMemcpyAsync(slot->dev, slot->host, bytes, cudaMemcpyHostToDevice, q->stream),
                                         "uploading the CUDA IPC pair table"));
  // From here the slot may be in use by the stream: it stays busy until its event completed,
  // even when a later step fails (the event is then recorded anyway, or the stream synchronized).
  slot->busy = true;
  Status st = cuda::cuda_status(cuda::launch_chunk_copy(args, plan.grid, q->stream), "launching the chunk copy kernel");
  Status ev = cuda::cuda_status(cudaEventRecord(slot->done, q->stream), "cudaEventRecord");
  if (!ev.ok()) {
    cudaStreamSynchronize(q->stream);
    cudaGetLastError();
    slot->busy = false;
    return st.ok() ? ev : st;
  }
  if (!st.ok()) {
    // Nothing of ours runs after the upload; the slot frees itself once the event is reached.
    cudaEventSynchronize(slot->done);
    cudaGetLastError();
    slot->busy = false;
    return st;
  }
  return Ticket{device, slot};
}

StatusOr<bool> Copier::query(const Ticket& t, bool own_thread) {
  if (t.slot == nullptr) return Internal("CUDA IPC: query of an empty ticket");
  cuda::DeviceGuard guard;
  int cur = -1;
  if (!own_thread) {
    KVBM_RETURN_IF_ERROR(guard.enter(t.device));
  } else if (cudaGetDevice(&cur) != cudaSuccess || cur != t.device) {
    KVBM_RETURN_IF_ERROR(cuda::cuda_status(cudaSetDevice(t.device), "cudaSetDevice(" + std::to_string(t.device) + ")"));
  }
  cudaError_t e = cudaEventQuery(t.slot->done);
  if (e == cudaErrorNotReady) return false;
  KVBM_RETURN_IF_ERROR(cuda::cuda_status(e, "CUDA IPC copy on device " + std::to_string(t.device)));
  return true;
}

void Copier::release(const Ticket& t) {
  if (t.slot) t.slot->busy = false;
}

void Copier::synchronize() {
  for (auto& q : queues_) {
    cuda::DeviceGuard guard;
    if (guard.enter(q->device).ok() && q->stream && cudaStreamSynchronize(q->stream) != cudaSuccess) cudaGetLastError();
  }
}

#else  // !KVBM_WITH_CUDA: no export, no mapping, no copies

std::string export_region(uint64_t, uint64_t, int* device, std::string* why_not) {
  *device = -1;
  *why_not = "kvbm was built without CUDA";
  return {};
}

Mapping::~Mapping() = default;

struct CopySlot {};
struct Copier::Queue {};
Copier::Copier() = default;
Copier::~Copier() = default;
StatusOr<Copier::Queue*> Copier::queue(int) { return CudaUnavailable("kvbm was built without CUDA"); }
StatusOr<Copier::Ticket> Copier::submit(int, uint64_t, bool, uint64_t, uint64_t,
                                        const std::function<void(uint64_t*, uint64_t*)>&) {
  return CudaUnavailable("kvbm was built without CUDA");
}
StatusOr<bool> Copier::query(const Ticket&, bool) { return CudaUnavailable("kvbm was built without CUDA"); }
void Copier::release(const Ticket&) {}
void Copier::synchronize() {}

#endif  // KVBM_WITH_CUDA

}  // namespace kvbm::transfer::cuda_ipc
