// The KV layout descriptor: the ONLY place where stride and offset math lives.
//
// Note [KV layout descriptor]
// An engine hands over its paged KV cache as strided tensors (pointer, shape, strides in
// elements, dtype, device); dimension 0 of each tensor indexes blocks. Whatever the memory
// order, the bytes of block b in one tensor are the bytes of block 0 shifted by
// b * stride[0] * elem_size. So a block reduces, once, to a fixed list of contiguous chunks
// {address of block 0, block stride, length, offset in the host slot}; copying block b is
// "for each chunk: copy `bytes` from addr + b * block_stride to slot + host_offset". Kernels,
// the host memcpy path and copy-engine batches all consume that list and do no other math.
//
// Chunks: the non-block dimensions of a tensor are ordered by stride; the innermost dimensions
// that are dense (stride == extent of what lies inside) merge into one run, the remaining
// outer dimensions are enumerated in memory order. Consecutive chunks that are adjacent in
// memory for every block (same block stride, one ends where the next starts) are merged,
// also across tensors and layers (K and V halves of one allocation, layers that are views of
// one buffer in block-major order).
//
// Host slot format (what one block looks like below the GPU): the concatenation, layer-major
// (layer 0 first), of each layer's tensors in the order given (kv_split: K then V), each
// tensor's block region in the engine's memory order (increasing address). The namespace of
// the content hash binds the layout, so bytes are never transposed. block_bytes() is the sum
// over layers and tensors of the block region's size.
//
// Kinds (what from_tensors checks; the chunk math is the same for all):
//   kVllm    one tensor per layer, 4-D [num_blocks, num_kv_heads, block_size, 2*head_size]
//            in any memory order (vLLM 0.32+ per-layer view; on CPU a (block, head) tile is
//            [2*block_size, head_size], which whole-block copies preserve).
//   kKvSplit two tensors per layer, K and V, each 4-D [num_blocks, block_size, num_kv_heads,
//            head_size] in any memory order; or one 5-D tensor [2, num_blocks, ...] per layer
//            whose index 0 is K and 1 is V.
//   kMla     one tensor per layer, 3-D [num_blocks, block_size, latent_dim].
// Tensors must not overlap themselves (no zero or negative strides on dims of size > 1, no
// aliasing between blocks); all layers share dtype, device and num_blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "csrc/status.h"

namespace kvbm {

enum class DType : int { kBFloat16 = 0, kFloat16, kFloat32, kFloat8E4M3, kFloat8E5M2, kUInt8 };
size_t dtype_size(DType d);
const char* dtype_name(DType d);
// Accepts "bfloat16", "float16"/"half", "float32"/"float", "float8_e4m3fn", "float8_e5m2",
// "uint8", also with a "torch." prefix.
StatusOr<DType> parse_dtype(const std::string& name);

enum class LayoutKind : int { kVllm = 0, kKvSplit, kMla };
const char* layout_kind_name(LayoutKind k);
StatusOr<LayoutKind> parse_layout_kind(const std::string& name);  // "vllm", "kv_split", "mla"

inline constexpr int kHostDevice = -1;

// Strides (in elements) of a dense row-major tensor of this shape.
std::vector<int64_t> dense_strides(const std::vector<int64_t>& shape);

// One strided tensor as an engine hands it over. Dimension 0 indexes blocks.
struct TensorDesc {
  uint64_t data = 0;              // address of element [0, 0, ...]
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;   // in elements, like torch.Tensor.stride()
  DType dtype = DType::kBFloat16;
  int device = kHostDevice;       // CUDA ordinal, or kHostDevice for host memory
};

// One contiguous run of every block: block b's bytes are at addr + b * block_stride on the
// engine side and at host_offset inside the block's host slot.
struct KvChunk {
  uint64_t addr = 0;
  int64_t block_stride = 0;
  uint64_t bytes = 0;
  uint64_t host_offset = 0;
  int32_t layer = 0;  // the layer the chunk starts in
};

// A half-open range of layers [begin, end) of a layout; end < 0 means "to the last layer".
// Copying a layer range moves only those layers' bytes of each block, to/from the same place
// inside the host slot as a whole-block copy (the slot is layer-major, so a range of layers is
// one contiguous span of the slot). Used for layer-wise loads and saves (a layer's copy can run
// as soon as that layer's KV is needed or written).
struct LayerRange {
  int begin = 0;
  int end = -1;
};

class KvLayout {
 public:
  // layers[l] holds layer l's tensors (see the kinds above). Errors: InvalidArgument naming the
  // layer, tensor and the shape/stride/dtype/device that is wrong.
  static StatusOr<std::shared_ptr<const KvLayout>> create(LayoutKind kind,
                                                          std::vector<std::vector<TensorDesc>> layers);

