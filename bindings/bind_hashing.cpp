// Bindings for hashing and checksums: Python objects -> plain views -> csrc/{sha256,fast_hash,
// block_hash,checksum}. Conversion only; the hashing, validation of ranges and lengths live in
// the core. Every call that hashes runs with the GIL released, holding the Py_buffers it reads.
#include <cstring>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "bindings/tokens.h"
#include "csrc/block_hash.h"
#include "csrc/checksum.h"
#include "csrc/fast_hash.h"
#include "csrc/sha256.h"

namespace kvbm::bind {
namespace {

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
