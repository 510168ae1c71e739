// CRC32C (Castagnoli, reflected polynomial 0x82F63B78): the block checksum of every tier below
// the GPU. Hardware path (SSE4.2 crc32 instruction, three interleaved streams) chosen at run
// time, slicing-by-8 table fallback elsewhere.
//
// Semantics are the usual ones (init ~0, final xor ~0): crc32c("123456789") == 0xE3069283, and
// `crc` chains calls: crc32c(b, m, crc32c(a, n)) == crc32c(a || b, n + m).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvbm {

enum class Crc32cImpl : int {
  kAuto = 0,   // SSE4.2 when the CPU has it, else table
  kTable = 1,  // portable slicing-by-8
  kSse42 = 2,  // x86 crc32 instruction, three streams; falls back to kTable without SSE4.2
};

uint32_t crc32c(const void* p, size_t n, uint32_t crc = 0);
uint32_t crc32c(const void* p, size_t n, uint32_t crc, Crc32cImpl impl);

// CRC32C of each of `rows` rows of `row_bytes` bytes, the rows `stride` bytes apart from `base`,
// into out[0..rows) (one call for many blocks: callers verifying a batch release the GIL once).
void crc32c_rows(const uint8_t* base, size_t rows, size_t row_bytes, size_t stride, uint32_t* out);

bool crc32c_hw_supported();
const char* crc32c_impl_name();  // what kAuto resolves to: "sse4.2" or "table"

}  // namespace kvbm
