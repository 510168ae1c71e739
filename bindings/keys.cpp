#include "bindings/keys.h"

#include <cstring>
#include <string>

namespace kvbm::bind {

py::bytes key_bytes(const Hash128& k) {
  char b[16];
  k.to_bytes(reinterpret_cast<uint8_t*>(b));
  return py::bytes(b, 16);
}

Hash128 get_key(py::handle obj, const char* what) {
  if (obj.is_none()) return Hash128{};
  ByteView v = get_bytes(obj, false, what);
  if (v.size != 16) fail(Code::kInvalidArgument, std::string(what) + ": a block hash is 16 bytes, got " + std::to_string(v.size));
  return Hash128::from_bytes(v.data);
}

Keys get_keys(py::handle obj, const char* what) {
  Keys k;
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    k.storage.resize(seq.size());
    size_t i = 0;
    for (py::handle item : seq) {
      char* buf = nullptr;
      Py_ssize_t len = 0;
      if (PyBytes_Check(item.ptr())) {
        PyBytes_AsStringAndSize(item.ptr(), &buf, &len);
        if (len != 16)
          fail(Code::kInvalidArgument, std::string(what) + "[" + std::to_string(i) + "]: a block hash is 16 bytes, got " +
                                           std::to_string(len));
        k.storage[i] = Hash128::from_bytes(reinterpret_cast<uint8_t*>(buf));
      } else {
        k.storage[i] = get_key(item, what);
      }
      ++i;
    }
    k.data = k.storage.data();
    k.n = k.storage.size();
    return k;
  }
  if (py::isinstance<py::array>(obj)) {
    py::array arr = py::reinterpret_borrow<py::array>(obj);
    bool shape_ok = (arr.ndim() == 2 && arr.shape(1) == 16) || (arr.ndim() == 1 && arr.shape(0) % 16 == 0);
    if (arr.itemsize() != 1 || !shape_ok)
      fail(Code::kInvalidArgument, std::string(what) + ": expected a (n, 16) uint8 array of block hashes");
  }
  ByteView v = get_bytes(obj, false, what);
  if (v.size % 16 != 0)
    fail(Code::kInvalidArgument, std::string(what) + ": " + std::to_string(v.size) + " bytes is not a multiple of 16");
  k.n = v.size / 16;
  if (reinterpret_cast<uintptr_t>(v.data) % alignof(Hash128) == 0) {
    k.data = reinterpret_cast<const Hash128*>(v.data);
  } else {
    k.storage.resize(k.n);
    std::memcpy(k.storage.data(), v.data, v.size);
    k.data = k.storage.data();
  }
  k.owner = v.owner;
  return k;
}

}  // namespace kvbm::bind
