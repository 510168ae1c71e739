// Bindings of the router's block index (csrc/router_index.h): Python objects -> plain views.
//
// Engine block hashes are normalised here, once, to a 128-bit key: an int in [-2^63, 2^64)
// (vLLM's) is {lo = its two's-complement low 64 bits, hi = 1 if negative else 0}; bytes (kvbm's)
// and str are their fast128 digest (str's with a tag, so "a" and b"a" differ). Token ids are
// read from the event's list in place (bindings/tokens.h). The calls hold the GIL: they read
// Python objects throughout and never block; the caller serialises access (one lock in the
// router). Events come from sockets, so apply() turns anything malformed into a counted
// unresolved event; only the caller's own arguments (slot, clears) raise.
#include <algorithm>
#include <climits>
#include <optional>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "bindings/tokens.h"
#include "csrc/fast_hash.h"
#include "csrc/router_index.h"

namespace kvbm::bind {
namespace {

constexpr uint64_t kTextTag = 0x7374722d6b657921ULL;

bool digest_key(const char* data, Py_ssize_t len, uint64_t tag, Hash128* out) {
  uint8_t d[kFast128DigestSize];
  fast128(data, static_cast<size_t>(len), d);
  *out = Hash128::from_bytes(d);
  out->hi ^= tag;
  return true;
}

// An engine's block hash as the index keys it; false if `o` is none (not an int of 64 bits,
// bytes or str).
bool engine_key(PyObject* o, Hash128* out) {
  if (PyLong_Check(o)) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow == 0) {
      *out = Hash128{static_cast<uint64_t>(v), v < 0 ? 1u : 0u};
      return true;
    }
    if (overflow < 0) return false;
    const unsigned long long u = PyLong_AsUnsignedLongLong(o);
    if (u == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    *out = Hash128{u, 0};
    return true;
  }
  if (PyBytes_Check(o)) return digest_key(PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o), 0, out);
  if (PyUnicode_Check(o)) {
    Py_ssize_t len = 0;
    const char* s = PyUnicode_AsUTF8AndSize(o, &len);
    if (s == nullptr) {
      PyErr_Clear();
      return false;
    }
    return digest_key(s, len, kTextTag, out);
  }
  return false;
}

// Engine hashes of a list/tuple into `out`. skip_bad: drop items that are no hash (a removal of
// them is a no-op) instead of returning false.
bool engine_keys(PyObject* seq, std::vector<Hash128>* out, bool skip_bad) {
  out->clear();
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out->reserve(static_cast<size_t>(n));
  Hash128 h;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (engine_key(items[i], &h))
      out->push_back(h);
    else if (!skip_bad)
      return false;
  }
  return true;
}

// Root key of an extra key (None, str, bytes); false for any other type.
bool root_key(int64_t block_size, PyObject* extra, uint64_t* out) {
  const uint64_t bs = static_cast<uint64_t>(block_size);
  if (extra == Py_None) {
    *out = router_root_key(bs, RouterExtra::kNone, nullptr, 0);
  } else if (PyUnicode_Check(extra)) {
    Py_ssize_t len = 0;
    const char* s = PyUnicode_AsUTF8AndSize(extra, &len);
    if (s == nullptr) {
      PyErr_Clear();
      return false;
    }
    *out = router_root_key(bs, RouterExtra::kText, reinterpret_cast<const uint8_t*>(s), static_cast<size_t>(len));
  } else if (PyBytes_Check(extra)) {
    *out = router_root_key(bs, RouterExtra::kBytes, reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(extra)),
                           static_cast<size_t>(PyBytes_GET_SIZE(extra)));
  } else {
    return false;
  }
  return true;
}

int tier_of_medium(PyObject* medium) {
  if (medium == Py_None) return 0;
  Py_ssize_t len = 0;
  const char* s = PyUnicode_Check(medium) ? PyUnicode_AsUTF8AndSize(medium, &len) : nullptr;
  if (s == nullptr || len > 8) {
    PyErr_Clear();
    return 2;  // DISK: what the router assumes of a medium it does not know
  }
  std::string up(s, static_cast<size_t>(len));
  for (char& c : up) c = static_cast<char>(c >= 'a' && c <= 'z' ? c - 32 : c);
  if (up == "GPU") return 0;
  if (up == "CPU" || up == "HOST") return 1;
  if (up == "REMOTE") return 3;
  return 2;
}

int64_t int_arg(PyObject* o, bool* ok) {
  int overflow = 0;
  const long long v = PyLong_Check(o) ? PyLong_AsLongLongAndOverflow(o, &overflow) : 0;
  *ok = PyLong_Check(o) && overflow == 0;
  return v;
}

