// Chained block hashing (spec in csrc/block_hash.h and docs/hashing.md).
#include "csrc/block_hash.h"

#include <cstring>
#include <type_traits>
#include <vector>

#include "csrc/fast_hash.h"
#include "csrc/sha256.h"

#if defined(__x86_64__)
#include <emmintrin.h>  // SSE2: part of baseline x86-64
#endif

namespace kvbm {
namespace {


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

// True if some element of a contiguous, host-order array lies outside [0, 2^32). Branch-free
// so the compiler vectorizes it; the slow loop below then finds and names the first culprit.
template <typename T>
bool any_out_of_range(const T* v, size_t n) {
  using U = std::make_unsigned_t<T>;
  U acc = 0;
  for (size_t i = 0; i < n; ++i) {
    if constexpr (sizeof(T) > 4)
      acc |= static_cast<U>(static_cast<U>(v[i]) >> 32);
    else
      acc |= static_cast<U>(static_cast<U>(v[i]) >> (8 * sizeof(T) - 1));  // the sign bit
  }
  return acc != 0;
}

template <typename T>
Status validate_typed(const TokenSpan& s) {
  if (s.stride == static_cast<ptrdiff_t>(sizeof(T)) && !s.byteswap &&
      !any_out_of_range(static_cast<const T*>(s.data), s.count))
    return Status::Ok();
  const uint8_t* p = static_cast<const uint8_t*>(s.data);
  for (size_t i = 0; i < s.count; ++i, p += s.stride) {
    const T v = load_elem<T>(p, s.byteswap);
    bool bad = false;
    if constexpr (std::is_signed_v<T>) bad = v < 0;
    if constexpr (sizeof(T) > 4) bad = bad || static_cast<uint64_t>(v) > 0xffffffffULL;
    if (bad) {
      const std::string value =
          std::is_signed_v<T> ? std::to_string(static_cast<int64_t>(v)) : std::to_string(static_cast<uint64_t>(v));
      return InvalidArgument("token_ids[" + std::to_string(i + s.index_base) + "] = " + value +
                             " is out of range: token ids must satisfy 0 <= t < 2**32");
    }
  }
  return Status::Ok();
}

// Writes `count` tokens starting at element `first` as little-endian uint32. Returns false
// (with `out` unspecified) if one of them lies outside [0, 2^32): checking here, while the
// block is in L1, replaces a separate validation pass over the whole input.
template <typename T>
bool gather_typed(const TokenSpan& s, size_t first, size_t count, uint8_t* out) {
  constexpr bool kNeedsCheck = std::is_signed_v<T> || sizeof(T) > 4;
  const uint8_t* p = static_cast<const uint8_t*>(s.data) + static_cast<ptrdiff_t>(first) * s.stride;
#if defined(__x86_64__)
  if constexpr (sizeof(T) == 8) {
    // 64-bit ids (numpy's default int64), four at a time: every high half must be zero, which
    // rejects negatives and values >= 2^32 at once; the low halves are packed to uint32.
    if (!s.byteswap && s.stride == 8 && count % 4 == 0) {
      __m128i high = _mm_setzero_si128();
      for (size_t i = 0; i < count; i += 4) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * i));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * i + 16));
        high = _mm_or_si128(high, _mm_or_si128(a, b));
        const __m128i lo = _mm_unpacklo_epi64(_mm_shuffle_epi32(a, 0x08), _mm_shuffle_epi32(b, 0x08));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 4 * i), lo);
      }
      return _mm_movemask_epi8(_mm_cmpeq_epi32(_mm_srli_epi64(high, 32), _mm_setzero_si128())) == 0xFFFF;
    }
  }
#endif
  if (kHostLittleEndian && !s.byteswap && s.stride == static_cast<ptrdiff_t>(sizeof(T))) {
    const T* v = reinterpret_cast<const T*>(p);  // the buffer protocol gives item-aligned data
    if constexpr (kNeedsCheck) {
      if (any_out_of_range(v, count)) return false;
    }
    if constexpr (sizeof(T) == 4) {
      std::memcpy(out, p, 4 * count);  // non-negative int32 and uint32 share one bit pattern
      return true;
    }
    uint32_t tmp[64];
    for (size_t done = 0; done < count;) {
      const size_t k = count - done < 64 ? count - done : 64;
      for (size_t i = 0; i < k; ++i) tmp[i] = static_cast<uint32_t>(v[done + i]);
      std::memcpy(out + 4 * done, tmp, 4 * k);
      done += k;
    }
    return true;
  }
  for (size_t i = 0; i < count; ++i, p += s.stride) {
    const T v = load_elem<T>(p, s.byteswap);
    if constexpr (std::is_signed_v<T>) {
      if (v < 0) return false;
    }
    if constexpr (sizeof(T) > 4) {
      if (static_cast<uint64_t>(v) > 0xffffffffULL) return false;
    }
    store_le32(out + 4 * i, static_cast<uint32_t>(v));
  }
  return true;
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

