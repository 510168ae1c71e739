// Chained block hashing (spec in csrc/block_hash.h and docs/hashing.md).
#include "csrc/block_hash.h"

#include <cstring>
#include <type_traits>
#include <vector>

#include "csrc/fast_hash.h"
#include "csrc/sha256.h"

namespace kvbm {
namespace {

constexpr bool kHostLittleEndian =
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    false;
#else
    true;
#endif

template <typename T>
T bswap_any(T v) {
  using U = std::make_unsigned_t<T>;
  U u = static_cast<U>(v), r = 0;
  for (size_t i = 0; i < sizeof(T); ++i) {
    r = static_cast<U>((r << 8) | (u & 0xff));
    u = static_cast<U>(u >> 8);
  }
  return static_cast<T>(r);
}

template <typename T>
inline T load_elem(const uint8_t* p, bool swap) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return swap ? bswap_any(v) : v;
}

inline void store_le32(uint8_t* p, uint32_t v) {
  if (kHostLittleEndian) {
    std::memcpy(p, &v, 4);
  } else {
    p[0] = uint8_t(v);
    p[1] = uint8_t(v >> 8);
    p[2] = uint8_t(v >> 16);
    p[3] = uint8_t(v >> 24);
  }
}

template <typename T>
Status validate_typed(const TokenSpan& s) {
  const uint8_t* p = static_cast<const uint8_t*>(s.data);
  for (size_t i = 0; i < s.count; ++i, p += s.stride) {
    const T v = load_elem<T>(p, s.byteswap);
    bool bad = false;
    if constexpr (std::is_signed_v<T>) bad = v < 0;
    if constexpr (sizeof(T) > 4) bad = bad || static_cast<uint64_t>(v) > 0xffffffffULL;
    if (bad) {
      const std::string value =
          std::is_signed_v<T> ? std::to_string(static_cast<int64_t>(v)) : std::to_string(static_cast<uint64_t>(v));
      return InvalidArgument("token_ids[" + std::to_string(i) + "] = " + value +
                             " is out of range: token ids must satisfy 0 <= t < 2**32");
    }
  }
  return Status::Ok();
}

// Writes `count` tokens starting at element `first` as little-endian uint32 (validated before).
template <typename T>
void gather_typed(const TokenSpan& s, size_t first, size_t count, uint8_t* out) {
  const uint8_t* p = static_cast<const uint8_t*>(s.data) + static_cast<ptrdiff_t>(first) * s.stride;
  if constexpr (sizeof(T) == 4) {
    if (kHostLittleEndian && !s.byteswap && s.stride == 4) {
      std::memcpy(out, p, 4 * count);  // non-negative int32 and uint32 share one bit pattern
      return;
    }
  }
  for (size_t i = 0; i < count; ++i, p += s.stride)
    store_le32(out + 4 * i, static_cast<uint32_t>(load_elem<T>(p, s.byteswap)));
}

void gather_tokens(const TokenSpan& s, size_t first, size_t count, uint8_t* out) {
  switch (s.type) {
    case TokenType::kInt8: return gather_typed<int8_t>(s, first, count, out);
    case TokenType::kUInt8: return gather_typed<uint8_t>(s, first, count, out);
    case TokenType::kInt16: return gather_typed<int16_t>(s, first, count, out);
    case TokenType::kUInt16: return gather_typed<uint16_t>(s, first, count, out);
    case TokenType::kInt32: return gather_typed<int32_t>(s, first, count, out);
    case TokenType::kUInt32: return gather_typed<uint32_t>(s, first, count, out);
    case TokenType::kInt64: return gather_typed<int64_t>(s, first, count, out);
    case TokenType::kUInt64: return gather_typed<uint64_t>(s, first, count, out);
  }
}

size_t type_size(TokenType t) {
  switch (t) {
    case TokenType::kInt8:
    case TokenType::kUInt8: return 1;
    case TokenType::kInt16:
    case TokenType::kUInt16: return 2;
    case TokenType::kInt32:
    case TokenType::kUInt32: return 4;
    case TokenType::kInt64:
    case TokenType::kUInt64: return 8;
  }
  return 0;
}

}  // namespace

StatusOr<HashAlgorithm> parse_hash_algorithm(const std::string& name) {
  if (name == "sha256") return HashAlgorithm::kSha256;
  if (name == "fast128") return HashAlgorithm::kFast128;
  return InvalidArgument("hash algorithm '" + name + "' is unknown; expected 'sha256' or 'fast128'");
}