// Reads events (vLLM's or kvbm's structs, any object with their attributes) into RouterEvents.
class EventReader {
 public:
  EventReader() {
    for (const char* n : {"block_hashes", "parent_block_hash", "token_ids", "block_size", "medium", "lora_name"})
      names_.push_back(py::reinterpret_steal<py::object>(PyUnicode_InternFromString(n)));
  }

  // `ev` as the core applies it; a malformed one is Kind::kMalformed. Valid until the next call.
  const RouterEvent& read(PyObject* ev) {
    out_ = RouterEvent{};
    out_.kind = kind_of(ev);
    if (out_.kind == RouterEvent::Kind::kStored || out_.kind == RouterEvent::Kind::kRemoved) {
      if (!fill(ev, out_.kind == RouterEvent::Kind::kStored)) out_.kind = RouterEvent::Kind::kMalformed;
    }
    return out_;
  }

 private:
  RouterEvent::Kind kind_of(PyObject* ev) {
    PyTypeObject* t = Py_TYPE(ev);
    for (const auto& k : kinds_)
      if (k.first.ptr() == reinterpret_cast<PyObject*>(t)) return k.second;
    const std::string name = py::str(py::handle(reinterpret_cast<PyObject*>(t)).attr("__name__"));
    const RouterEvent::Kind kind = name == "BlockStored"        ? RouterEvent::Kind::kStored
                                   : name == "BlockRemoved"     ? RouterEvent::Kind::kRemoved
                                   : name == "AllBlocksCleared" ? RouterEvent::Kind::kCleared
                                                                : RouterEvent::Kind::kOther;
    if (kinds_.size() < 16)  // the types held alive, so their addresses stay theirs
      kinds_.emplace_back(py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(t)), kind);
    return kind;
  }

  py::object attr(PyObject* ev, size_t i) {
    PyObject* v = PyObject_GetAttr(ev, names_[i].ptr());
    if (v == nullptr) PyErr_Clear();
    return py::reinterpret_steal<py::object>(v);
  }

  bool fill(PyObject* ev, bool stored) {
    py::object hashes = attr(ev, 0), medium = attr(ev, 4);
    if (!hashes || !medium) return false;
    if (!engine_keys(hashes.ptr(), &hashes_, !stored)) {
      out_.num_hashes = PyList_Check(hashes.ptr()) || PyTuple_Check(hashes.ptr())
                            ? static_cast<size_t>(PySequence_Fast_GET_SIZE(hashes.ptr())) : 1;
      return false;
    }
    out_.hashes = hashes_.data();
    out_.num_hashes = hashes_.size();
    out_.tier = tier_of_medium(medium.ptr());
    if (!stored) return true;
    py::object parent = attr(ev, 1), tokens = attr(ev, 2), bs = attr(ev, 3), lora = attr(ev, 5);
    if (!parent || !tokens || !bs || !lora) return false;
    bool ok = false;
    out_.block_size = int_arg(bs.ptr(), &ok);
    if (!ok || !root_key(out_.block_size, lora.ptr(), &out_.root)) return false;
    if (parent.ptr() != Py_None) {
      if (!engine_key(parent.ptr(), &parent_)) return false;
      out_.parent = &parent_;
    }
    // Only the tokens of the named blocks are read (a huge list with few hashes costs nothing).
    const Py_ssize_t have = PySequence_Check(tokens.ptr()) ? PySequence_Size(tokens.ptr()) : -1;
    if (have < 0) {
      PyErr_Clear();
      return false;
    }
    const uint64_t n = out_.num_hashes;
    if (n == 0 || out_.block_size <= 0 || static_cast<uint64_t>(have) / static_cast<uint64_t>(out_.block_size) < n)
      return true;  // tokenless
    const long long stop = static_cast<long long>(n * static_cast<uint64_t>(out_.block_size));
    try {
      if (PyList_Check(tokens.ptr()) || PyTuple_Check(tokens.ptr())) {
        tokens_from_sequence(tokens, list_tokens_, 0, stop);
        out_.tokens = list_tokens_.span;
      } else {
        other_tokens_.emplace();
        get_tokens(tokens, *other_tokens_, 0, stop);
        out_.tokens = other_tokens_->span;
      }
    } catch (const StatusException&) {
      return false;
    }
    return true;
  }

  std::vector<py::object> names_;
  std::vector<std::pair<py::object, RouterEvent::Kind>> kinds_;
  RouterEvent out_;
  std::vector<Hash128> hashes_;
  Hash128 parent_;
  Tokens list_tokens_;  // reused: no allocation per event once warm
  std::optional<Tokens> other_tokens_;
};

// A slot or tier argument; values beyond int become -1, which the core rejects by name.
int small_int(py::handle o, const char* what) {
  if (!PyLong_Check(o.ptr()))
    fail(Code::kInvalidArgument, std::string("router index: ") + what + " must be an int, got " + type_name(o));
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(o.ptr(), &overflow);
  return overflow != 0 || v < INT_MIN || v > INT_MAX ? -1 : static_cast<int>(v);
}

