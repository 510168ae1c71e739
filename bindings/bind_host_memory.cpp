#include <memory>

#include <string>

#include "bindings/common.h"
#include "csrc/host_copy.h"
#include "csrc/host_memory.h"

namespace {
namespace py = pybind11;
using kvbm::HostBuffer;
}  // namespace

KVBM_BINDINGS(host_memory, 10) {
  py::class_<HostBuffer, std::shared_ptr<HostBuffer>>(m, "HostBuffer", py::buffer_protocol(),
                                                      "One host allocation (pinned or pageable), writable buffer.")
      .def_property_readonly("address", [](const HostBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("size", &HostBuffer::size)
      .def_property_readonly("pinned", &HostBuffer::pinned)
      .def("__len__", &HostBuffer::size)
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1});
      });
  m.def(
      "alloc_host",
      [](size_t nbytes, bool pinned) {
        return std::make_shared<HostBuffer>(kvbm::bind::check(kvbm::alloc_host(nbytes, pinned)));
      },
      py::arg("nbytes"), py::arg("pinned") = true, py::call_guard<py::gil_scoped_release>(),
      "Allocate nbytes of host memory: pinned+mapped when CUDA is usable and pinned=True, else "
      "4096-aligned pageable. Raises InvalidArgumentError (nbytes 0), CudaError, CapacityError.");
  m.def(
      "copy_bytes",
      [](py::handle dst, py::handle src, const std::string& impl) {
        using kvbm::bind::fail;
        auto d = kvbm::bind::get_bytes(dst, true, "dst");
        auto s = kvbm::bind::get_bytes(src, false, "src", d.size);
        if (impl != "auto" && impl != "memcpy" && impl != "sse2")
          fail(kvbm::Code::kInvalidArgument, "impl: must be 'auto', 'memcpy' or 'sse2', got '" + impl + "'");
        const uint8_t* sp = s.data;
        if (!(sp + s.size <= d.data || d.data + d.size <= sp)) fail(kvbm::Code::kInvalidArgument, "dst and src overlap");
        py::gil_scoped_release nogil;
        if (impl == "memcpy")
          std::memcpy(d.data, sp, d.size);
        else if (impl == "sse2")
          kvbm::copy_bytes_sse2(d.data, sp, d.size);
        else
          kvbm::copy_bytes(d.data, sp, d.size);
      },
      py::arg("dst"), py::arg("src"), py::arg("impl") = "auto",
      "Copy src into dst (same size, not overlapping) as the host tier copies blocks (Note [Host copies]); "
      "impl 'memcpy' or 'sse2' forces one path (tests and benchmarks).");
}