void digest16(HashAlgorithm algo, const void* data, size_t n, uint8_t out[kBlockHashSize]) {
  if (algo == HashAlgorithm::kFast128) {
    fast128(data, n, out);
    return;
  }
  uint8_t full[sha256::kDigestSize];
  sha256::digest(data, n, full);
  std::memcpy(out, full, kBlockHashSize);
}

Status validate_tokens(const TokenSpan& s) {
  if (s.count && !s.data) return InvalidArgument("token_ids: null data pointer");
  switch (s.type) {
    case TokenType::kInt8: return validate_typed<int8_t>(s);
    case TokenType::kUInt8: return Status::Ok();
    case TokenType::kInt16: return validate_typed<int16_t>(s);
    case TokenType::kUInt16: return Status::Ok();
    case TokenType::kInt32: return validate_typed<int32_t>(s);
    case TokenType::kUInt32: return Status::Ok();
    case TokenType::kInt64: return validate_typed<int64_t>(s);
    case TokenType::kUInt64: return validate_typed<uint64_t>(s);
  }
  return InvalidArgument("token_ids: unknown token type");
}

Status compute_block_hashes(const BlockHashParams& p, const TokenSpan& tokens, uint8_t* out,
                            size_t out_size) {
  if (p.block_size == 0 || p.block_size > kMaxBlockSize)
    return InvalidArgument("block_size = " + std::to_string(p.block_size) + " is out of range: expected 1.." +
                           std::to_string(kMaxBlockSize));
  if (!p.ns_digest) return InvalidArgument("namespace digest is missing (expected 16 bytes)");
  if (p.algorithm != HashAlgorithm::kSha256 && p.algorithm != HashAlgorithm::kFast128)
    return InvalidArgument("hash algorithm " + std::to_string(static_cast<int>(p.algorithm)) + " is unknown");
  if (tokens.count && type_size(tokens.type) == 0) return InvalidArgument("token_ids: unknown token type");
  const size_t nblocks = num_full_blocks(tokens.count, p.block_size);
  if (p.broadcast_extra) {
    if (p.num_extras != 1 || !p.extras)
      return InvalidArgument("a broadcast extra key needs exactly one entry, got " + std::to_string(p.num_extras));
  } else if (p.num_extras != 0 && p.num_extras != nblocks) {
    return InvalidArgument("extra has " + std::to_string(p.num_extras) + " entries but token_ids has " +
                           std::to_string(nblocks) + " full blocks of " + std::to_string(p.block_size) +
                           " tokens; pass one entry (bytes or None) per full block");
  } else if (p.num_extras != 0 && !p.extras) {
    return InvalidArgument("extra: null pointer");
  }
  if (out_size < nblocks * kBlockHashSize)
    return InvalidArgument("output has " + std::to_string(out_size) + " bytes, needs " +
                           std::to_string(nblocks * kBlockHashSize));
  if (nblocks && !out) return InvalidArgument("output: null pointer");
  KVBM_RETURN_IF_ERROR(validate_tokens(tokens));

  // Message layout: [0,16) namespace, [16,32) parent, [32, 32+4B) tokens, flag, [16 extra].
  const size_t tok_off = 2 * kBlockHashSize;
  const size_t flag_off = tok_off + 4 * p.block_size;
  std::vector<uint8_t> msg(flag_off + 1 + kBlockHashSize);
  std::memcpy(msg.data(), p.ns_digest, kBlockHashSize);
  if (p.parent) std::memcpy(msg.data() + kBlockHashSize, p.parent, kBlockHashSize);

  uint8_t broadcast_digest[kBlockHashSize];
  const bool broadcast_present = p.broadcast_extra && p.extras[0].present;
  if (broadcast_present) digest16(p.algorithm, p.extras[0].data, p.extras[0].size, broadcast_digest);

  for (size_t b = 0; b < nblocks; ++b) {
    gather_tokens(tokens, b * p.block_size, p.block_size, msg.data() + tok_off);
    size_t len = flag_off + 1;
    if (broadcast_present) {
      msg[flag_off] = 0x01;
      std::memcpy(msg.data() + flag_off + 1, broadcast_digest, kBlockHashSize);
      len += kBlockHashSize;
    } else if (p.num_extras != 0 && !p.broadcast_extra && p.extras[b].present) {
      msg[flag_off] = 0x01;
      digest16(p.algorithm, p.extras[b].data, p.extras[b].size, msg.data() + flag_off + 1);
      len += kBlockHashSize;
    } else {
      msg[flag_off] = 0x00;
    }
    uint8_t* h = out + b * kBlockHashSize;
    digest16(p.algorithm, msg.data(), len, h);
    std::memcpy(msg.data() + kBlockHashSize, h, kBlockHashSize);  // the next block's parent
  }
  return Status::Ok();
}

}  // namespace kvbm