// Tier bits of an iterable of tiers, checked by the core.
uint32_t tier_bits(py::handle tiers) {
  uint32_t bits = 0;
  for (py::handle t : tiers) {
    const int v = small_int(t, "a tier");
    check(router_check_tier(v));
    bits |= 1u << v;
  }
  return bits;
}

std::vector<uint64_t> router_keys(py::handle keys) {
  std::vector<uint64_t> out;
  if (!PyList_Check(keys.ptr()) && !PyTuple_Check(keys.ptr()))
    fail(Code::kInvalidArgument, "router index: keys must be a list of router keys (ints), got " + type_name(keys));
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(keys.ptr());
  PyObject** items = PySequence_Fast_ITEMS(keys.ptr());
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const unsigned long long v = PyLong_Check(items[i]) ? PyLong_AsUnsignedLongLong(items[i]) : 0;
    if (!PyLong_Check(items[i]) || (v == static_cast<unsigned long long>(-1) && PyErr_Occurred())) {
      PyErr_Clear();
      fail(Code::kInvalidArgument,
           "router index: keys[" + std::to_string(i) + "] is not a router key (an int in 0..2**64-1)");
    }
    out[static_cast<size_t>(i)] = v;
  }
  return out;
}

// A list/tuple of `obj`'s items (any iterable), or InvalidArgument.
py::object sequence(py::handle obj, const char* what) {
  PyObject* seq = PySequence_Fast(obj.ptr(), "");
  if (seq == nullptr) {
    PyErr_Clear();
    fail(Code::kInvalidArgument, std::string("router index: ") + what + " must be iterable, got " + type_name(obj));
  }
  return py::reinterpret_steal<py::object>(seq);
}

// The reader lives with the index it feeds (its buffers are reused across calls).
struct PyRouterIndex {
  std::unique_ptr<RouterIndex> core;
  EventReader reader;
  std::vector<Hash128> hashes;
};

}  // namespace
}  // namespace kvbm::bind

