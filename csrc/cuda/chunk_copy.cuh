// Launch interface of the chunk-copy kernel (csrc/cuda/chunk_copy.cu): a batch of independent
// device-to-device copies given as (source, destination) address pairs, as the transfer engine's
// CUDA IPC path issues them (transfer/cuda_ipc.h). Addresses are plain device virtual addresses
// (local memory, or a peer's allocation mapped with cudaIpcOpenMemHandle); the kernel does no
// address math beyond "pair + offset inside the chunk".
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace kvbm::cuda {

inline constexpr int kChunkThreadsPerCta = 256;

struct ChunkCopyArgs {
  const uint64_t* pairs = nullptr;    // device memory: 2 * n entries, src0, dst0, src1, dst1, ...
  const uint64_t* lengths = nullptr;  // device memory: n per-chunk lengths, or nullptr: `length` each
  uint64_t length = 0;                // the one length when `lengths` is null
  uint64_t n = 0;                     // chunks
  uint64_t piece = 0;                 // with one length: work-item size (a multiple of 16); else 0
};

// Work split and grid size for a batch. With one length every chunk is cut into pieces so that
// a small batch still spreads over many SMs (a single 64 KiB chunk becomes 16 work items); with
// per-chunk lengths one CTA copies one chunk. The grid is at most kCtasPerSm CTAs per SM and the
// kernel loops over the items (grid-stride), so 1 chunk and 100,000 chunks both work.
struct ChunkCopyPlan {
  uint64_t piece = 0;
  uint64_t items = 0;
  int grid = 0;
};

inline ChunkCopyPlan plan_chunk_copy(uint64_t n, uint64_t length, bool uniform, uint64_t total_bytes, int sm_count) {
  constexpr int kCtasPerSm = 8;            // 8 x 256 threads: an SM's full occupancy
  constexpr uint64_t kMinPiece = 4096;     // below this a CTA spends more time scheduling than copying
  constexpr uint64_t kMaxPiece = 64 << 10;
  const uint64_t ctas = static_cast<uint64_t>(std::max(1, sm_count)) * kCtasPerSm;
  ChunkCopyPlan p;
  if (uniform && length > 0) {
    uint64_t want = total_bytes / ctas;  // about one piece per CTA
    uint64_t piece = kMinPiece;
    while (piece < want && piece < kMaxPiece) piece *= 2;
    p.piece = std::min(piece, (length + 15) / 16 * 16);
    p.items = n * ((length + p.piece - 1) / p.piece);
  } else {
    p.items = n;
  }
  p.grid = static_cast<int>(std::max<uint64_t>(1, std::min(p.items, ctas)));
  return p;
}

// Queues the kernel on `stream` (the pair and length tables must be in device memory by the
// time it runs, i.e. copied earlier on the same stream). Returns the launch's error.
cudaError_t launch_chunk_copy(const ChunkCopyArgs& args, int grid, cudaStream_t stream);

}  // namespace kvbm::cuda
