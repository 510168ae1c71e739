// KvLayout, gather/scatter and TransferHandle. No logic: conversions and calls only.
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/common.h"
#include "csrc/kv_layout.h"
#include "csrc/kv_transfer.h"

namespace {
namespace py = pybind11;
using kvbm::bind::check;

// (data_ptr, shape, strides, dtype name, device) as kvbm/kv_layout.py hands it over.
using TensorTuple = std::tuple<uint64_t, std::vector<int64_t>, std::vector<int64_t>, std::string, int>;

std::shared_ptr<const kvbm::KvLayout> create_layout(const std::string& kind,
                                                    const std::vector<std::vector<TensorTuple>>& layers) {
  kvbm::LayoutKind k = check(kvbm::parse_layout_kind(kind));
  std::vector<std::vector<kvbm::TensorDesc>> descs;
  for (const auto& layer : layers) {
    std::vector<kvbm::TensorDesc> ts;
    for (const auto& [data, shape, strides, dtype, device] : layer)
      ts.push_back({data, shape, strides, check(kvbm::parse_dtype(dtype)), device});
    descs.push_back(std::move(ts));
  }
  return check(kvbm::KvLayout::create(k, std::move(descs)));
}

using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using AddrArray = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

kvbm::TransferHandle transfer(bool to_host, const std::shared_ptr<const kvbm::KvLayout>& layout, IdArray ids,
                              AddrArray addrs, std::optional<uint64_t> stream, const std::string& method,
                              int max_ctas, uint64_t piece_bytes, uint64_t stage_bytes, int layer_begin,
                              int layer_end) {
  if (ids.ndim() != 1 || addrs.ndim() != 1)
    kvbm::bind::fail(kvbm::Code::kInvalidArgument, "block_ids and addresses must be 1-D");
  if (ids.size() != addrs.size())
    kvbm::bind::fail(kvbm::Code::kInvalidArgument, "got " + std::to_string(ids.size()) + " block ids but " +
                                                       std::to_string(addrs.size()) + " host slot addresses");
  kvbm::TransferOptions opt;
  opt.own_stream = !stream.has_value();
  opt.stream = stream.value_or(0);
  opt.method = check(kvbm::parse_copy_method(method));
  opt.max_ctas = max_ctas;
  opt.piece_bytes = piece_bytes;
  opt.stage_bytes = stage_bytes;
  opt.layers = kvbm::LayerRange{layer_begin, layer_end};
  const int64_t* id_ptr = ids.data();
  const uint64_t* addr_ptr = addrs.data();
  const size_t n = static_cast<size_t>(ids.size());
  py::gil_scoped_release release;
  return check(to_host ? kvbm::gather_blocks(layout, id_ptr, n, addr_ptr, opt)
                       : kvbm::scatter_blocks(layout, id_ptr, n, addr_ptr, opt));
}

}  // namespace

KVBM_BINDINGS(kv_layout, 20) {
  using kvbm::KvLayout;
  using kvbm::TransferHandle;
  py::class_<KvLayout, std::shared_ptr<KvLayout>>(m, "KvLayout", "Native KV layout descriptor (see kvbm.kv_layout).")
      .def_static(
          "create",
          [](const std::string& kind, const std::vector<std::vector<TensorTuple>>& layers) {
            return std::const_pointer_cast<KvLayout>(create_layout(kind, layers));
          },
          py::arg("kind"), py::arg("layers"))
      .def_property_readonly("kind", [](const KvLayout& l) { return kvbm::layout_kind_name(l.kind()); })
      .def_property_readonly("dtype", [](const KvLayout& l) { return kvbm::dtype_name(l.dtype()); })
      .def_property_readonly("device", &KvLayout::device)
      .def_property_readonly("num_blocks", &KvLayout::num_blocks)
      .def_property_readonly("num_layers", &KvLayout::num_layers)
      .def_property_readonly("block_bytes", &KvLayout::block_bytes)
      .def_property_readonly("layer_offsets",
                             [](const KvLayout& l) {
                               std::vector<uint64_t> v;
                               for (int i = 0; i < l.num_layers(); ++i) v.push_back(l.layer_offset(i));
                               return v;
                             })
      .def_property_readonly("layer_bytes",
                             [](const KvLayout& l) {
                               std::vector<uint64_t> v;
                               for (int i = 0; i < l.num_layers(); ++i) v.push_back(l.layer_bytes(i));
                               return v;
                             })
      .def_property_readonly("chunks",
                             [](const KvLayout& l) {
                               std::vector<std::tuple<uint64_t, int64_t, uint64_t, uint64_t, int32_t>> v;
                               for (const auto& c : l.chunks())
                                 v.emplace_back(c.addr, c.block_stride, c.bytes, c.host_offset, c.layer);
                               return v;
                             })
      .def("__repr__", &KvLayout::describe);

  py::class_<TransferHandle>(m, "TransferHandle", "Completion of one queued gather/scatter batch.")
      .def("poll", [](const TransferHandle& h) { return check(h.poll()); },
           py::call_guard<py::gil_scoped_release>())
      .def(
          "wait",
          [](const TransferHandle& h, std::optional<double> timeout) { return check(h.wait(timeout.value_or(-1.0))); },
          py::arg("timeout") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("check_error", [](const TransferHandle& h) { check(h.error()); })
      .def_property_readonly("bytes", &TransferHandle::bytes)
      .def_property_readonly("num_blocks", &TransferHandle::num_blocks);

  auto common = [](bool to_host) {
    return [to_host](const std::shared_ptr<KvLayout>& layout, IdArray ids, AddrArray addrs,
                     std::optional<uint64_t> stream, const std::string& method, int max_ctas, uint64_t piece_bytes,
                     uint64_t stage_bytes, int layer_begin, int layer_end) {
      return transfer(to_host, layout, std::move(ids), std::move(addrs), stream, method, max_ctas, piece_bytes,
                      stage_bytes, layer_begin, layer_end);
    };
  };
  m.def("kv_gather", common(true), py::arg("layout"), py::arg("block_ids"), py::arg("dst_addresses"),
        py::arg("stream") = py::none(), py::arg("method") = "auto", py::arg("max_ctas") = 0,
        py::arg("piece_bytes") = 0, py::arg("stage_bytes") = 0, py::arg("layer_begin") = 0, py::arg("layer_end") = -1,
        "Queue engine blocks -> host slots; see kvbm.copy.gather.");
  m.def("kv_scatter", common(false), py::arg("layout"), py::arg("block_ids"), py::arg("src_addresses"),
        py::arg("stream") = py::none(), py::arg("method") = "auto", py::arg("max_ctas") = 0,
        py::arg("piece_bytes") = 0, py::arg("stage_bytes") = 0, py::arg("layer_begin") = 0, py::arg("layer_end") = -1,
        "Queue host slots -> engine blocks; see kvbm.copy.scatter.");
}
