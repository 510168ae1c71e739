#include <string>
#include <vector>

#include "bindings/common.h"
#include "csrc/block_index.h"
#include "tiers/host_arena.h"

namespace kvbm::bind {
namespace {

std::vector<uint32_t> slots_arg(py::handle obj, const char* what) {
  auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!a || a.ndim() != 1) fail(Code::kInvalidArgument, std::string(what) + ": expected a 1-D sequence of slot numbers");
  std::vector<uint32_t> out(a.size());
  for (py::ssize_t i = 0; i < a.size(); ++i) {
    int64_t s = a.data()[i];
    if (s < -1 || s > 0xFFFFFFFEll) fail(Code::kOutOfRange, std::string(what) + ": slot " + std::to_string(s) + " is out of range");
    out[i] = s < 0 ? kNoSlot : static_cast<uint32_t>(s);
  }
  return out;
}

// Rows of `n` blocks of `row_bytes`: a 2-D C-contiguous buffer (n, row_bytes), a 1-D one of
// n*row_bytes bytes, or a sequence of n buffers / int addresses.
std::vector<uint8_t*> rows_arg(py::handle obj, size_t n, size_t row_bytes, bool writable, const char* what,
                               std::vector<py::object>* keep) {
  std::vector<uint8_t*> rows(n);
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    if (seq.size() != n)
      fail(Code::kInvalidArgument, std::string(what) + ": " + std::to_string(seq.size()) + " buffers for " + std::to_string(n) + " blocks");
    for (size_t i = 0; i < n; ++i) {
      std::string name = std::string(what) + "[" + std::to_string(i) + "]";
      ByteView v = get_bytes(seq[i], writable, name.c_str(), row_bytes);
      rows[i] = v.data;
      keep->push_back(v.owner);
    }
    return rows;
  }
  ByteView v = get_bytes(obj, writable, what, n * row_bytes);
  keep->push_back(v.owner);
  for (size_t i = 0; i < n; ++i) rows[i] = v.data + i * row_bytes;
  return rows;
}

}  // namespace
}  // namespace kvbm::bind

KVBM_BINDINGS(host, 20) {
  using namespace kvbm;
  using namespace kvbm::bind;
  py::class_<HostArena>(m, "HostArena", "Fixed-slot host memory arena (pinned when a GPU is present).")
      .def(py::init([](uint32_t num_slots, uint64_t slot_bytes, py::object pinned) {
             bool want = pinned.is_none() ? true : pinned.cast<bool>();
             bool require = !pinned.is_none() && pinned.cast<bool>();
             return check(HostArena::create(num_slots, slot_bytes, want, require));
           }),
           py::arg("num_slots"), py::arg("slot_bytes"), py::arg("pinned") = py::none())
      .def_property_readonly("num_slots", &HostArena::num_slots)
      .def_property_readonly("slot_bytes", &HostArena::slot_bytes)
      .def_property_readonly("pinned", &HostArena::pinned)
      .def("write",
           [](HostArena& self, py::handle slots, py::handle data) {
             std::vector<uint32_t> s = slots_arg(slots, "slots");
             std::vector<py::object> keep;
             std::vector<uint8_t*> rows = rows_arg(data, s.size(), self.slot_bytes(), false, "data", &keep);
             Status st;
             {
               py::gil_scoped_release nogil;
               st = self.write(s.data(), s.size(), rows.data());
             }
             check(st);
           },
           py::arg("slots"), py::arg("data"), "Copy blocks into slots (slot -1 = skip that row).")
      .def("read",
           [](HostArena& self, py::handle slots, py::handle out) {
             std::vector<uint32_t> s = slots_arg(slots, "slots");
             for (uint32_t x : s)
               if (x == kNoSlot) fail(Code::kInvalidArgument, "read: slot -1 is not a slot");
             std::vector<py::object> keep;
             std::vector<uint8_t*> rows = rows_arg(out, s.size(), self.slot_bytes(), true, "out", &keep);
             Status st;
             {
               py::gil_scoped_release nogil;
               st = self.read(s.data(), s.size(), rows.data());
             }
             check(st);
           },
           py::arg("slots"), py::arg("out"), "Copy slots into caller buffers.")
      .def("address",
           [](const HostArena& self, uint32_t slot) {
             check(self.check_slot(slot));
             return reinterpret_cast<uint64_t>(self.slot_ptr(slot));
           },
           py::arg("slot"))
      .def("addresses",
           [](const HostArena& self, py::handle slots) {
             std::vector<uint32_t> s = slots_arg(slots, "slots");
             py::array_t<uint64_t> out(s.size());
             for (size_t i = 0; i < s.size(); ++i) {
               check(self.check_slot(s[i]));
               out.mutable_data()[i] = reinterpret_cast<uint64_t>(self.slot_ptr(s[i]));
             }
             return out;
           },
           py::arg("slots"), "Host addresses of slots (uint64), e.g. for GPU gather/scatter.")
      .def("view",
           [](py::object self_obj, uint32_t slot) {
             HostArena& self = self_obj.cast<HostArena&>();
             check(self.check_slot(slot));
             return py::array_t<uint8_t>({static_cast<py::ssize_t>(self.slot_bytes())}, {1}, self.slot_ptr(slot), self_obj);
           },
           py::arg("slot"), "A numpy view of one slot (keeps the arena alive).");
}
