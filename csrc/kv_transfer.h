// Offload (gather) and onboard (scatter) of whole KV blocks between an engine's paged KV
// tensors and host slots, driven by a KvLayout.
//
// Host slots are given as one address per block (block_bytes() long each): the host tier's
// pinned slots, or rows of a caller buffer. For a host layout the copy is done at once with
// memcpy (the returned handle is already complete). For a CUDA layout work is queued on a
// stream and the handle completes when it has run:
//   kKernel      one kernel moving 16-byte vectors between device memory and mapped pinned host
//                memory (needs every host address to be pinned/registered or device memory);
//   kCopyEngine  one cudaMemcpyBatchAsync of all chunks (copy engines; leaves SMs free; works
//                with pageable memory too);
//   kStaged      a kernel packs the blocks into contiguous device staging memory (or unpacks
//                them from it) and copy engines move whole slots across PCIe, pipelined in
//                sub-batches over two staging buffers; SMs are busy only for the short
//                device-to-device pack/unpack (see Note [staged copies]);
//   kNaive       one cudaMemcpyAsync per chunk (a baseline for benchmarks);
//   kAuto        kStaged; see Note [choosing a copy method] in kv_transfer.cpp.
// With opt.layers, only that range of layers moves, to/from its place inside each slot.
// Errors: OutOfRange (block id), InvalidArgument (null address, a method the memory cannot
// use, a bad layer range), CudaUnavailable (CUDA layout on a build or machine without CUDA), Cuda (runtime errors,
// reported by the call or later by the handle).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "csrc/kv_layout.h"
#include "csrc/status.h"

namespace kvbm {

enum class CopyMethod : int { kAuto = 0, kKernel, kCopyEngine, kNaive, kStaged };
StatusOr<CopyMethod> parse_copy_method(const std::string& name);  // auto, kernel, copy_engine, naive, staged

struct TransferOptions {
  bool own_stream = true;   // true: kvbm's own per-device stream for this direction
  uint64_t stream = 0;      // a cudaStream_t as an integer, used when own_stream is false
  CopyMethod method = CopyMethod::kAuto;
  int max_ctas = 0;         // kernel grid size cap; 0 = default (a multiple of the SM count)
  uint64_t piece_bytes = 0; // kernel work unit; 0 = default (32 KiB)
  uint64_t stage_bytes = 0; // kStaged: bytes per staging buffer (two are used); 0 = default (32 MiB)
  LayerRange layers;        // only these layers of each block (default: all); see LayerRange
};

// Completion of one queued batch. Copyable; all copies share one state. Thread-safe.
class TransferHandle {
 public:
  struct State;
  TransferHandle();
  explicit TransferHandle(std::shared_ptr<State> s) : s_(std::move(s)) {}

  // true when finished successfully, false while running; the transfer's error once it failed.
  StatusOr<bool> poll() const;
  // Waits up to timeout_s seconds (< 0: forever). true when finished, false on timeout;
  // the transfer's error once it failed.
  StatusOr<bool> wait(double timeout_s) const;
  // OK while running or after success; the failure otherwise (does not wait).
  Status error() const;
  uint64_t bytes() const;
  size_t num_blocks() const;

 private:
  std::shared_ptr<State> s_;
};

StatusOr<TransferHandle> gather_blocks(const std::shared_ptr<const KvLayout>& layout, const int64_t* block_ids,
                                       size_t n, const uint64_t* dst_addrs, const TransferOptions& opt);
StatusOr<TransferHandle> scatter_blocks(const std::shared_ptr<const KvLayout>& layout, const int64_t* block_ids,
                                        size_t n, const uint64_t* src_addrs, const TransferOptions& opt);

}  // namespace kvbm