  LayoutKind kind() const { return kind_; }
  DType dtype() const { return dtype_; }
  int device() const { return device_; }
  bool on_host() const { return device_ == kHostDevice; }
  int64_t num_blocks() const { return num_blocks_; }
  int num_layers() const { return static_cast<int>(layer_offsets_.size()); }
  // Bytes of one block across all layers: the size of one host slot.
  uint64_t block_bytes() const { return block_bytes_; }
  // Where layer l starts inside a host slot and how many bytes it has.
  uint64_t layer_offset(int l) const { return layer_offsets_[l]; }
  uint64_t layer_bytes(int l) const { return layer_bytes_[l]; }
  // The coalesced chunks of one block, in host-slot order.
  const std::vector<KvChunk>& chunks() const { return chunks_; }
  // The same chunks cut into pieces of at most max_bytes (a multiple of 16, > 0), for spreading
  // work; host offsets and addresses stay consistent with chunks().
  std::vector<KvChunk> pieces(uint64_t max_bytes) const;
  // `layers` with end < 0 replaced by num_layers(); InvalidArgument naming `layers` unless
  // 0 <= begin < end <= num_layers().
  StatusOr<LayerRange> resolve(LayerRange layers) const;
  // For a resolved range: where its span starts inside a host slot, and how long it is.
  uint64_t range_offset(LayerRange r) const { return layer_offsets_[r.begin]; }
  uint64_t range_bytes(LayerRange r) const {
    return layer_offsets_[r.end - 1] + layer_bytes_[r.end - 1] - layer_offsets_[r.begin];
  }
  // The chunks of a resolved range, cut at its layer boundaries (chunks coalesced across layers
  // are split), with host_offset RELATIVE to range_offset(r); cut further into pieces of at most
  // max_bytes when max_bytes > 0 (as pieces()). For the full range this equals chunks()/pieces().
  std::vector<KvChunk> range_chunks(LayerRange r, uint64_t max_bytes = 0) const;
  // OutOfRange naming the first id outside [0, num_blocks).
  Status check_block_ids(const int64_t* ids, size_t n) const;
  std::string describe() const;

 private:
  KvLayout() = default;
  LayoutKind kind_ = LayoutKind::kVllm;
  DType dtype_ = DType::kBFloat16;
  int device_ = kHostDevice;
  int64_t num_blocks_ = 0;
  uint64_t block_bytes_ = 0;
  std::vector<uint64_t> layer_offsets_, layer_bytes_;
  std::vector<KvChunk> chunks_;
};

// The host data path (layout on host memory): memcpy per chunk. block_ids[i] goes to/from the
// slot at host_addrs[i] (block_bytes() long). Ids and `layers` are checked first; nothing is
// copied on error. With a layer range only those layers' bytes move (at their slot offsets).
Status host_gather(const KvLayout& layout, const int64_t* block_ids, size_t n, const uint64_t* dst_addrs,
                   LayerRange layers = {});
Status host_scatter(const KvLayout& layout, const int64_t* block_ids, size_t n, const uint64_t* src_addrs,
                    LayerRange layers = {});

}  // namespace kvbm
