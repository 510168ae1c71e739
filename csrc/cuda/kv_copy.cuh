// Launch interface of the KV gather/scatter kernel (csrc/cuda/kv_copy.cu). The kernel gets
// pointer and chunk tables prepared by csrc/kv_transfer.cpp from the KvLayout; it does no
// stride math of its own beyond "addr + block_id * block_stride".
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvbm::cuda {

// One piece of a block's chunk table, as the kernel reads it (device memory).
struct DevPiece {
  uint64_t addr;         // engine address for block 0
  int64_t block_stride;  // bytes
  uint64_t bytes;
  uint64_t host_offset;
};

// Blocks per launch: ids and host addresses travel as kernel parameters (16 bytes a block;
// kernel parameters may be up to 32 KiB on Volta and later with CUDA 12.1+).
inline constexpr int kMaxBatchPerLaunch = 1024;

struct LaunchArgs {
  const DevPiece* pieces;
  uint32_t num_pieces;
  uint32_t n;        // blocks in this launch
  int32_t to_host;   // 1: engine -> host slot (gather); 0: host slot -> engine (scatter)
  int32_t pad;
  int64_t block_ids[kMaxBatchPerLaunch];
  uint64_t host[kMaxBatchPerLaunch];
};

inline constexpr int kThreadsPerCta = 256;

cudaError_t launch_kv_copy(const LaunchArgs& args, int grid, cudaStream_t stream);

}  // namespace kvbm::cuda
