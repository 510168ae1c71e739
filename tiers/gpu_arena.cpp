#include "tiers/gpu_arena.h"

#include <string>

#include "csrc/build_info.h"

#ifdef KVBM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvbm {

GpuArena::~GpuArena() {
#ifdef KVBM_WITH_CUDA
  if (data_ != 0) cudaFree(reinterpret_cast<void*>(data_));
#endif
}

StatusOr<std::shared_ptr<GpuArena>> GpuArena::create(const GpuArenaSpec& s) {
  if (s.num_layers <= 0 || s.num_blocks <= 0 || s.block_size <= 0)
    return InvalidArgument("GpuArena: num_layers, num_blocks and block_size must be > 0 (got " +
                           std::to_string(s.num_layers) + ", " + std::to_string(s.num_blocks) + ", " +
                           std::to_string(s.block_size) + ")");
  std::vector<int64_t> shape;
  switch (s.kind) {
    case LayoutKind::kVllm:
      shape = {s.num_blocks, s.num_kv_heads, s.block_size, 2 * int64_t{s.head_size}};
      break;
    case LayoutKind::kKvSplit:
      shape = {2, s.num_blocks, s.block_size, s.num_kv_heads, s.head_size};
      break;
    case LayoutKind::kMla:
      shape = {s.num_blocks, s.block_size, s.latent_dim};
      break;
  }
  for (int64_t d : shape)
    if (d <= 0) return InvalidArgument("GpuArena: num_kv_heads/head_size (or latent_dim for mla) must be > 0");
  uint64_t layer_elems = 1;
  for (int64_t d : shape) layer_elems *= static_cast<uint64_t>(d);
  const uint64_t layer_bytes = layer_elems * dtype_size(s.dtype);
#ifndef KVBM_WITH_CUDA
  (void)layer_bytes;
  return CudaUnavailable("GpuArena: this kvbm build has no CUDA support (rebuild with KVBM_CUDA=ON)");
#else
  if (!cuda_available()) return CudaUnavailable("GpuArena: no CUDA GPU is usable on this machine");
  if (s.device < 0 || s.device >= cuda_device_count())
    return InvalidArgument("GpuArena: device " + std::to_string(s.device) + " does not exist (" +
                           std::to_string(cuda_device_count()) + " visible)");
  auto arena = std::shared_ptr<GpuArena>(new GpuArena());
  arena->spec_ = s;
  arena->bytes_ = layer_bytes * static_cast<uint64_t>(s.num_layers);
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(s.device);
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, arena->bytes_);
  cudaSetDevice(prev);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return CudaError("GpuArena: cudaMalloc(" + std::to_string(arena->bytes_) + " bytes) on device " +
                     std::to_string(s.device) + " failed: " + cudaGetErrorString(e));
  }
  arena->data_ = reinterpret_cast<uint64_t>(p);
  const std::vector<int64_t> strides = dense_strides(shape);
  for (int l = 0; l < s.num_layers; ++l) {
    TensorDesc t{arena->data_ + static_cast<uint64_t>(l) * layer_bytes, shape, strides, s.dtype, s.device};
    arena->tensors_.push_back({t});
  }
  StatusOr<std::shared_ptr<const KvLayout>> layout = KvLayout::create(s.kind, arena->tensors_);
  if (!layout.ok()) return layout.status();
  arena->layout_ = layout.value();
  return arena;
#endif
}

}  // namespace kvbm
