// Conversions of token-id arguments shared by the bindings: a list/tuple of ints (read in
// place, no Python call per token), a 1-D integer buffer (numpy, array.array) or any sequence,
// into a TokenSpan the core reads. Also the held-buffer helper the hashing bindings use.
#pragma once

#include <string>
#include <vector>

#include "bindings/common.h"
#include "csrc/block_hash.h"

namespace kvbm::bind {

// A read-only Py_buffer held for as long as this object lives.
class HeldBuffer {
 public:
  HeldBuffer() = default;
  HeldBuffer(const HeldBuffer&) = delete;
  HeldBuffer& operator=(const HeldBuffer&) = delete;
  HeldBuffer(HeldBuffer&& o) noexcept : buf_(o.buf_), held_(o.held_) { o.held_ = false; }
  ~HeldBuffer() {
    if (held_) PyBuffer_Release(&buf_);
  }
  // Acquires a C-contiguous byte buffer; throws InvalidArgument naming `what` on failure.
  void acquire_bytes(py::handle obj, const std::string& what) {
    if (!PyObject_CheckBuffer(obj.ptr()))
      fail(Code::kInvalidArgument, what + " must be bytes-like (bytes, bytearray, memoryview, numpy array), got " +
                                       std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    if (PyObject_GetBuffer(obj.ptr(), &buf_, PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      fail(Code::kInvalidArgument, what + ": buffer must be C-contiguous");
    }
    held_ = true;
  }
  // Acquires with strides and format (for typed 1-D token arrays); returns false without a buffer.
  bool acquire_records(py::handle obj) {
    if (PyObject_GetBuffer(obj.ptr(), &buf_, PyBUF_RECORDS_RO) != 0) {
      PyErr_Clear();
      return false;
    }
    held_ = true;
    return true;
  }
  const Py_buffer& get() const { return buf_; }
  const uint8_t* data() const { return static_cast<const uint8_t*>(buf_.buf); }
  size_t size() const { return static_cast<size_t>(buf_.len); }

 private:
  Py_buffer buf_{};
  bool held_ = false;
};

std::string type_name(py::handle obj);

// token_ids as the core sees them, plus whatever keeps their memory alive.
struct Tokens {
  TokenSpan span;
  HeldBuffer buffer;
  std::vector<uint32_t> narrow;    // list/tuple input whose items are all small non-negative ints
  std::vector<int64_t> converted;  // any other list/tuple input
  py::object keep;                 // a slice the span may point into
};

// Value of an exact int that fits one internal digit, read without a call (token ids almost
// always do); false sends the caller to the general conversion.
inline bool compact_long(PyObject* o, long long* out) {
#if PY_VERSION_HEX >= 0x030C0000
  if (!PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(o))) return false;
  *out = static_cast<long long>(PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(o)));
  return true;
#else
  const Py_ssize_t size = Py_SIZE(o);
  if (size < -1 || size > 1) return false;
  const long long digit = size == 0 ? 0 : static_cast<long long>(reinterpret_cast<PyLongObject*>(o)->ob_digit[0]);
  *out = size < 0 ? -digit : digit;
  return true;
#endif
}

// Items [start, stop) of `obj`, which must be a list or tuple (stop < 0: to the end), read in
// place: no slice, no Python call per token. A Tokens reused across calls keeps its buffers.
void tokens_from_sequence(py::handle obj, Tokens& t, long long start = 0, long long stop = -1);

// token_ids[start:stop] (stop < 0: to the end) of any accepted input, without copying a slice.
// Throws InvalidArgument (as StatusException) naming the first bad item or the wrong type.
void get_tokens(py::handle obj, Tokens& t, long long start = 0, long long stop = -1);

}  // namespace kvbm::bind
