#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/common.h"
#include "tiers/gpu_arena.h"

namespace {
namespace py = pybind11;
using kvbm::bind::check;
}  // namespace

KVBM_BINDINGS(gpu_arena, 30) {
  using kvbm::GpuArena;
  py::class_<GpuArena, std::shared_ptr<GpuArena>>(m, "GpuArena", "A standalone GPU KV block arena.")
      .def_static(
          "create",
          [](const std::string& kind, const std::string& dtype, int num_layers, int64_t num_blocks, int block_size,
             int num_kv_heads, int head_size, int latent_dim, int device) {
            kvbm::GpuArenaSpec s;
            s.kind = check(kvbm::parse_layout_kind(kind));
            s.dtype = check(kvbm::parse_dtype(dtype));
            s.num_layers = num_layers;
            s.num_blocks = num_blocks;
            s.block_size = block_size;
            s.num_kv_heads = num_kv_heads;
            s.head_size = head_size;
            s.latent_dim = latent_dim;
            s.device = device;
            return check(GpuArena::create(s));
          },
          py::arg("kind"), py::arg("dtype"), py::arg("num_layers"), py::arg("num_blocks"), py::arg("block_size"),
          py::arg("num_kv_heads"), py::arg("head_size"), py::arg("latent_dim"), py::arg("device"),
          py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("address", &GpuArena::data)
      .def_property_readonly("nbytes", &GpuArena::bytes)
      .def_property_readonly("layout",
                             [](const GpuArena& a) { return std::const_pointer_cast<kvbm::KvLayout>(a.layout()); })
      .def("layer_tensors", [](const GpuArena& a, int l) {
        if (l < 0 || l >= a.spec().num_layers)
          kvbm::bind::fail(kvbm::Code::kOutOfRange, "layer " + std::to_string(l) + " is outside [0, " +
                                                        std::to_string(a.spec().num_layers) + ")");
        std::vector<std::tuple<uint64_t, std::vector<int64_t>, std::vector<int64_t>, std::string, int>> out;
        for (const auto& t : a.layer_tensors(l))
          out.emplace_back(t.data, t.shape, t.strides, kvbm::dtype_name(t.dtype), t.device);
        return out;
      });
}