bool gather_tokens(const TokenSpan& s, size_t first, size_t count, uint8_t* out) {
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
  return false;
}

StatusOr<HashAlgorithm> parse_hash_algorithm(const std::string& name) {
  if (name == "sha256") return HashAlgorithm::kSha256;
  if (name == "fast128") return HashAlgorithm::kFast128;
  return InvalidArgument("hash algorithm '" + name + "' is unknown; expected 'sha256' or 'fast128'");
}

void digest16(HashAlgorithm algo, const void* data, size_t n, uint8_t out[kBlockHashSize],
              sha256::Impl sha_impl) {
  if (algo == HashAlgorithm::kFast128) {
    fast128(data, n, out);
    return;
  }
  uint8_t full[sha256::kDigestSize];
  sha256::digest(data, n, full, sha_impl);
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

namespace {

// Builds block b's message "tokens || [H16(extra)] || ns || parent || flag" in `msg`, with the
// parent slot left as it is (the caller fills it). Returns the message length (0 if a token
// of block b is out of range); *parent_off receives the parent slot's offset.
size_t build_message(const BlockHashParams& p, const TokenSpan& tokens, size_t b, const uint8_t* broadcast_digest,
                     uint8_t* msg, size_t* parent_off) {
  size_t pos = 4 * p.block_size;
  if (!gather_tokens(tokens, b * p.block_size, p.block_size, msg)) return 0;
  bool present = false;
  if (broadcast_digest) {
    std::memcpy(msg + pos, broadcast_digest, kBlockHashSize);
    present = true;
  } else if (p.num_extras != 0 && p.extras[b].present) {
    digest16(p.algorithm, p.extras[b].data, p.extras[b].size, msg + pos, p.sha_impl);
    present = true;
  }
  if (present) pos += kBlockHashSize;
  std::memcpy(msg + pos, p.ns_digest, kBlockHashSize);
  *parent_off = pos + kBlockHashSize;
  msg[pos + 2 * kBlockHashSize] = present ? 0x01 : 0x00;
  return pos + 2 * kBlockHashSize + 1;
}

// Both chains return false as soon as a block holds an out-of-range token.
bool hash_chain_fast128(const BlockHashParams& p, const TokenSpan& tokens, size_t nblocks,
                        const uint8_t* broadcast_digest, uint8_t* out) {
  // Room for a zero-padded partial last lane; the padding is re-zeroed when the length changes.
  std::vector<uint8_t> msg(4 * p.block_size + 3 * kBlockHashSize + 1 + 16);
  const uint8_t zeros[kBlockHashSize] = {};
  const uint8_t* parent = p.parent ? p.parent : zeros;
  size_t prev_len = msg.size();
  for (size_t b = 0; b < nblocks; ++b) {
    size_t parent_off = 0;
    const size_t len = build_message(p, tokens, b, broadcast_digest, msg.data(), &parent_off);
    if (len == 0) return false;
    if (len < prev_len) std::memset(msg.data() + len, 0, msg.size() - len);
    prev_len = len;
    std::memcpy(msg.data() + parent_off, parent, kBlockHashSize);
    uint8_t* h = out + b * kBlockHashSize;
    fast128_zero_padded(msg.data(), len, h);
    parent = h;
  }
  return true;
}

// SHA-256 chain. The message puts the tokens first so that its leading 64-byte chunks (F of
// them, F = 4*block_size / 64) depend only on the block's own tokens; only the 1-2 final
// chunks (token remainder, extra digest, namespace, parent, flag, padding) wait for the
// previous block's hash. We run a two-stage pipeline: while block b's dependent chunks are
// compressed, block b+1's independent chunks are compressed alongside them with
// sha256::compress_x2, which overlaps two dependency chains on SHA-NI. For block_size 16
// (F = 1, one dependent chunk) every step is exactly one paired compression.
bool hash_chain_sha256(const BlockHashParams& p, const TokenSpan& tokens, size_t nblocks,
                       const uint8_t* broadcast_digest, uint8_t* out) {
  constexpr size_t kChunk = sha256::kBlockSize;
  const size_t token_bytes = 4 * p.block_size;
  const size_t F = token_bytes / kChunk;  // chain-independent chunks per block
  const size_t indep = F * kChunk;
  const size_t msg_cap = token_bytes + 3 * kBlockHashSize + 1;
  const sha256::Impl impl = p.sha_impl == sha256::Impl::kAuto
                                ? (sha256::shani_supported() ? sha256::Impl::kShaNi : sha256::Impl::kPortable)
                                : p.sha_impl;

  // Each slot holds one block's message with room for SHA-256 padding after it, so the
  // dependent tail (from byte `indep` on) is compressed in place. The padding of a slot is
  // rewritten only when the message length changes (per-block extras present or not).
  std::vector<uint8_t> buf[2] = {std::vector<uint8_t>(msg_cap + 2 * kChunk), std::vector<uint8_t>(msg_cap + 2 * kChunk)};
  size_t slot_len[2] = {0, 0}, tail_chunks[2] = {0, 0}, parent_off[2] = {0, 0};
  uint32_t mid[2][8];

  auto prepare = [&](size_t b) -> bool {
    const int s = static_cast<int>(b & 1);
    uint8_t* m = buf[s].data();
    const size_t len = build_message(p, tokens, b, broadcast_digest, m, &parent_off[s]);
    if (len == 0) return false;
    if (len != slot_len[s]) {
      const size_t tail_len = len - indep;  // < 64 + 49
      tail_chunks[s] = tail_len + 9 <= kChunk ? 1 : 2;
      const size_t end = indep + tail_chunks[s] * kChunk;
      std::memset(m + len, 0, end - len);
      m[len] = 0x80;
      const uint64_t bits = uint64_t(len) * 8;
      for (int i = 0; i < 8; ++i) m[end - 1 - i] = uint8_t(bits >> (8 * i));
      slot_len[s] = len;
    }
    std::memcpy(mid[s], sha256::kInitialState, sizeof(mid[s]));
    return true;
  };

  if (nblocks == 0) return true;
  if (!prepare(0)) return false;
  if (p.parent) std::memcpy(buf[0].data() + parent_off[0], p.parent, kBlockHashSize);
  sha256::compress(mid[0], buf[0].data(), F, impl);

  for (size_t b = 0; b < nblocks; ++b) {
    const int cur = static_cast<int>(b & 1), nxt = cur ^ 1;
    const bool has_next = b + 1 < nblocks;
    size_t next_done = 0;  // independent chunks of block b+1 already compressed
    if (has_next && !prepare(b + 1)) return false;
    const uint8_t* tail = buf[cur].data() + indep;
    for (size_t j = 0; j < tail_chunks[cur]; ++j) {
      if (has_next && next_done < F) {
        sha256::compress_x2(mid[nxt], buf[nxt].data() + next_done * kChunk, mid[cur], tail + j * kChunk, impl);
        ++next_done;
      } else {
        sha256::compress(mid[cur], tail + j * kChunk, 1, impl);
      }
    }
    if (has_next && next_done < F)
      sha256::compress(mid[nxt], buf[nxt].data() + next_done * kChunk, F - next_done, impl);
    uint8_t* h = out + b * kBlockHashSize;
    for (int i = 0; i < 4; ++i) {
      h[4 * i] = uint8_t(mid[cur][i] >> 24);
      h[4 * i + 1] = uint8_t(mid[cur][i] >> 16);
      h[4 * i + 2] = uint8_t(mid[cur][i] >> 8);
      h[4 * i + 3] = uint8_t(mid[cur][i]);
    }
    if (has_next) std::memcpy(buf[nxt].data() + parent_off[nxt], h, kBlockHashSize);
  }
  return true;
}

}  // namespace

Status compute_block_hashes(const BlockHashParams& p, const TokenSpan& tokens, uint8_t* out,
                            size_t out_size) {
  if (p.block_size == 0 || p.block_size > kMaxBlockSize)
    return InvalidArgument("block_size = " + std::to_string(p.block_size) + " is out of range: expected 1.." +
                           std::to_string(kMaxBlockSize));
  if (!p.ns_digest) return InvalidArgument("namespace digest is missing (expected 16 bytes)");
  if (p.algorithm != HashAlgorithm::kSha256 && p.algorithm != HashAlgorithm::kFast128)
    return InvalidArgument("hash algorithm " + std::to_string(static_cast<int>(p.algorithm)) + " is unknown");
  if (p.sha_impl == sha256::Impl::kShaNi && !sha256::shani_supported())
    return Unsupported("SHA-NI was requested but this CPU or build does not have it");
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
  if (tokens.count && !tokens.data) return InvalidArgument("token_ids: null data pointer");
  // Tokens of full blocks are checked while they are gathered; check the tail here. Either
  // failure is reported by validate_tokens over the whole input, which names the first bad index.
  TokenSpan tail = tokens;
  tail.data = static_cast<const uint8_t*>(tokens.data) +
              static_cast<ptrdiff_t>(nblocks * p.block_size) * tokens.stride;
  tail.count = tokens.count - nblocks * p.block_size;
  if (!validate_tokens(tail).ok()) return validate_tokens(tokens);

  uint8_t broadcast_digest[kBlockHashSize];
  const bool broadcast_present = p.broadcast_extra && p.extras[0].present;
  if (broadcast_present)
    digest16(p.algorithm, p.extras[0].data, p.extras[0].size, broadcast_digest, p.sha_impl);
  const uint8_t* bd = broadcast_present ? broadcast_digest : nullptr;
  const bool ok = p.algorithm == HashAlgorithm::kFast128 ? hash_chain_fast128(p, tokens, nblocks, bd, out)
                                                        : hash_chain_sha256(p, tokens, nblocks, bd, out);
  if (!ok) {
    Status st = validate_tokens(tokens);
    return st.ok() ? Internal("block hashing rejected a token that validation accepts") : st;
  }
  return Status::Ok();
}

}  // namespace kvbm
