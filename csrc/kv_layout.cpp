#include "csrc/kv_layout.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "csrc/host_copy.h"

namespace kvbm {

namespace {

constexpr size_t kMaxChunksPerBlock = size_t{1} << 20;

// No iostreams in the core: an extension built against one libstdc++ but loaded next to an
// older one (torch's environment) crashed inside std::ostream's locale code on the GPU machine.
std::string shape_str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::string where(size_t layer, size_t t) {
  return "layer " + std::to_string(layer) + " tensor " + std::to_string(t);
}

// Appends the chunks of one tensor's block region (block dim 0) in memory order.
Status tensor_chunks(const TensorDesc& t, const std::string& at, int32_t layer, uint64_t* host_offset,
                     std::vector<KvChunk>* out) {
  const int64_t elem = static_cast<int64_t>(dtype_size(t.dtype));
  struct Dim {
    int64_t size, stride;  // stride in bytes
  };
  // All dims of size > 1 (the block dim included) must be non-aliasing: ordered by stride, each
  // stride is at least the extent of everything inside it.
  std::vector<Dim> all;
  for (size_t d = 0; d < t.shape.size(); ++d) {
    if (t.shape[d] <= 0)
      return InvalidArgument(at + ": shape " + shape_str(t.shape) + " has a non-positive dimension");
    if (t.shape[d] == 1) continue;
    if (t.strides[d] <= 0)
      return InvalidArgument(at + ": stride " + std::to_string(t.strides[d]) + " of dim " + std::to_string(d) +
                             " (size " + std::to_string(t.shape[d]) +
                             ") must be positive; broadcast or reversed views are not supported");
    all.push_back({t.shape[d], t.strides[d] * elem});
  }
  std::sort(all.begin(), all.end(), [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  int64_t extent = elem;
  for (const Dim& d : all) {
    if (d.stride < extent)
      return InvalidArgument(at + ": strides " + shape_str(t.strides) + " for shape " + shape_str(t.shape) +
                             " make elements overlap (a view with aliasing strides)");
    extent = (d.size - 1) * d.stride + extent;
  }
  // The block region: non-block dims. Merge the dense inner ones into a run.
  std::vector<Dim> inner;
  for (size_t d = 1; d < t.shape.size(); ++d)
    if (t.shape[d] > 1) inner.push_back({t.shape[d], t.strides[d] * elem});
  std::sort(inner.begin(), inner.end(), [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  int64_t run = elem;
  size_t k = 0;
  while (k < inner.size() && inner[k].stride == run) run *= inner[k++].size;
  std::vector<Dim> outer(inner.begin() + static_cast<std::ptrdiff_t>(k), inner.end());
  std::reverse(outer.begin(), outer.end());  // outermost first: enumerate in memory order
  size_t count = 1;
  for (const Dim& d : outer) {
    count *= static_cast<size_t>(d.size);
    if (count > kMaxChunksPerBlock)
      return InvalidArgument(at + ": strides " + shape_str(t.strides) + " split one block into more than " +
                             std::to_string(kMaxChunksPerBlock) + " pieces");
  }
  const int64_t block_stride = t.shape[0] > 1 ? t.strides[0] * elem : 0;
  std::vector<int64_t> idx(outer.size(), 0);
  for (size_t c = 0; c < count; ++c) {
    int64_t off = 0;
    for (size_t j = 0; j < outer.size(); ++j) off += idx[j] * outer[j].stride;
    out->push_back({t.data + static_cast<uint64_t>(off), block_stride, static_cast<uint64_t>(run), *host_offset,
                    layer});
    *host_offset += static_cast<uint64_t>(run);
    for (size_t j = outer.size(); j-- > 0;) {  // odometer, innermost outer dim fastest
      if (++idx[j] < outer[j].size) break;
      idx[j] = 0;
    }
  }
  return Status::Ok();
}

}  // namespace

std::vector<int64_t> dense_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> s(shape.size(), 1);
  for (size_t i = shape.size(); i-- > 1;) s[i - 1] = s[i] * shape[i];
  return s;
}

size_t dtype_size(DType d) {
  switch (d) {
    case DType::kBFloat16:
    case DType::kFloat16: return 2;
    case DType::kFloat32: return 4;
    case DType::kFloat8E4M3:
    case DType::kFloat8E5M2:
    case DType::kUInt8: return 1;
  }
  return 0;
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat32: return "float32";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
    case DType::kFloat8E5M2: return "float8_e5m2";
    case DType::kUInt8: return "uint8";
  }
  return "?";
}

StatusOr<DType> parse_dtype(const std::string& name) {
  std::string n = name.rfind("torch.", 0) == 0 ? name.substr(6) : name;
  if (n == "bfloat16") return DType::kBFloat16;
  if (n == "float16" || n == "half") return DType::kFloat16;
  if (n == "float32" || n == "float") return DType::kFloat32;
  if (n == "float8_e4m3fn" || n == "float8_e4m3" || n == "fp8_e4m3") return DType::kFloat8E4M3;
  if (n == "float8_e5m2" || n == "fp8_e5m2") return DType::kFloat8E5M2;
  if (n == "uint8") return DType::kUInt8;
  return InvalidArgument("dtype '" + name +
                         "' is not supported (bfloat16, float16, float32, float8_e4m3fn, float8_e5m2, uint8)");
}

const char* layout_kind_name(LayoutKind k) {
  switch (k) {
    case LayoutKind::kVllm: return "vllm";
    case LayoutKind::kKvSplit: return "kv_split";
    case LayoutKind::kMla: return "mla";
  }
  return "?";
}

StatusOr<LayoutKind> parse_layout_kind(const std::string& name) {
  if (name == "vllm") return LayoutKind::kVllm;
  if (name == "kv_split") return LayoutKind::kKvSplit;
  if (name == "mla") return LayoutKind::kMla;
  return InvalidArgument("layout kind '" + name + "' is not one of vllm, kv_split, mla");
}

StatusOr<std::shared_ptr<const KvLayout>> KvLayout::create(LayoutKind kind,
                                                           std::vector<std::vector<TensorDesc>> layers) {
  if (layers.empty()) return InvalidArgument("KvLayout: no layers given");
  // kv_split given as one 5-D [2, num_blocks, ...] tensor per layer: split into K and V views.
  if (kind == LayoutKind::kKvSplit) {
    for (size_t l = 0; l < layers.size(); ++l) {
      auto& ts = layers[l];
      if (ts.size() == 1 && ts[0].shape.size() == 5 && ts[0].strides.size() == 5) {
        const TensorDesc& t = ts[0];
        if (t.shape[0] != 2)
          return InvalidArgument(where(l, 0) + ": a 5-D kv_split tensor must have shape [2, num_blocks, ...], got " +
                                 shape_str(t.shape));
        TensorDesc k = t, v = t;
        k.shape.erase(k.shape.begin());
        k.strides.erase(k.strides.begin());
        v.shape = k.shape;
        v.strides = k.strides;
        v.data = t.data + static_cast<uint64_t>(t.strides[0]) * dtype_size(t.dtype);
        if (t.strides[0] <= 0) return InvalidArgument(where(l, 0) + ": the K/V dim must have a positive stride");
        ts = {k, v};
      }
    }
  }
  const size_t want_tensors = kind == LayoutKind::kKvSplit ? 2 : 1;
  const size_t want_dims = kind == LayoutKind::kMla ? 3 : 4;
  auto layout = std::shared_ptr<KvLayout>(new KvLayout());
  layout->kind_ = kind;
  const TensorDesc& first = layers[0].empty() ? TensorDesc{} : layers[0][0];
  layout->dtype_ = first.dtype;
  layout->device_ = first.device;
  layout->num_blocks_ = first.shape.empty() ? 0 : first.shape[0];
  uint64_t host_offset = 0;
  std::vector<KvChunk> raw;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& ts = layers[l];
    if (ts.size() != want_tensors)
      return InvalidArgument("layer " + std::to_string(l) + ": a " + layout_kind_name(kind) + " layout takes " +
                             std::to_string(want_tensors) + " tensor(s) per layer, got " +
                             std::to_string(ts.size()));
    const uint64_t layer_start = host_offset;
    for (size_t i = 0; i < ts.size(); ++i) {
      const TensorDesc& t = ts[i];
      const std::string at = where(l, i);
      if (t.shape.size() != want_dims || t.strides.size() != want_dims)
        return InvalidArgument(at + ": a " + std::string(layout_kind_name(kind)) + " tensor must be " +
                               std::to_string(want_dims) + "-D, got shape " + shape_str(t.shape) + " strides " +
                               shape_str(t.strides));
      if (t.data == 0) return InvalidArgument(at + ": null data pointer");
      if (t.dtype != layout->dtype_)
        return InvalidArgument(at + ": dtype " + dtype_name(t.dtype) + " differs from layer 0's " +
                               dtype_name(layout->dtype_));
      if (t.device != layout->device_)
        return InvalidArgument(at + ": device " + std::to_string(t.device) + " differs from layer 0's " +
                               std::to_string(layout->device_) + " (-1 = host)");
      if (t.shape[0] != layout->num_blocks_)
        return InvalidArgument(at + ": num_blocks " + std::to_string(t.shape[0]) + " differs from layer 0's " +
                               std::to_string(layout->num_blocks_));
      if (kind == LayoutKind::kVllm && t.shape[3] % 2 != 0)
        return InvalidArgument(at + ": a vllm tensor's last dim is 2*head_size and must be even, got shape " +
                               shape_str(t.shape));
      if (kind == LayoutKind::kKvSplit && i == 1 && t.shape != ts[0].shape)
        return InvalidArgument(at + ": V shape " + shape_str(t.shape) + " differs from K shape " +
                               shape_str(ts[0].shape));
      KVBM_RETURN_IF_ERROR(tensor_chunks(t, at, static_cast<int32_t>(l), &host_offset, &raw));
    }
    layout->layer_offsets_.push_back(layer_start);
    layout->layer_bytes_.push_back(host_offset - layer_start);
  }
  layout->block_bytes_ = host_offset;
  // Coalesce chunks adjacent in memory for every block.
  for (const KvChunk& c : raw) {
    if (!layout->chunks_.empty()) {
      KvChunk& p = layout->chunks_.back();
      if (p.block_stride == c.block_stride && p.addr + p.bytes == c.addr) {
        p.bytes += c.bytes;
        continue;
      }
    }
    layout->chunks_.push_back(c);
  }
  return std::shared_ptr<const KvLayout>(std::move(layout));
}

std::vector<KvChunk> KvLayout::pieces(uint64_t max_bytes) const {
  return range_chunks(LayerRange{0, num_layers()}, std::max<uint64_t>(16, max_bytes));
}

StatusOr<LayerRange> KvLayout::resolve(LayerRange layers) const {
  LayerRange r = layers;
  if (r.end < 0) r.end = num_layers();
  if (r.begin < 0 || r.begin >= r.end || r.end > num_layers())
    return InvalidArgument("layers: [" + std::to_string(layers.begin) + ", " + std::to_string(layers.end) +
                           ") is not a non-empty range of layers within [0, " + std::to_string(num_layers()) +
                           ")");
  return r;
}

std::vector<KvChunk> KvLayout::range_chunks(LayerRange r, uint64_t max_bytes) const {
  std::vector<KvChunk> out;
  const uint64_t lo = range_offset(r), hi = lo + range_bytes(r);
  if (max_bytes > 0) max_bytes = std::max<uint64_t>(16, max_bytes / 16 * 16);
  for (const KvChunk& c : chunks_) {
    const uint64_t a = std::max(c.host_offset, lo), b = std::min(c.host_offset + c.bytes, hi);
    if (a >= b) continue;
    KvChunk cut = c;  // the part of c inside [lo, hi): same engine/host correspondence, shifted
    cut.addr += a - c.host_offset;
    cut.host_offset = a - lo;
    cut.bytes = b - a;
    cut.layer = static_cast<int32_t>(
        std::upper_bound(layer_offsets_.begin(), layer_offsets_.end(), a) - layer_offsets_.begin() - 1);
    const uint64_t step = max_bytes > 0 ? max_bytes : cut.bytes;
    for (uint64_t off = 0; off < cut.bytes; off += step) {
      KvChunk p = cut;
      p.addr += off;
      p.host_offset += off;
      p.bytes = std::min(step, cut.bytes - off);
      out.push_back(p);
    }
  }
  return out;
}

Status KvLayout::check_block_ids(const int64_t* ids, size_t n) const {
  for (size_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= num_blocks_)
      return OutOfRange("block_ids[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                        " is outside [0, " + std::to_string(num_blocks_) + ")");
  return Status::Ok();
}

std::string KvLayout::describe() const {
  return std::string("KvLayout(kind=") + layout_kind_name(kind_) + ", dtype=" + dtype_name(dtype_) +
         ", device=" + std::to_string(device_) + ", layers=" + std::to_string(num_layers()) +
         ", num_blocks=" + std::to_string(num_blocks_) + ", block_bytes=" + std::to_string(block_bytes_) +
         ", chunks_per_block=" + std::to_string(chunks_.size()) + ")";
}

namespace {
Status host_copy(const KvLayout& layout, const int64_t* ids, size_t n, const uint64_t* addrs, LayerRange layers,
                 bool to_host, const char* what) {
  if (!layout.on_host())
    return InvalidArgument(std::string(what) + ": the layout is on CUDA device " + std::to_string(layout.device()) +
                           ", not host memory");
  StatusOr<LayerRange> r = layout.resolve(layers);
  if (!r.ok()) return r.status();
  KVBM_RETURN_IF_ERROR(layout.check_block_ids(ids, n));
  for (size_t i = 0; i < n; ++i)
    if (addrs[i] == 0) return InvalidArgument(std::string(what) + ": host address [" + std::to_string(i) + "] is null");
  const bool whole = r.value().begin == 0 && r.value().end == layout.num_layers();
  const std::vector<KvChunk> sub = whole ? std::vector<KvChunk>() : layout.range_chunks(r.value());
  const std::vector<KvChunk>& chunks = whole ? layout.chunks() : sub;
  const uint64_t base = layout.range_offset(r.value());
  for (size_t i = 0; i < n; ++i) {
    auto* slot = reinterpret_cast<uint8_t*>(addrs[i] + base);
    for (const KvChunk& c : chunks) {
      auto* eng = reinterpret_cast<uint8_t*>(c.addr + static_cast<uint64_t>(ids[i] * c.block_stride));
      if (to_host)
        copy_bytes(slot + c.host_offset, eng, c.bytes);  // Note [Host copies]
      else
        copy_bytes(eng, slot + c.host_offset, c.bytes);
    }
  }
  return Status::Ok();
}
}  // namespace

Status host_gather(const KvLayout& layout, const int64_t* block_ids, size_t n, const uint64_t* dst_addrs,
                   LayerRange layers) {
  return host_copy(layout, block_ids, n, dst_addrs, layers, true, "gather");
}

Status host_scatter(const KvLayout& layout, const int64_t* block_ids, size_t n, const uint64_t* src_addrs,
                    LayerRange layers) {
  return host_copy(layout, block_ids, n, src_addrs, layers, false, "scatter");
}

}  // namespace kvbm
