// Shared helpers for the pybind11 layer. No logic lives in bindings/: they only convert
// Python objects to plain C++ views, call the core, and turn Status into exceptions.
//
// Each bindings/*.cpp registers itself with KVBM_BINDINGS(name, order) so that adding a part
// never touches module.cpp. Lower order registers first (base types before users of them).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "csrc/status.h"

namespace kvbm::bind {

namespace py = pybind11;

using Registrar = void (*)(py::module_&);
int add_registrar(const char* name, int order, Registrar fn);

// Thrown inside bindings only; translated to kvbm.errors classes by one translator.
struct StatusException : std::exception {
  explicit StatusException(Status s) : status(std::move(s)) {}
  const char* what() const noexcept override { return status.message().c_str(); }
  Status status;
};

inline void check(const Status& s) {
  if (!s.ok()) throw StatusException(s);
}
template <typename T>
T check(StatusOr<T>&& s) {
  if (!s.ok()) throw StatusException(s.status());
  return std::move(s.value());
}
[[noreturn]] inline void fail(Code c, std::string msg) { throw StatusException(Status(c, std::move(msg))); }

// A contiguous byte range taken from a Python object: anything with the buffer protocol
// (numpy arrays, bytes, bytearray, memoryview) or an int that is a raw address (then
// `nbytes` must be given by the caller). Keeps the Python object alive while it lives.
struct ByteView {
  uint8_t* data = nullptr;
  size_t size = 0;
  py::object owner;
};

// what: the argument's name, used in error messages. expected_size: 0 = any size.
// alignment: required address alignment in bytes (1 = none).
ByteView get_bytes(py::handle obj, bool writable, const char* what, size_t expected_size = 0,
                   size_t alignment = 1);

}  // namespace kvbm::bind

#define KVBM_BINDINGS_CAT2(a, b) a##b
#define KVBM_BINDINGS_CAT(a, b) KVBM_BINDINGS_CAT2(a, b)
#define KVBM_BINDINGS(name, order)                                                         \
  static void KVBM_BINDINGS_CAT(kvbm_bind_, name)(::pybind11::module_ & m);                \
  static const int KVBM_BINDINGS_CAT(kvbm_reg_, name) =                                    \
      ::kvbm::bind::add_registrar(#name, order, &KVBM_BINDINGS_CAT(kvbm_bind_, name));     \
  static void KVBM_BINDINGS_CAT(kvbm_bind_, name)(::pybind11::module_ & m)
