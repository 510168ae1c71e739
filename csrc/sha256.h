// SHA-256 (FIPS 180-4): a portable implementation plus an x86 SHA-NI path chosen at run time.
//
// Used by the block hasher (csrc/block_hash.h) for collision-resistant chained block hashes.
// The SHA-NI compression function is compiled with a function-level target attribute, so the
// rest of the library builds for baseline x86-64 and runs on CPUs without the extension.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvbm::sha256 {

constexpr size_t kDigestSize = 32;
constexpr size_t kBlockSize = 64;

enum class Impl : int {
  kAuto = 0,      // SHA-NI when the CPU has it, else portable
  kPortable = 1,  // plain C++
  kShaNi = 2,     // x86 SHA extensions; on a CPU without them this falls back to portable
};

// True if this build has the SHA-NI path and the running CPU supports SHA, SSSE3 and SSE4.1.
bool shani_supported();
// The implementation kAuto resolves to on this machine: "sha-ni" or "portable".
const char* active_impl_name();

// Runs the compression function over `nblocks` consecutive 64-byte blocks, updating `state`
// (the eight working words H0..H7 in host order).
void compress(uint32_t state[8], const uint8_t* blocks, size_t nblocks, Impl impl = Impl::kAuto);

// Compresses one 64-byte block into each of two independent states. On SHA-NI the two
// dependency chains are interleaved, which nearly doubles throughput because a single
// compression is bound by the latency of sha256rnds2, not its throughput.
void compress_x2(uint32_t state_a[8], const uint8_t* block_a, uint32_t state_b[8], const uint8_t* block_b,
                 Impl impl = Impl::kAuto);

// The initial hash value H(0) (FIPS 180-4 5.3.3).
extern const uint32_t kInitialState[8];

// One-shot digest of `n` bytes at `data` into `out` (32 bytes).
void digest(const void* data, size_t n, uint8_t out[kDigestSize], Impl impl = Impl::kAuto);

// Incremental hashing for messages built in pieces.
class Hasher {
 public:
  explicit Hasher(Impl impl = Impl::kAuto);
  void update(const void* data, size_t n);
  void finish(uint8_t out[kDigestSize]);  // the hasher must not be updated afterwards

 private:
  uint32_t state_[8];
  uint8_t buf_[kBlockSize];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
  Impl impl_;
};

}  // namespace kvbm::sha256
