#include "bindings/tokens.h"

#include <cctype>
#include <cstring>

namespace kvbm::bind {

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

namespace {

// [start, stop) of a sequence of `len` items, checked; stop < 0 means "to the end".
void check_range(long long len, long long start, long long* stop) {
  if (*stop < 0) *stop = len;
  if (start < 0 || start > *stop || *stop > len)
    fail(Code::kInvalidArgument, "token range [" + std::to_string(start) + ", " + std::to_string(*stop) +
                                     ") is not within the " + std::to_string(len) + " token ids");
}

}  // namespace

void tokens_from_sequence(py::handle obj, Tokens& t, long long start, long long stop) {
  PyObject* seq = obj.ptr();
  check_range(PySequence_Fast_GET_SIZE(seq), start, &stop);
  const Py_ssize_t n = static_cast<Py_ssize_t>(stop - start);
  PyObject** items = PySequence_Fast_ITEMS(seq) + start;
  // Common case first: every item an exact int of one internal digit (< 2^30) and >= 0, which
  // converts straight to uint32. Anything else restarts on the general path below.
  t.narrow.resize(static_cast<size_t>(n));
  Py_ssize_t i0 = 0;
  for (; i0 < n; ++i0) {
    long long v = 0;
    if (!PyLong_CheckExact(items[i0]) || !compact_long(items[i0], &v) || v < 0) break;
    t.narrow[static_cast<size_t>(i0)] = static_cast<uint32_t>(v);
  }
  if (i0 == n) {
    t.span = TokenSpan{t.narrow.data(), t.narrow.size(), 4, TokenType::kUInt32, false};
    return;
  }
  t.narrow.clear();
  t.narrow.shrink_to_fit();
  t.converted.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* it = items[i];
    long long fast = 0;
    if (PyLong_CheckExact(it) && compact_long(it, &fast)) {
      t.converted[static_cast<size_t>(i)] = fast;
      continue;
    }
    if (PyBool_Check(it))
      fail(Code::kInvalidArgument, "token_ids[" + std::to_string(i + start) + "] is a bool, not an integer token id");
    py::object owned;
    if (!PyLong_Check(it)) {
      if (!PyIndex_Check(it))
        fail(Code::kInvalidArgument, "token_ids[" + std::to_string(i + start) + "] is " +
                                         type_name(it) + ", not an integer token id");
      PyObject* idx = PyNumber_Index(it);
      if (!idx) {
        PyErr_Clear();
        fail(Code::kInvalidArgument, "token_ids[" + std::to_string(i + start) + "] is " + type_name(it) +
                                         ", not an integer token id");
      }
      owned = py::reinterpret_steal<py::object>(idx);
      it = idx;
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(it, &overflow);
    if (overflow != 0)
      fail(Code::kInvalidArgument, "token_ids[" + std::to_string(i + start) + "] = " + std::string(py::str(it)) +
                                       " is out of range: token ids must satisfy 0 <= t < 2**32");
    t.converted[static_cast<size_t>(i)] = v;
  }
  t.span = TokenSpan{t.converted.data(), t.converted.size(), 8, TokenType::kInt64, false};
}


namespace {

// Buffer format string -> token type; fails naming the format for non-integer element types.
void tokens_from_buffer(Tokens& t) {
  const Py_buffer& b = t.buffer.get();
  if (b.ndim != 1)
    fail(Code::kInvalidArgument, "token_ids must be 1-D, got an array with ndim=" + std::to_string(b.ndim));
  std::string fmt = b.format ? b.format : "B";
  bool swap = false;
  size_t pos = 0;
  if (!fmt.empty() && std::strchr("@=<>!", fmt[0])) {
    const bool big = fmt[0] == '>' || fmt[0] == '!';
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    swap = fmt[0] == '<';
#else
    swap = big;
#endif
    pos = 1;
  }
  const std::string code = fmt.substr(pos);
  if (code == "?")
    fail(Code::kInvalidArgument, "token_ids has dtype bool; token ids must be integers");
  if (code.size() != 1 || !std::strchr("bBhHiIlLqQnN", code[0]))
    fail(Code::kInvalidArgument, "token_ids has non-integer element format '" + fmt +
                                     "'; expected an integer dtype (int8..int64, uint8..uint64)");
  const bool is_signed = std::islower(static_cast<unsigned char>(code[0]));
  TokenType type;
  switch (b.itemsize) {
    case 1: type = is_signed ? TokenType::kInt8 : TokenType::kUInt8; break;
    case 2: type = is_signed ? TokenType::kInt16 : TokenType::kUInt16; break;
    case 4: type = is_signed ? TokenType::kInt32 : TokenType::kUInt32; break;
    case 8: type = is_signed ? TokenType::kInt64 : TokenType::kUInt64; break;
    default:
      fail(Code::kInvalidArgument, "token_ids has an integer item size of " + std::to_string(b.itemsize) +
                                       " bytes; expected 1, 2, 4 or 8");
  }
  const ptrdiff_t stride = b.strides ? static_cast<ptrdiff_t>(b.strides[0]) : static_cast<ptrdiff_t>(b.itemsize);
  t.span = TokenSpan{b.buf, static_cast<size_t>(b.shape ? b.shape[0] : b.len / b.itemsize), stride, type,
                     swap && b.itemsize > 1};
}

}  // namespace

void get_tokens(py::handle obj, Tokens& t, long long start, long long stop) {
  if (PyBytes_Check(obj.ptr()) || PyByteArray_Check(obj.ptr()) || PyUnicode_Check(obj.ptr()))
    fail(Code::kInvalidArgument, "token_ids must be a sequence of ints or a 1-D integer array, got " +
                                     type_name(obj));
  if (PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr())) {
    tokens_from_sequence(obj, t, start, stop);
    t.span.index_base = static_cast<size_t>(start);
    return;
  }
  if (PyObject_CheckBuffer(obj.ptr())) {
    if (!t.buffer.acquire_records(obj))
      fail(Code::kInvalidArgument, "token_ids: could not read the array's buffer (" + type_name(obj) + ")");
    tokens_from_buffer(t);
    check_range(static_cast<long long>(t.span.count), start, &stop);
    t.span.data = static_cast<const uint8_t*>(t.span.data) + start * t.span.stride;
    t.span.count = static_cast<size_t>(stop - start);
    t.span.index_base = static_cast<size_t>(start);
    return;
  }
  if (start != 0 || stop >= 0) {  // other sequences (vLLM's ConstantList, range ...): slice once
    py::object part = py::reinterpret_borrow<py::object>(obj)[py::slice(
        py::int_(start), stop < 0 ? py::object(py::none()) : py::object(py::int_(stop)), py::none())];
    if (PyList_Check(part.ptr()) || PyTuple_Check(part.ptr()))
      tokens_from_sequence(part, t);
    else
      get_tokens(part, t);
    t.keep = std::move(part);
    t.span.index_base = static_cast<size_t>(start);
    return;
  }
  // Other sequences (range, ...): materialize once as a list.
  PyObject* seq = PySequence_Check(obj.ptr()) ? PySequence_Fast(obj.ptr(), "") : nullptr;
  if (!seq) {
    PyErr_Clear();
    fail(Code::kInvalidArgument, "token_ids must be a list/tuple of ints, a 1-D integer numpy array or an "
                                 "array.array, got " + type_name(obj));
  }
  py::object keep = py::reinterpret_steal<py::object>(seq);
  tokens_from_sequence(keep, t);
}


}  // namespace kvbm::bind
