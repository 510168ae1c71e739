#include "csrc/kv_transfer.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "csrc/build_info.h"

#ifdef KVBM_WITH_CUDA
#include <cuda_runtime_api.h>

#include "csrc/cuda/kv_copy.cuh"
#include "csrc/cuda/runtime.h"
#endif

namespace kvbm {

StatusOr<CopyMethod> parse_copy_method(const std::string& name) {
  if (name == "auto") return CopyMethod::kAuto;
  if (name == "kernel") return CopyMethod::kKernel;
  if (name == "copy_engine") return CopyMethod::kCopyEngine;
  if (name == "naive") return CopyMethod::kNaive;
  if (name == "staged") return CopyMethod::kStaged;
  return InvalidArgument("method '" + name + "' is not one of auto, kernel, copy_engine, naive, staged");
}

struct TransferHandle::State {
  std::mutex mu;
  bool done = true;
  Status status;
  uint64_t bytes = 0;
  size_t num_blocks = 0;
  int device = kHostDevice;
  std::shared_ptr<const void> keepalive;  // device tables / layout, until the work has run
#ifdef KVBM_WITH_CUDA
  cudaEvent_t event = nullptr;
  ~State() {
    if (event != nullptr) cudaEventDestroy(event);
  }
#endif
};

TransferHandle::TransferHandle() : s_(std::make_shared<State>()) {}

StatusOr<bool> TransferHandle::poll() const {
  std::lock_guard<std::mutex> lock(s_->mu);
  if (s_->done) {
    if (!s_->status.ok()) return s_->status;
    return true;
  }
#ifdef KVBM_WITH_CUDA
  cudaError_t e = cudaEventQuery(s_->event);
  if (e == cudaErrorNotReady) return false;
  s_->done = true;
  s_->keepalive.reset();
  if (e != cudaSuccess) {
    cudaGetLastError();
    s_->status = CudaError(std::string("transfer failed on CUDA device ") + std::to_string(s_->device) + ": " +
                           cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
    return s_->status;
  }
#endif
  return true;
}

StatusOr<bool> TransferHandle::wait(double timeout_s) const {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  auto sleep = std::chrono::microseconds(2);
  for (;;) {
    StatusOr<bool> r = poll();
    if (!r.ok() || r.value()) return r;
    if (timeout_s >= 0 && std::chrono::duration<double>(clock::now() - start).count() >= timeout_s) return false;
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::microseconds(200));
  }
}

Status TransferHandle::error() const {
  std::lock_guard<std::mutex> lock(s_->mu);
  return s_->status;
}

uint64_t TransferHandle::bytes() const { return s_->bytes; }
size_t TransferHandle::num_blocks() const { return s_->num_blocks; }

namespace {

Status check_addresses(const uint64_t* addrs, size_t n, const char* what) {
  for (size_t i = 0; i < n; ++i)
    if (addrs[i] == 0)
      return InvalidArgument(std::string(what) + ": host slot address [" + std::to_string(i) + "] is null");
  return Status::Ok();
}

TransferHandle completed(size_t n, uint64_t bytes) {
  auto s = std::make_shared<TransferHandle::State>();
  s->num_blocks = n;
  s->bytes = bytes;
  return TransferHandle(std::move(s));
}

#ifdef KVBM_WITH_CUDA

using cuda::cuda_status;
using cuda::DeviceGuard;

// A layout's piece table in device memory, uploaded on first use and cached per layout.
struct DeviceTables {
  int device = 0;
  cuda::DevPiece* pieces = nullptr;
  uint32_t num_pieces = 0;
  int sm_count = 1;
  ~DeviceTables() {
    if (pieces != nullptr) cudaFree(pieces);
  }
};

struct TableKey {
  const KvLayout* layout;
  uint64_t piece_bytes;
  int layer_begin, layer_end;
  bool operator<(const TableKey& o) const {
    return std::tie(layout, piece_bytes, layer_begin, layer_end) <
           std::tie(o.layout, o.piece_bytes, o.layer_begin, o.layer_end);
  }
};
struct TableEntry {
  std::weak_ptr<const KvLayout> owner;
  std::shared_ptr<DeviceTables> tables;
};

// Pieces of the layer range r (resolved), host offsets relative to the range's start in a slot.
StatusOr<std::shared_ptr<DeviceTables>> device_tables(const std::shared_ptr<const KvLayout>& layout,
                                                      uint64_t piece_bytes, LayerRange r) {
  static std::mutex mu;
  static std::map<TableKey, TableEntry> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (auto it = cache.begin(); it != cache.end();)  // drop tables of layouts that are gone
    it = it->second.owner.expired() ? cache.erase(it) : std::next(it);
  TableKey key{layout.get(), piece_bytes, r.begin, r.end};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.tables;
  std::vector<cuda::DevPiece> host;
  for (const KvChunk& c : layout->range_chunks(r, std::max<uint64_t>(16, piece_bytes)))
    host.push_back({c.addr, c.block_stride, c.bytes, c.host_offset});
  if (host.size() > UINT32_MAX) return InvalidArgument("layout has too many chunk pieces per block");
  auto t = std::make_shared<DeviceTables>();
  t->device = layout->device();
  t->num_pieces = static_cast<uint32_t>(host.size());
  KVBM_RETURN_IF_ERROR(cuda_status(cudaDeviceGetAttribute(&t->sm_count, cudaDevAttrMultiProcessorCount, t->device),
                                   "cudaDeviceGetAttribute(multiProcessorCount)"));
  const size_t nbytes = host.size() * sizeof(cuda::DevPiece);
  KVBM_RETURN_IF_ERROR(cuda_status(cudaMalloc(reinterpret_cast<void**>(&t->pieces), nbytes),
                                   "cudaMalloc(" + std::to_string(nbytes) + " bytes) for the chunk table"));
  // Upload on a private non-blocking stream: a plain cudaMemcpy runs on the legacy stream and
  // would wait for all work queued on the caller's (blocking) streams.
  cudaStream_t up = nullptr;
  KVBM_RETURN_IF_ERROR(cuda_status(cudaStreamCreateWithFlags(&up, cudaStreamNonBlocking), "cudaStreamCreate"));
  Status st = cuda_status(cudaMemcpyAsync(t->pieces, host.data(), nbytes, cudaMemcpyHostToDevice, up),
                          "uploading the chunk table");
  if (st.ok()) st = cuda_status(cudaStreamSynchronize(up), "uploading the chunk table");
  cudaStreamDestroy(up);
  KVBM_RETURN_IF_ERROR(st);
  cache[key] = {layout, t};
  return t;
}

// kvbm's own non-blocking streams, one per device and direction, so offload and onboard overlap.
StatusOr<cudaStream_t> own_stream(int device, bool to_host) {
  static std::mutex mu;
  static std::map<std::pair<int, bool>, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(device, to_host);
  auto it = streams.find(key);
  if (it != streams.end()) return it->second;
  cudaStream_t s = nullptr;
  KVBM_RETURN_IF_ERROR(cuda_status(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
  streams[key] = s;
  return s;
}

// True when the device can load/store every slot address directly (pinned/registered host
// memory under UVA, device or managed memory). *first_bad gets the first index that cannot.
Status all_device_accessible(const uint64_t* addrs, size_t n, int device, bool* ok, size_t* first_bad) {
  *ok = true;
  for (size_t i = 0; i < n; ++i) {
    cudaPointerAttributes a{};
    cudaError_t e = cudaPointerGetAttributes(&a, reinterpret_cast<const void*>(addrs[i]));
    if (e != cudaSuccess) {
      cudaGetLastError();
      *ok = false;
    } else if (a.type == cudaMemoryTypeHost) {
      *ok = a.devicePointer == reinterpret_cast<void*>(addrs[i]);
    } else if (a.type == cudaMemoryTypeDevice) {
      *ok = a.device == device;
    } else if (a.type != cudaMemoryTypeManaged) {
      *ok = false;
    }
    if (!*ok) {
      *first_bad = i;
      return Status::Ok();
    }
  }
  return Status::Ok();
}

Status launch_kernel(const DeviceTables& t, const int64_t* ids, size_t n, const uint64_t* addrs, bool to_host,
                     const TransferOptions& opt, cudaStream_t stream) {
  auto args = std::make_unique<cuda::LaunchArgs>();
  args->pieces = t.pieces;
  args->num_pieces = t.num_pieces;
  args->to_host = to_host ? 1 : 0;
  const int cap = opt.max_ctas > 0 ? opt.max_ctas : 4 * t.sm_count;
  for (size_t start = 0; start < n; start += cuda::kMaxBatchPerLaunch) {
    const size_t m = std::min<size_t>(cuda::kMaxBatchPerLaunch, n - start);
    args->n = static_cast<uint32_t>(m);
    std::copy(ids + start, ids + start + m, args->block_ids);
    std::copy(addrs + start, addrs + start + m, args->host);
    const uint64_t items = static_cast<uint64_t>(m) * t.num_pieces;
    const int grid = static_cast<int>(std::min<uint64_t>(items, static_cast<uint64_t>(cap)));
    KVBM_RETURN_IF_ERROR(cuda_status(cuda::launch_kv_copy(*args, grid, stream), "launching kv_copy_kernel"));
  }
  return Status::Ok();
}

// `chunks`: the layer range's chunks, host offsets relative to the range start (addrs point there).
Status naive_copies(const std::vector<KvChunk>& chunks, const int64_t* ids, size_t n, const uint64_t* addrs,
                    bool to_host, cudaStream_t stream) {
  for (size_t i = 0; i < n; ++i) {
    for (const KvChunk& c : chunks) {
      void* eng = reinterpret_cast<void*>(c.addr + static_cast<uint64_t>(ids[i] * c.block_stride));
      void* host = reinterpret_cast<void*>(addrs[i] + c.host_offset);
      KVBM_RETURN_IF_ERROR(cuda_status(to_host ? cudaMemcpyAsync(host, eng, c.bytes, cudaMemcpyDefault, stream)
                                               : cudaMemcpyAsync(eng, host, c.bytes, cudaMemcpyDefault, stream),
                                       "cudaMemcpyAsync"));
    }
  }
  return Status::Ok();
}

Status copy_engine_batch(const KvLayout& layout, const std::vector<KvChunk>& chunks, const int64_t* ids, size_t n,
                         const uint64_t* addrs, bool to_host, cudaStream_t stream) {
#if CUDART_VERSION >= 12080
  if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread)
    return naive_copies(chunks, ids, n, addrs, to_host, stream);  // the batch API refuses the NULL stream
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  const size_t total = n * chunks.size();
  dsts.reserve(total);
  srcs.reserve(total);
  sizes.reserve(total);
  for (size_t i = 0; i < n; ++i) {
    for (const KvChunk& c : chunks) {
      void* eng = reinterpret_cast<void*>(c.addr + static_cast<uint64_t>(ids[i] * c.block_stride));
      void* host = reinterpret_cast<void*>(addrs[i] + c.host_offset);
      dsts.push_back(to_host ? host : eng);
      srcs.push_back(to_host ? eng : host);
      sizes.push_back(c.bytes);
    }
  }
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  cudaMemLocation hostloc{};
  hostloc.type = cudaMemLocationTypeHost;
  cudaMemLocation devloc{};
  devloc.type = cudaMemLocationTypeDevice;
  devloc.id = layout.device();
  attr.srcLocHint = to_host ? devloc : hostloc;
  attr.dstLocHint = to_host ? hostloc : devloc;
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  constexpr size_t kMaxPerCall = 8192;
  for (size_t start = 0; start < total; start += kMaxPerCall) {
    const size_t m = std::min(kMaxPerCall, total - start);
    size_t idx = 0;
#if CUDART_VERSION >= 13000
    cudaError_t e = cudaMemcpyBatchAsync(dsts.data() + start, srcs.data() + start, sizes.data() + start, m, &attr,
                                         &idx, 1, stream);
#else
    size_t fail_idx = 0;
    cudaError_t e = cudaMemcpyBatchAsync(dsts.data() + start, const_cast<void**>(srcs.data() + start),
                                         sizes.data() + start, m, &attr, &idx, 1, &fail_idx, stream);
#endif
    KVBM_RETURN_IF_ERROR(cuda_status(e, "cudaMemcpyBatchAsync of " + std::to_string(m) + " chunks"));
  }
  return Status::Ok();
#else
  (void)layout;
  return naive_copies(chunks, ids, n, addrs, to_host, stream);
#endif
}

// Note [staged copies]
// Copy engines pay roughly a microsecond per copy, so 32 KiB chunks reach only ~65% of PCIe
// speed through them (measured on an H100), while whole 2 MiB slots run at full speed. A kernel
// writing mapped host memory reaches ~94% but keeps SMs busy for the whole transfer, which
// slows a concurrent persistent GEMM by up to 2x (a CTA sharing an SM delays the whole wave).
// Staging splits the work: a kernel packs the blocks' chunks into contiguous device memory
// (device-to-device, ~50x faster than PCIe, so the SMs are busy ~2% of the time) and the copy
// engines move whole slots (adjacent slots merged) between staging and host. Sub-batches
// alternate between two staging buffers: the kernel runs on the caller's stream, the copies
// on kvbm's helper stream for that device and direction, with events so that packing batch
// j+1 overlaps copying batch j, and staging buffer j%2 is reused only after its copy is done.
// Staging memory comes from a stream-ordered pool owned by kvbm (cudaMallocFromPoolAsync).

StatusOr<cudaMemPool_t> staging_pool(int device) {
  static std::mutex mu;
  static std::map<int, cudaMemPool_t> pools;
  std::lock_guard<std::mutex> lock(mu);
  auto it = pools.find(device);
  if (it != pools.end()) return it->second;
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool = nullptr;
  KVBM_RETURN_IF_ERROR(cuda_status(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate for staging"));
  uint64_t keep = UINT64_MAX;  // keep freed staging memory for the next transfer
  KVBM_RETURN_IF_ERROR(cuda_status(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
                                   "cudaMemPoolSetAttribute(release threshold)"));
  pools[device] = pool;
  return pool;
}

StatusOr<cudaStream_t> helper_stream(int device, bool to_host) {
  static std::mutex mu;
  static std::map<std::pair<int, bool>, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(device, to_host);
  auto it = streams.find(key);
  if (it != streams.end()) return it->second;
  cudaStream_t s = nullptr;
  KVBM_RETURN_IF_ERROR(cuda_status(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
  streams[key] = s;
  return s;
}

// Whole-slot copies between host slots and contiguous staging, adjacent slots merged.
Status slot_copies(const uint64_t* host, size_t m, uint64_t stage, uint64_t bb, bool to_host, cudaStream_t stream) {
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  for (size_t i = 0; i < m;) {
    size_t j = i + 1;
    while (j < m && host[j] == host[j - 1] + bb) ++j;
    void* h = reinterpret_cast<void*>(host[i]);
    void* d = reinterpret_cast<void*>(stage + i * bb);
    dsts.push_back(to_host ? h : d);
    srcs.push_back(to_host ? d : h);
    sizes.push_back((j - i) * bb);
    i = j;
  }
#if CUDART_VERSION >= 12080
  if (dsts.size() > 1) {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t idx = 0;
#if CUDART_VERSION >= 13000
    cudaError_t e = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attr, &idx, 1, stream);
#else
    size_t fail_idx = 0;
    cudaError_t e = cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(), dsts.size(),
                                         &attr, &idx, 1, &fail_idx, stream);
#endif
    return cuda_status(e, "cudaMemcpyBatchAsync of " + std::to_string(dsts.size()) + " slots");
  }
#endif
  for (size_t i = 0; i < dsts.size(); ++i)
    KVBM_RETURN_IF_ERROR(cuda_status(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream),
                                     "cudaMemcpyAsync of a slot"));
  return Status::Ok();
}

class EventSet {
 public:
  ~EventSet() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);  // released once their work completes
  }
  StatusOr<cudaEvent_t> make() {
    cudaEvent_t e = nullptr;
    KVBM_RETURN_IF_ERROR(cuda_status(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate"));
    events_.push_back(e);
    return e;
  }

 private:
  std::vector<cudaEvent_t> events_;
};

// `bb`: bytes per block moved (the layer range's span); addrs point at the span inside each slot.
Status staged_copy(const KvLayout& layout, const DeviceTables& t, uint64_t bb, const int64_t* ids, size_t n,
                   const uint64_t* addrs, bool to_host, const TransferOptions& opt, cudaStream_t stream) {
  const uint64_t want = opt.stage_bytes ? opt.stage_bytes : (uint64_t{32} << 20);
  const size_t per = static_cast<size_t>(std::max<uint64_t>(1, want / bb));
  const size_t sub = std::min(per, n);
  const size_t nsub = (n + sub - 1) / sub;
  const int nbuf = nsub > 1 ? 2 : 1;
  StatusOr<cudaMemPool_t> pool = staging_pool(layout.device());
  if (!pool.ok()) return pool.status();
  StatusOr<cudaStream_t> hs = helper_stream(layout.device(), to_host);
  if (!hs.ok()) return hs.status();
  cudaStream_t helper = hs.value();
  void* stage = nullptr;
  const size_t stage_bytes = static_cast<size_t>(nbuf) * sub * bb;
  KVBM_RETURN_IF_ERROR(cuda_status(cudaMallocFromPoolAsync(&stage, stage_bytes, pool.value(), stream),
                                   "cudaMallocFromPoolAsync(" + std::to_string(stage_bytes) + " bytes of staging)"));
  EventSet events;
  auto record = [&](cudaStream_t s) -> StatusOr<cudaEvent_t> {
    StatusOr<cudaEvent_t> e = events.make();
    if (!e.ok()) return e;
    KVBM_RETURN_IF_ERROR(cuda_status(cudaEventRecord(e.value(), s), "cudaEventRecord"));
    return e;
  };
  auto wait = [&](cudaStream_t s, cudaEvent_t e) {
    return cuda_status(cudaStreamWaitEvent(s, e, 0), "cudaStreamWaitEvent");
  };
  // The helper starts after everything already queued on the caller's stream (the allocation
  // included).
  StatusOr<cudaEvent_t> start = record(stream);
  if (!start.ok()) return start.status();
  KVBM_RETURN_IF_ERROR(wait(helper, start.value()));
  std::vector<uint64_t> stage_addrs(sub);
  std::vector<cudaEvent_t> buf_free(nbuf, nullptr);  // last use of buffer b finished (on its stream)
  for (size_t j = 0; j < nsub; ++j) {
    const size_t first = j * sub;
    const size_t m = std::min(sub, n - first);
    const int b = static_cast<int>(j % nbuf);
    const uint64_t base = reinterpret_cast<uint64_t>(stage) + static_cast<uint64_t>(b) * sub * bb;
    for (size_t i = 0; i < m; ++i) stage_addrs[i] = base + i * bb;
    if (to_host) {
      if (buf_free[b]) KVBM_RETURN_IF_ERROR(wait(stream, buf_free[b]));  // its previous copy is done
      KVBM_RETURN_IF_ERROR(launch_kernel(t, ids + first, m, stage_addrs.data(), true, opt, stream));
      StatusOr<cudaEvent_t> packed = record(stream);
      if (!packed.ok()) return packed.status();
      KVBM_RETURN_IF_ERROR(wait(helper, packed.value()));
      KVBM_RETURN_IF_ERROR(slot_copies(addrs + first, m, base, bb, true, helper));
      StatusOr<cudaEvent_t> copied = record(helper);
      if (!copied.ok()) return copied.status();
      buf_free[b] = copied.value();
    } else {
      if (buf_free[b]) KVBM_RETURN_IF_ERROR(wait(helper, buf_free[b]));  // its previous unpack is done
      KVBM_RETURN_IF_ERROR(slot_copies(addrs + first, m, base, bb, false, helper));
      StatusOr<cudaEvent_t> loaded = record(helper);
      if (!loaded.ok()) return loaded.status();
      KVBM_RETURN_IF_ERROR(wait(stream, loaded.value()));
      KVBM_RETURN_IF_ERROR(launch_kernel(t, ids + first, m, stage_addrs.data(), false, opt, stream));
      StatusOr<cudaEvent_t> unpacked = record(stream);
      if (!unpacked.ok()) return unpacked.status();
      buf_free[b] = unpacked.value();
    }
  }
  // The caller's stream completes only after the last copy; then the staging memory is freed.
  StatusOr<cudaEvent_t> done = record(helper);
  if (!done.ok()) return done.status();
  KVBM_RETURN_IF_ERROR(wait(stream, done.value()));
  return cuda_status(cudaFreeAsync(stage, stream), "cudaFreeAsync(staging)");
}

#endif  // KVBM_WITH_CUDA

StatusOr<TransferHandle> transfer(const std::shared_ptr<const KvLayout>& layout, const int64_t* ids, size_t n,
                                  const uint64_t* addrs, const TransferOptions& opt, bool to_host) {
  const char* what = to_host ? "gather" : "scatter";
  if (!layout) return InvalidArgument(std::string(what) + ": no layout");
  StatusOr<LayerRange> resolved = layout->resolve(opt.layers);
  if (!resolved.ok()) return Status(resolved.status().code(), std::string(what) + ": " + resolved.status().message());
  const LayerRange range = resolved.value();
  KVBM_RETURN_IF_ERROR(layout->check_block_ids(ids, n));
  KVBM_RETURN_IF_ERROR(check_addresses(addrs, n, what));
  const uint64_t span = layout->range_bytes(range);
  const uint64_t bytes = n * span;
  if (layout->on_host()) {
    KVBM_RETURN_IF_ERROR(to_host ? host_gather(*layout, ids, n, addrs, range)
                                 : host_scatter(*layout, ids, n, addrs, range));
    return completed(n, bytes);
  }
#ifndef KVBM_WITH_CUDA
  return CudaUnavailable(std::string(what) + ": the KV tensors are on CUDA device " +
                         std::to_string(layout->device()) +
                         " but this kvbm build has no CUDA support (rebuild with KVBM_CUDA=ON and nvcc)");
#else
  if (!cuda_available())
    return CudaUnavailable(std::string(what) + ": the KV tensors are on CUDA device " +
                           std::to_string(layout->device()) + " but no CUDA GPU is usable on this machine");
  if (layout->device() >= cuda_device_count())
    return InvalidArgument(std::string(what) + ": the layout's CUDA device " + std::to_string(layout->device()) +
                           " does not exist (" + std::to_string(cuda_device_count()) + " visible)");
  if (n == 0) return completed(0, 0);
  DeviceGuard guard;
  KVBM_RETURN_IF_ERROR(guard.enter(layout->device()));
  cudaStream_t stream = nullptr;
  if (opt.own_stream) {
    StatusOr<cudaStream_t> s = own_stream(layout->device(), to_host);
    if (!s.ok()) return s.status();
    stream = s.value();
  } else {
    stream = reinterpret_cast<cudaStream_t>(opt.stream);
  }
  // Note [choosing a copy method]
  // Measured on an H100 (PCIe gen5 x16; benchmarks/results/cuda_datapath.md), moving 1 GiB of
  // random paged blocks (32 layers x K,V chunks of 32 KiB or 256 KiB): kStaged reaches 97-98%
  // of a contiguous cudaMemcpy of the same bytes in either direction, 1.67x that when offload and
  // onboard run at once, and slows a concurrent bf16 GEMM by under 4%. kKernel reaches 92-97%
  // but doubles the GEMM's time (its CTAs share SMs with the GEMM's persistent wave) and only
  // 1.27x with both directions; kCopyEngine is SM-free but pays ~1 us per chunk (62% at 32 KiB).
  // So auto means staged, which also works for pageable slots.
  CopyMethod method = opt.method == CopyMethod::kAuto ? CopyMethod::kStaged : opt.method;
  if (method == CopyMethod::kKernel) {
    bool ok = true;
    size_t bad = 0;
    KVBM_RETURN_IF_ERROR(all_device_accessible(addrs, n, layout->device(), &ok, &bad));
    if (!ok)
      return InvalidArgument(std::string(what) + ": host slot address [" + std::to_string(bad) +
                             "] is not pinned/mapped memory the GPU can access; method 'kernel' needs pinned "
                             "slots (kvbm alloc_host, cudaHostAlloc, torch pin_memory); use 'auto' or "
                             "'staged' for pageable memory");
  }
  // Below, host addresses point at the layer range's span inside each slot and every chunk
  // table has host offsets relative to it (for the full range: the slots themselves).
  const uint64_t base = layout->range_offset(range);
  std::vector<uint64_t> shifted;
  if (base != 0) {
    shifted.resize(n);
    for (size_t i = 0; i < n; ++i) shifted[i] = addrs[i] + base;
    addrs = shifted.data();
  }
  std::shared_ptr<DeviceTables> tables;
  if (method == CopyMethod::kKernel || method == CopyMethod::kStaged) {
    const uint64_t piece = opt.piece_bytes ? opt.piece_bytes : (uint64_t{32} << 10);
    StatusOr<std::shared_ptr<DeviceTables>> t = device_tables(layout, piece, range);
    if (!t.ok()) return t.status();
    tables = t.value();
  }
  if (method == CopyMethod::kKernel) {
    KVBM_RETURN_IF_ERROR(launch_kernel(*tables, ids, n, addrs, to_host, opt, stream));
  } else if (method == CopyMethod::kStaged) {
    KVBM_RETURN_IF_ERROR(staged_copy(*layout, *tables, span, ids, n, addrs, to_host, opt, stream));
  } else if (method == CopyMethod::kCopyEngine) {
    KVBM_RETURN_IF_ERROR(copy_engine_batch(*layout, layout->range_chunks(range), ids, n, addrs, to_host, stream));
  } else {
    KVBM_RETURN_IF_ERROR(naive_copies(layout->range_chunks(range), ids, n, addrs, to_host, stream));
  }
  auto s = std::make_shared<TransferHandle::State>();
  s->num_blocks = n;
  s->bytes = bytes;
  s->device = layout->device();
  s->done = false;
  struct Keep {
    std::shared_ptr<const KvLayout> layout;
    std::shared_ptr<DeviceTables> tables;
  };
  s->keepalive = std::make_shared<Keep>(Keep{layout, tables});
  KVBM_RETURN_IF_ERROR(cuda_status(cudaEventCreateWithFlags(&s->event, cudaEventDisableTiming), "cudaEventCreate"));
  KVBM_RETURN_IF_ERROR(cuda_status(cudaEventRecord(s->event, stream), "cudaEventRecord"));
  return TransferHandle(std::move(s));
#endif
}

}  // namespace

StatusOr<TransferHandle> gather_blocks(const std::shared_ptr<const KvLayout>& layout, const int64_t* block_ids,
                                       size_t n, const uint64_t* dst_addrs, const TransferOptions& opt) {
  return transfer(layout, block_ids, n, dst_addrs, opt, true);
}

StatusOr<TransferHandle> scatter_blocks(const std::shared_ptr<const KvLayout>& layout, const int64_t* block_ids,
                                        size_t n, const uint64_t* src_addrs, const TransferOptions& opt) {
  return transfer(layout, block_ids, n, src_addrs, opt, false);
}

}  // namespace kvbm
