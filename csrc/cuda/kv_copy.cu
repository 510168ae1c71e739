// The KV block gather/scatter kernel.
//
// Note [mapped-memory copy kernel]
// A block is a few dozen chunks of 2-64 KiB scattered over the engine's KV tensors; its host
// slot is contiguous pinned memory mapped into the device's address space. One copy-engine
// call per chunk costs a few microseconds of submission each, so instead one kernel moves all
// (block, piece) work items: each CTA takes items in a grid-stride loop and its threads copy
// the piece with 16-byte loads and stores, four in flight per thread, straight across PCIe
// (stores to mapped host memory are posted writes; loads need many in flight to hide the bus
// latency, hence the unrolling and the grid of several CTAs per SM). Pieces whose addresses are
// not 16-byte aligned fall back to 8-, 4- or 1-byte accesses (copy_range in copy_vec.cuh).
#include <cstdint>

#include "csrc/cuda/copy_vec.cuh"
#include "csrc/cuda/kv_copy.cuh"

namespace kvbm::cuda {

namespace {

__global__ void __launch_bounds__(kThreadsPerCta) kv_copy_kernel(const __grid_constant__ LaunchArgs args) {
  const uint64_t total = static_cast<uint64_t>(args.n) * args.num_pieces;
  for (uint64_t item = blockIdx.x; item < total; item += gridDim.x) {
    const uint32_t i = static_cast<uint32_t>(item / args.num_pieces);
    const uint32_t p = static_cast<uint32_t>(item % args.num_pieces);
    const DevPiece pc = args.pieces[p];
    uint8_t* eng = reinterpret_cast<uint8_t*>(pc.addr + static_cast<uint64_t>(args.block_ids[i] * pc.block_stride));
    uint8_t* host = reinterpret_cast<uint8_t*>(args.host[i] + pc.host_offset);
    if (args.to_host)
      copy_range(host, eng, pc.bytes);
    else
      copy_range(eng, host, pc.bytes);
  }
}

}  // namespace

cudaError_t launch_kv_copy(const LaunchArgs& args, int grid, cudaStream_t stream) {
  kv_copy_kernel<<<grid, kThreadsPerCta, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace kvbm::cuda
