// The chunk-copy kernel: many independent device-to-device copies in one launch.
//
// Note [chunk copy kernel]
// A P/D KV handoff is thousands of (layer, block) chunks of a few to a few hundred KiB from
// random block ids to random block ids. A copy-engine call (or a UCX cuda_ipc operation) per
// chunk costs microseconds of submission each, and gather -> contiguous copy -> scatter passes
// over HBM three times; this kernel reads each byte once and writes it once. Work items are
// (chunk, piece) with one length for all chunks (item i is piece i % per_chunk of chunk
// i / per_chunk), or whole chunks with per-chunk lengths; each CTA takes items in a grid-stride
// loop and copies the item with copy_range (16-byte vectors when both addresses are 16-byte
// aligned, narrower ones otherwise, bytes for the tail). Destinations may be another process's
// memory mapped over CUDA IPC, on this GPU or a peer GPU (stores then cross NVLink/PCIe).
#include <cstdint>

#include "csrc/cuda/chunk_copy.cuh"
#include "csrc/cuda/copy_vec.cuh"

namespace kvbm::cuda {

namespace {

__global__ void __launch_bounds__(kChunkThreadsPerCta) chunk_copy_kernel(const __grid_constant__ ChunkCopyArgs a) {
  if (a.lengths == nullptr) {
    const uint64_t per_chunk = (a.length + a.piece - 1) / a.piece;
    const uint64_t items = a.n * per_chunk;
    for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
      const uint64_t c = item / per_chunk;
      const uint64_t off = (item - c * per_chunk) * a.piece;
      const uint64_t len = a.length - off < a.piece ? a.length - off : a.piece;
      const uint8_t* src = reinterpret_cast<const uint8_t*>(a.pairs[2 * c]) + off;
      uint8_t* dst = reinterpret_cast<uint8_t*>(a.pairs[2 * c + 1]) + off;
      copy_range(dst, src, len);
    }
  } else {
    for (uint64_t c = blockIdx.x; c < a.n; c += gridDim.x) {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(a.pairs[2 * c]);
      uint8_t* dst = reinterpret_cast<uint8_t*>(a.pairs[2 * c + 1]);
      copy_range(dst, src, a.lengths[c]);
    }
  }
}

}  // namespace

cudaError_t launch_chunk_copy(const ChunkCopyArgs& args, int grid, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  if (args.lengths == nullptr && (args.piece == 0 || args.piece % 16 != 0)) return cudaErrorInvalidValue;
  chunk_copy_kernel<<<grid, kChunkThreadsPerCta, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace kvbm::cuda
