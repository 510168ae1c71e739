#include <memory>

#include "bindings/common.h"
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
}
