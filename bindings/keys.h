// Conversions of block-hash arguments: a list of 16-byte bytes objects, a (n, 16) uint8 numpy
// array, or one bytes object of 16*n bytes.
#pragma once

#include <vector>

#include "bindings/common.h"
#include "csrc/hash128.h"

namespace kvbm::bind {

struct Keys {
  const Hash128* data = nullptr;
  size_t n = 0;
  std::vector<Hash128> storage;  // used when the input could not be viewed in place
  py::object owner;
};

Keys get_keys(py::handle obj, const char* what = "hashes");
Hash128 get_key(py::handle obj, const char* what);  // one 16-byte hash; None -> zero
py::bytes key_bytes(const Hash128& k);

}  // namespace kvbm::bind
