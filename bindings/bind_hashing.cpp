// Bindings for hashing and checksums: Python objects -> plain views -> csrc/{sha256,fast_hash,
// block_hash,checksum}. Conversion only; the hashing, validation of ranges and lengths live in
// the core. Every call that hashes runs with the GIL released, holding the Py_buffers it reads.
#include <cstring>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "csrc/block_hash.h"
#include "csrc/checksum.h"
#include "csrc/fast_hash.h"
#include "csrc/sha256.h"

namespace kvbm::bind {
namespace {

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

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

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

// [start, stop) of a sequence of `len` items, checked; stop < 0 means "to the end".
void check_range(long long len, long long start, long long* stop) {
  if (*stop < 0) *stop = len;
  if (start < 0 || start > *stop || *stop > len)
    fail(Code::kInvalidArgument, "token range [" + std::to_string(start) + ", " + std::to_string(*stop) +
                                     ") is not within the " + std::to_string(len) + " token ids");
}

// Items [start, stop) of a list/tuple, read in place: no slice, no Python call per token.
void tokens_from_sequence(py::handle obj, Tokens& t, long long start = 0, long long stop = -1) {
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

// token_ids[start:stop] (stop < 0: to the end) without copying a slice of the input.
void get_tokens(py::handle obj, Tokens& t, long long start = 0, long long stop = -1) {
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

// Extra keys: None, one bytes-like for every block, or a sequence of bytes-like/None.
struct Extras {
  std::vector<ExtraKey> keys;
  std::vector<HeldBuffer> buffers;
  bool broadcast = false;
};

void get_extras(py::handle obj, Extras& e) {
  if (obj.is_none()) return;
  if (PyObject_CheckBuffer(obj.ptr())) {
    e.buffers.emplace_back();
    e.buffers.back().acquire_bytes(obj, "extra");
    e.keys.push_back(ExtraKey{e.buffers.back().data(), e.buffers.back().size(), true});
    e.broadcast = true;
    return;
  }
  if (PyUnicode_Check(obj.ptr()) || !PySequence_Check(obj.ptr()))
    fail(Code::kInvalidArgument, "extra must be None, bytes, or a sequence of bytes/None (one per full block), "
                                 "got " + type_name(obj));
  py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(obj.ptr(), ""));
  if (!seq) {
    PyErr_Clear();
    fail(Code::kInvalidArgument, "extra: could not read it as a sequence (" + type_name(obj) + ")");
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  e.buffers.reserve(static_cast<size_t>(n));  // no reallocation: keys point into held buffers
  e.keys.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (items[i] == Py_None) continue;
    if (PyUnicode_Check(items[i]) || !PyObject_CheckBuffer(items[i]))
      fail(Code::kInvalidArgument, "extra[" + std::to_string(i) + "] must be bytes or None, got " +
                                       type_name(items[i]));
    e.buffers.emplace_back();
    e.buffers.back().acquire_bytes(items[i], "extra[" + std::to_string(i) + "]");
    e.keys[static_cast<size_t>(i)] = ExtraKey{e.buffers.back().data(), e.buffers.back().size(), true};
  }
}

void copy_digest(py::handle obj, const char* what, uint8_t out[kBlockHashSize]) {
  HeldBuffer b;
  b.acquire_bytes(obj, what);
  if (b.size() != kBlockHashSize)
    fail(Code::kInvalidArgument, std::string(what) + " must be exactly 16 bytes, got " + std::to_string(b.size()));
  std::memcpy(out, b.data(), kBlockHashSize);
}

sha256::Impl sha_impl(const std::string& name) {
  if (name == "auto") return sha256::Impl::kAuto;
  if (name == "portable") return sha256::Impl::kPortable;
  if (name == "sha-ni") {
    if (!sha256::shani_supported()) fail(Code::kUnsupported, "impl='sha-ni': this CPU or build has no SHA-NI");
    return sha256::Impl::kShaNi;
  }
  fail(Code::kInvalidArgument, "impl='" + name + "' is unknown; expected 'auto', 'portable' or 'sha-ni'");
}

Crc32cImpl crc_impl(const std::string& name) {
  if (name == "auto") return Crc32cImpl::kAuto;
  if (name == "table") return Crc32cImpl::kTable;
  if (name == "sse4.2") {
    if (!crc32c_hw_supported()) fail(Code::kUnsupported, "impl='sse4.2': this CPU or build has no crc32 instruction");
    return Crc32cImpl::kSse42;
  }
  fail(Code::kInvalidArgument, "impl='" + name + "' is unknown; expected 'auto', 'table' or 'sse4.2'");
}

}  // namespace
}  // namespace kvbm::bind

KVBM_BINDINGS(hashing, 10) {
  using namespace kvbm;
  using namespace kvbm::bind;

  m.def("sha256_impl", &sha256::active_impl_name, "The SHA-256 implementation in use: 'sha-ni' or 'portable'.");
  m.def("crc32c_impl", &crc32c_impl_name, "The CRC32C implementation in use: 'sse4.2' or 'table'.");

  m.def(
      "sha256",
      [](py::handle data, const std::string& impl) {
        const sha256::Impl which = sha_impl(impl);
        HeldBuffer b;
        b.acquire_bytes(data, "data");
        uint8_t out[sha256::kDigestSize];
        {
          py::gil_scoped_release nogil;
          sha256::digest(b.data(), b.size(), out, which);
        }
        return py::bytes(reinterpret_cast<const char*>(out), sizeof(out));
      },
      py::arg("data"), py::arg("impl") = "auto",
      "SHA-256 digest (32 bytes) of a bytes-like object. impl: 'auto', 'portable' or 'sha-ni'.");

  m.def(
      "fast128",
      [](py::handle data) {
        HeldBuffer b;
        b.acquire_bytes(data, "data");
        uint8_t out[kFast128DigestSize];
        {
          py::gil_scoped_release nogil;
          fast128(b.data(), b.size(), out);
        }
        return py::bytes(reinterpret_cast<const char*>(out), sizeof(out));
      },
      py::arg("data"), "fast128 digest (16 bytes, non-cryptographic; see docs/hashing.md).");

  m.def(
      "crc32c",
      [](py::handle data, uint32_t crc, const std::string& impl) {
        const Crc32cImpl which = crc_impl(impl);
        HeldBuffer b;
        b.acquire_bytes(data, "data");
        py::gil_scoped_release nogil;
        return crc32c(b.data(), b.size(), crc, which);
      },
      py::arg("data"), py::arg("crc") = 0u, py::arg("impl") = "auto",
      "CRC32C (Castagnoli) of a bytes-like object, continuing from `crc` (0 to start).");

  m.def(
      "block_hashes",
      [](py::handle token_ids, long long block_size, py::handle ns_digest, const std::string& algorithm,
         py::handle extra, py::handle parent, const std::string& sha256_impl, bool as_list, long long start,
         py::object stop_obj) -> py::object {
        const long long stop = stop_obj.is_none() ? -1 : stop_obj.cast<long long>();
        if (!stop_obj.is_none() && stop < 0)
          fail(Code::kInvalidArgument, "stop = " + std::to_string(stop) + " must be >= 0 (or None)");
        if (block_size <= 0)
          fail(Code::kInvalidArgument, "block_size = " + std::to_string(block_size) + " must be > 0");
        BlockHashParams params;
        params.algorithm = check(parse_hash_algorithm(algorithm));
        params.block_size = static_cast<size_t>(block_size);
        params.sha_impl = sha_impl(sha256_impl);
        uint8_t ns[kBlockHashSize], par[kBlockHashSize];
        copy_digest(ns_digest, "namespace digest", ns);
        params.ns_digest = ns;
        if (!parent.is_none()) {
          copy_digest(parent, "parent", par);
          params.parent = par;
        }
        Tokens tokens;
        get_tokens(token_ids, tokens, start, stop);
        Extras extras;
        get_extras(extra, extras);
        params.extras = extras.keys.data();
        params.num_extras = extras.keys.size();
        params.broadcast_extra = extras.broadcast;
        const size_t nblocks = num_full_blocks(tokens.span.count, params.block_size);
        if (as_list) {
          std::vector<uint8_t> raw(nblocks * kBlockHashSize);
          Status st;
          {
            py::gil_scoped_release nogil;
            st = compute_block_hashes(params, tokens.span, raw.data(), raw.size());
          }
          check(st);
          py::list result(nblocks);
          for (size_t i = 0; i < nblocks; ++i)
            PyList_SET_ITEM(result.ptr(), static_cast<Py_ssize_t>(i),
                            py::bytes(reinterpret_cast<const char*>(raw.data() + i * kBlockHashSize), kBlockHashSize)
                                .release()
                                .ptr());
          return std::move(result);
        }
        py::array_t<uint8_t> out({static_cast<py::ssize_t>(nblocks), static_cast<py::ssize_t>(kBlockHashSize)});
        uint8_t* dst = out.mutable_data();
        Status st;
        {
          py::gil_scoped_release nogil;
          st = compute_block_hashes(params, tokens.span, dst, nblocks * kBlockHashSize);
        }
        check(st);
        return std::move(out);
      },
      py::arg("token_ids"), py::arg("block_size"), py::arg("ns_digest"), py::arg("algorithm") = "sha256",
      py::arg("extra") = py::none(), py::arg("parent") = py::none(), py::arg("sha256_impl") = "auto",
      py::arg("as_list") = false, py::arg("start") = 0, py::arg("stop") = py::none(),
      "Chained 16-byte hashes of the full blocks of token_ids[start:stop] as a uint8 array of shape (n, 16),\n"
      "or as a list of 16-byte bytes objects with as_list=True. The range is read in place (no slice copy).\n"
      "Use kvbm.block_hashes / kvbm.hashing.block_hashes_array rather than this directly.");
}