KVBM_BINDINGS(router_index, 20) {
  using namespace kvbm;
  using namespace kvbm::bind;

  m.def(
      "router_chain_keys",
      [](py::handle token_ids, long long block_size, py::handle extra, py::object parent, py::object limit) {
        if (block_size < 1)
          fail(Code::kInvalidArgument, "router keys: block_size must be >= 1, got " + std::to_string(block_size));
        uint64_t k = 0;
        if (!parent.is_none()) {
          if (!PyLong_Check(parent.ptr()))
            fail(Code::kInvalidArgument, "router keys: parent must be a router key (int) or None");
          k = parent.cast<uint64_t>();
        } else if (!root_key(block_size, extra.ptr(), &k)) {
          fail(Code::kInvalidArgument, "router keys: extra must be None, str or bytes, got " + type_name(extra));
        }
        Tokens t;
        get_tokens(token_ids, t);
        size_t n = t.span.count / static_cast<size_t>(block_size);
        if (!limit.is_none()) n = std::min(n, static_cast<size_t>(std::max<long long>(0, limit.cast<long long>())));
        std::vector<uint64_t> keys(n);
        std::vector<uint32_t> scratch;
        check(router_chain_keys(k, t.span, static_cast<size_t>(block_size), n, keys.data(), &scratch));
        py::list out(n);
        for (size_t i = 0; i < n; ++i)
          PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), PyLong_FromUnsignedLongLong(keys[i]));
        return out;
      },
      py::arg("token_ids"), py::arg("block_size"), py::arg("extra") = py::none(), py::arg("parent") = py::none(),
      py::arg("limit") = py::none(),
      "Router keys (ints) of the full blocks of token_ids (at most limit), chained from parent or from the root\n"
      "of (block_size, extra). Use kvbm.router.index.chain_keys.");

  py::class_<PyRouterIndex>(m, "RouterIndex", "The router's block index (kvbm.router.index.BlockIndex wraps it).")
      .def(py::init([](long long max_blocks) {
             auto p = std::make_unique<PyRouterIndex>();
             p->core = check(RouterIndex::create(static_cast<size_t>(std::max<long long>(0, max_blocks))));
             return p;
           }),
           py::arg("max_blocks"))
      .def("__len__", [](const PyRouterIndex& s) { return s.core->size(); })
      .def_property_readonly("max_blocks", [](const PyRouterIndex& s) { return s.core->max_blocks(); })
      .def(
          "apply",
          [](PyRouterIndex& s, py::handle slot, py::handle events, py::handle clears) {
            const int sl = small_int(slot, "slot");
            check(router_check_slot(sl));
            const uint32_t bits = tier_bits(clears);
            py::object seq = sequence(events, "events");
            const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
            PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
            for (Py_ssize_t i = 0; i < n; ++i) check(s.core->apply(sl, s.reader.read(items[i]), bits));
          },
          py::arg("slot"), py::arg("events"), py::arg("clears"))
      .def(
          "store",
          [](PyRouterIndex& s, py::handle slot, py::handle tier, py::handle hashes, py::handle parent,
             py::handle token_ids, long long block_size, py::handle extra) {
            if (!engine_keys(hashes.ptr(), &s.hashes, false))
              fail(Code::kInvalidArgument, "router index: hashes must be a list of block hashes (int, bytes or str)");
            Hash128 par;
            if (!parent.is_none() && !engine_key(parent.ptr(), &par))
              fail(Code::kInvalidArgument, "router index: parent must be a block hash (int, bytes or str) or None");
            uint64_t root = 0;
            if (!root_key(block_size, extra.ptr(), &root))
              fail(Code::kInvalidArgument, "router index: extra must be None, str or bytes, got " + type_name(extra));
            Tokens t;
            const size_t n = s.hashes.size();
            const Py_ssize_t have = PySequence_Check(token_ids.ptr()) ? PySequence_Size(token_ids.ptr()) : -1;
            if (have < 0) {
              PyErr_Clear();
              fail(Code::kInvalidArgument,
                   "router index: token_ids must be a sequence of ints, got " + type_name(token_ids));
            }
            if (n > 0 && block_size > 0 && static_cast<uint64_t>(have) / static_cast<uint64_t>(block_size) >= n)
              get_tokens(token_ids, t, 0, static_cast<long long>(n * static_cast<uint64_t>(block_size)));
            check(s.core->store(small_int(slot, "slot"), small_int(tier, "tier"), s.hashes.data(), n,
                                parent.is_none() ? nullptr : &par, t.span, block_size, root));
          },
          py::arg("slot"), py::arg("tier"), py::arg("hashes"), py::arg("parent"), py::arg("token_ids"),
          py::arg("block_size"), py::arg("extra") = py::none())
      .def(
          "remove",
          [](PyRouterIndex& s, py::handle slot, py::handle tier, py::handle hashes) {
            py::object seq = sequence(hashes, "hashes");
            engine_keys(seq.ptr(), &s.hashes, true);
            check(s.core->remove(small_int(slot, "slot"), small_int(tier, "tier"), s.hashes.data(), s.hashes.size()));
          },
          py::arg("slot"), py::arg("tier"), py::arg("hashes"))
      .def(
          "clear",
          [](PyRouterIndex& s, py::handle slot, py::handle tiers) {
            check(s.core->clear(small_int(slot, "slot"), tier_bits(tiers)));
          },
          py::arg("slot"), py::arg("tiers"))
      .def(
          "overlap",
          [](PyRouterIndex& s, py::handle keys, py::handle slots) {
            const std::vector<uint64_t> k = router_keys(keys);
            std::vector<int> sl;
            py::object seq = sequence(slots, "slots");
            for (py::handle x : seq) sl.push_back(small_int(x, "slot"));
            std::vector<uint8_t> tiers;
            std::vector<size_t> lens;
            check(s.core->overlap(k.data(), k.size(), sl.data(), sl.size(), &tiers, &lens));
            py::dict out;
            for (size_t j = 0; j < sl.size(); ++j) {
              py::list row(lens[j]);
              for (size_t i = 0; i < lens[j]; ++i)
                PyList_SET_ITEM(row.ptr(), static_cast<Py_ssize_t>(i), PyLong_FromLong(tiers[j * k.size() + i]));
              out[py::int_(sl[j])] = row;
            }
            return out;
          },
          py::arg("keys"), py::arg("slots"))
      .def(
          "holders",
          [](const PyRouterIndex& s, py::handle key) {
            py::dict out;
            if (!PyLong_Check(key.ptr())) return out;
            const unsigned long long k = PyLong_AsUnsignedLongLong(key.ptr());
            if (k == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
              PyErr_Clear();
              return out;
            }
            for (const auto& h : s.core->holders(k)) out[py::int_(h.first)] = py::int_(h.second);
            return out;
          },
          py::arg("key"), "slot -> tier bits (bit t = tier t) of every slot holding key.")
      .def("stats",
           [](const PyRouterIndex& s) {
             const RouterStats& st = s.core->stats();
             py::dict d;
             d["stored"] = st.stored;
             d["removed"] = st.removed;
             d["unresolved"] = st.unresolved;
             d["evicted"] = st.evicted;
             d["events"] = st.events;
             d["clears"] = st.clears;
             return d;
           })
      .def("memory_bytes", [](const PyRouterIndex& s) { return s.core->memory_bytes(); },
           "Bytes the index's tables hold (capacity, not only what is used).");
}
