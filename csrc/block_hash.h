// Chained block hashes: the identity of a block of KV cache.
//
//   h_i = H16( LE32(tokens_i)(4*block_size) || [X(16)] || ns_digest(16) || h_{i-1}(16) || flag )
//
// where h_{-1} is the caller's `parent` or 16 zero bytes, X = H16(extra_i) is present only
// when block i has an extra key, flag (the last byte) is 0x01 then and 0x00 otherwise, and H16
// is the first 16 bytes of SHA-256 (default, collision resistant) or fast128 (trusted
// single-tenant use). Only full blocks are hashed; the tokens after the last full block are
// validated but not hashed. docs/hashing.md is the byte-exact specification with test vectors.
//
// Why tokens first: the message's leading 64-byte SHA-256 chunks then depend on the block's
// own tokens only, so they are computed for block i+1 while block i's last chunk (which holds
// the parent) is still in flight; see hash_chain_sha256 in block_hash.cpp. The message still
// decodes uniquely from its end (flag, parent, namespace, then X if flagged), and the
// namespace fixes block_size, so distinct inputs never give equal messages.
//
// For block_size 16 the message is 97 bytes (113 with an extra key): two SHA-256 compressions,
// one of which runs off the chain's critical path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "csrc/sha256.h"
#include "csrc/status.h"

namespace kvbm {

constexpr size_t kBlockHashSize = 16;
constexpr size_t kMaxBlockSize = size_t(1) << 24;  // tokens per block

enum class HashAlgorithm : int { kSha256 = 0, kFast128 = 1 };

// "sha256" or "fast128"; anything else is InvalidArgument naming the accepted values.
StatusOr<HashAlgorithm> parse_hash_algorithm(const std::string& name);

// 16-byte digest of `n` bytes with `algo` (SHA-256 truncated to its first 16 bytes, or fast128).
void digest16(HashAlgorithm algo, const void* data, size_t n, uint8_t out[kBlockHashSize],
              sha256::Impl sha_impl = sha256::Impl::kAuto);

enum class TokenType : int { kInt8, kUInt8, kInt16, kUInt16, kInt32, kUInt32, kInt64, kUInt64 };

// A strided 1-D view of integer token ids in any integer width.
struct TokenSpan {
  const void* data = nullptr;
  size_t count = 0;
  ptrdiff_t stride = 0;   // bytes from one element to the next (may be negative)
  TokenType type = TokenType::kUInt32;
  bool byteswap = false;  // elements are stored in the byte order opposite to the host's
  size_t index_base = 0;  // index of data[0] in the caller's sequence (error messages only)
};

// One extra key (LoRA name, cache salt, multimodal hash ...) as opaque bytes.
struct ExtraKey {
  const uint8_t* data = nullptr;
  size_t size = 0;
  bool present = false;  // false: this block has no extra key (flag byte 0x00)
};

struct BlockHashParams {
  HashAlgorithm algorithm = HashAlgorithm::kSha256;
  const uint8_t* ns_digest = nullptr;  // 16 bytes, required
  const uint8_t* parent = nullptr;     // 16 bytes, or null: the chain starts from zeros
  size_t block_size = 0;               // tokens per block, 1..kMaxBlockSize
  // Extra keys: none (num_extras == 0), one for every block (broadcast_extra, num_extras == 1),
  // or exactly one entry per full block.
  const ExtraKey* extras = nullptr;
  size_t num_extras = 0;
  bool broadcast_extra = false;
  sha256::Impl sha_impl = sha256::Impl::kAuto;  // kShaNi needs sha256::shani_supported()
};

inline size_t num_full_blocks(size_t num_tokens, size_t block_size) {
  return block_size == 0 ? 0 : num_tokens / block_size;
}

// Writes tokens[first, first + count) to `out` as little-endian uint32 (4 * count bytes). Returns
// false, with `out` unspecified, if one of them lies outside [0, 2^32); the caller guarantees the
// range lies within the span.
bool gather_tokens(const TokenSpan& tokens, size_t first, size_t count, uint8_t* out);

// Checks that every token satisfies 0 <= t < 2^32; the error names the first bad index.
Status validate_tokens(const TokenSpan& tokens);

// Writes num_full_blocks(tokens.count, block_size) hashes of 16 bytes to `out` (`out_size`
// bytes available). Validates all arguments first; on error nothing useful is in `out`.
Status compute_block_hashes(const BlockHashParams& params, const TokenSpan& tokens, uint8_t* out,
                            size_t out_size);

}  // namespace kvbm
