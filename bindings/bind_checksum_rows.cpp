#include <cstdint>
#include <string>

#include "bindings/common.h"
#include "csrc/checksum.h"

namespace {
namespace py = pybind11;
using kvbm::Code;
using kvbm::bind::fail;
}  // namespace

KVBM_BINDINGS(checksum_rows, 15) {
  m.def(
      "crc32c_rows",
      [](py::array arr) {
        if (!arr.dtype().is(py::dtype::of<uint8_t>()) || arr.ndim() != 2)
          fail(Code::kInvalidArgument, "crc32c_rows: rows must be a 2-D uint8 array, got " +
                                           std::to_string(arr.ndim()) + "-D " + std::string(py::str(arr.dtype())));
        auto rows = py::reinterpret_borrow<py::array_t<uint8_t, 0>>(arr);
        if (rows.strides(1) != 1) fail(Code::kInvalidArgument, "crc32c_rows: each row must be contiguous");
        if (rows.strides(0) < 0) fail(Code::kInvalidArgument, "crc32c_rows: negative row stride");
        const size_t n = static_cast<size_t>(rows.shape(0));
        const size_t row_bytes = static_cast<size_t>(rows.shape(1));
        const size_t stride = static_cast<size_t>(rows.strides(0));
        py::array_t<uint32_t> out(static_cast<py::ssize_t>(n));
        const uint8_t* base = rows.data();
        uint32_t* dst = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          kvbm::crc32c_rows(base, n, row_bytes, stride, dst);
        }
        return out;
      },
      py::arg("rows"), "CRC32C of each row of a 2-D uint8 array (rows contiguous), as uint32[rows].");
}
