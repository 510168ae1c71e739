// A GPU block arena for standalone use (users without an engine, benchmarks): one device
// allocation holding every layer's KV blocks, described by a KvLayout so that it uses the same
// gather/scatter as engine-registered buffers.
//
// Memory (layer-major, dense): kVllm   layer l = [num_blocks, num_kv_heads, block_size, 2*head_size]
//                              kKvSplit layer l = [2, num_blocks, block_size, num_kv_heads, head_size]
//                              kMla    layer l = [num_blocks, block_size, latent_dim]
// The memory is not initialised.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "csrc/kv_layout.h"
#include "csrc/status.h"

namespace kvbm {

struct GpuArenaSpec {
  int device = 0;
  LayoutKind kind = LayoutKind::kKvSplit;
  DType dtype = DType::kBFloat16;
  int num_layers = 1;
  int64_t num_blocks = 1;
  int block_size = 16;
  int num_kv_heads = 1;  // kVllm, kKvSplit
  int head_size = 128;   // kVllm, kKvSplit
  int latent_dim = 0;    // kMla
};

class GpuArena {
 public:
  // Errors: InvalidArgument (non-positive sizes), CudaUnavailable (no CUDA build or GPU),
  // Cuda (allocation failure).
  static StatusOr<std::shared_ptr<GpuArena>> create(const GpuArenaSpec& spec);
  ~GpuArena();
  GpuArena(const GpuArena&) = delete;
  GpuArena& operator=(const GpuArena&) = delete;

  uint64_t data() const { return data_; }
  uint64_t bytes() const { return bytes_; }
  const GpuArenaSpec& spec() const { return spec_; }
  // The layout over this arena; it does not keep the arena alive.
  const std::shared_ptr<const KvLayout>& layout() const { return layout_; }
  // Layer l's tensor(s) as described to the layout (for viewing the arena from a framework).
  const std::vector<TensorDesc>& layer_tensors(int l) const { return tensors_[static_cast<size_t>(l)]; }

 private:
  GpuArena() = default;
  GpuArenaSpec spec_;
  uint64_t data_ = 0;
  uint64_t bytes_ = 0;
  std::shared_ptr<const KvLayout> layout_;
  std::vector<std::vector<TensorDesc>> tensors_;
};

}  // namespace kvbm
