// kvbm._native: the module entry point, the registrar list and the one place where Status
// codes become Python exceptions (classes defined in kvbm/errors.py).
#include <algorithm>
#include <string>
#include <vector>

#include "bindings/common.h"

namespace kvbm::bind {

namespace {
struct RegEntry {
  const char* name;
  int order;
  Registrar fn;
};
std::vector<RegEntry>& registry() {
  static std::vector<RegEntry> r;  // function-local: safe against static-init order
  return r;
}

const char* exception_class_for(Code c) {
  switch (c) {
    case Code::kInvalidArgument: return "InvalidArgumentError";
    case Code::kOutOfRange: return "OutOfRangeError";
    case Code::kCapacityExceeded: return "CapacityError";
    case Code::kIllegalTransition: return "StateError";
    case Code::kNotFound: return "BlockNotFoundError";
    case Code::kAlreadyExists: return "AlreadyExistsError";
    case Code::kIo: return "StorageIOError";
    case Code::kChecksum: return "ChecksumError";
    case Code::kCudaUnavailable: return "CudaUnavailableError";
    case Code::kCuda: return "CudaError";
    case Code::kTimeout: return "TransferTimeoutError";
    case Code::kPeer: return "PeerError";
    case Code::kConfig: return "ConfigError";
    case Code::kUnsupported: return "UnsupportedError";
    case Code::kInternal:
    case Code::kOk: break;
  }
  return "InternalError";
}
}  // namespace

int add_registrar(const char* name, int order, Registrar fn) {
  registry().push_back({name, order, fn});
  return static_cast<int>(registry().size());
}

ByteView get_bytes(py::handle obj, bool writable, const char* what, size_t expected_size,
                   size_t alignment) {
  ByteView v;
  if (py::isinstance<py::int_>(obj)) {
    // A raw address: the caller vouches for `expected_size` bytes there.
    uint64_t addr = obj.cast<uint64_t>();
    if (addr == 0) fail(Code::kInvalidArgument, std::string(what) + ": null pointer");
    if (expected_size == 0)
      fail(Code::kInvalidArgument, std::string(what) + ": a raw pointer needs an explicit size");
    v.data = reinterpret_cast<uint8_t*>(addr);
    v.size = expected_size;
  } else {
    if (!PyObject_CheckBuffer(obj.ptr()))
      fail(Code::kInvalidArgument, std::string(what) + ": expected a buffer (numpy array, bytes, "
                                   "bytearray, memoryview) or an int address, got " +
                                   std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    Py_buffer pb;
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &pb, flags) != 0) {
      PyErr_Clear();
      fail(Code::kInvalidArgument, std::string(what) + (writable ? ": buffer must be writable and C-contiguous"
                                                                 : ": buffer must be C-contiguous"));
    }
    v.data = static_cast<uint8_t*>(pb.buf);
    v.size = static_cast<size_t>(pb.len);
    PyBuffer_Release(&pb);  // obj keeps the memory alive; we hold a reference below
    if (expected_size != 0 && v.size != expected_size)
      fail(Code::kInvalidArgument, std::string(what) + ": buffer has " + std::to_string(v.size) +
                                       " bytes, expected " + std::to_string(expected_size));
  }
  if (alignment > 1 && (reinterpret_cast<uintptr_t>(v.data) % alignment) != 0)
    fail(Code::kInvalidArgument,
         std::string(what) + ": buffer address is not aligned to " + std::to_string(alignment) + " bytes");
  v.owner = py::reinterpret_borrow<py::object>(obj);
  return v;
}

}  // namespace kvbm::bind

PYBIND11_MODULE(_native, m) {
  namespace py = pybind11;
  using namespace kvbm::bind;
  m.doc() = "kvbm native core (C++/CUDA). Use the kvbm package, not this module, directly.";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusException& e) {
      py::object errors = py::module_::import("kvbm.errors");
      py::object cls = errors.attr(exception_class_for(e.status.code()));
      PyErr_SetString(cls.ptr(), e.status.message().c_str());
    }
  });

  auto& regs = registry();
  std::stable_sort(regs.begin(), regs.end(),
                   [](const RegEntry& a, const RegEntry& b) { return a.order < b.order; });
  for (const auto& r : regs) r.fn(m);
}
