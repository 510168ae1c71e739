// kvbm status codes: the one error vocabulary of the native core.
//
// The core never throws across its boundary; every fallible call returns a Status (or
// StatusOr<T>). bindings/module.cpp turns a non-ok Status into the matching kvbm.KvbmError
// subclass in one switch, so Python sees one exception family whatever layer failed.
#pragma once

#include <string>
#include <utility>

namespace kvbm {

enum class Code : int {
  kOk = 0,
  kInvalidArgument,    // bad value from the caller (sizes, dtypes, block_size <= 0, ...)
  kOutOfRange,         // an index/block id/slot outside its bounds
  kCapacityExceeded,   // no room and nothing evictable (all pinned / in flight)
  kIllegalTransition,  // block state machine refused a transition
  kNotFound,           // a block hash or handle that is not present
  kAlreadyExists,      // inserting something that is already there
  kIo,                 // file system / OS error
  kChecksum,           // stored bytes failed verification
  kCudaUnavailable,    // CUDA feature used on a build or machine without CUDA
  kCuda,               // a CUDA runtime error
  kTimeout,            // a wait ran past its deadline
  kPeer,               // a remote peer failed or vanished
  kConfig,             // invalid configuration
  kUnsupported,        // a valid request this build cannot do
  kInternal,           // a broken invariant inside kvbm (a bug)
};

const char* code_name(Code c);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string msg) : code_(code), msg_(std::move(msg)) {}
  static Status Ok() { return Status(); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return msg_; }
  std::string to_string() const { return ok() ? "OK" : std::string(code_name(code_)) + ": " + msg_; }

 private:
  Code code_ = Code::kOk;
  std::string msg_;
};

inline Status InvalidArgument(std::string m) { return Status(Code::kInvalidArgument, std::move(m)); }
inline Status OutOfRange(std::string m) { return Status(Code::kOutOfRange, std::move(m)); }
inline Status CapacityExceeded(std::string m) { return Status(Code::kCapacityExceeded, std::move(m)); }
inline Status IllegalTransition(std::string m) { return Status(Code::kIllegalTransition, std::move(m)); }
inline Status NotFound(std::string m) { return Status(Code::kNotFound, std::move(m)); }
inline Status AlreadyExists(std::string m) { return Status(Code::kAlreadyExists, std::move(m)); }
inline Status IoError(std::string m) { return Status(Code::kIo, std::move(m)); }
inline Status ChecksumError(std::string m) { return Status(Code::kChecksum, std::move(m)); }
inline Status CudaUnavailable(std::string m) { return Status(Code::kCudaUnavailable, std::move(m)); }
inline Status CudaError(std::string m) { return Status(Code::kCuda, std::move(m)); }
inline Status Timeout(std::string m) { return Status(Code::kTimeout, std::move(m)); }
inline Status PeerError(std::string m) { return Status(Code::kPeer, std::move(m)); }
inline Status ConfigError(std::string m) { return Status(Code::kConfig, std::move(m)); }
inline Status Unsupported(std::string m) { return Status(Code::kUnsupported, std::move(m)); }
inline Status Internal(std::string m) { return Status(Code::kInternal, std::move(m)); }

// A value or the Status saying why there is none.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(T v) : value_(std::move(v)) {}          // NOLINT: implicit on purpose
  StatusOr(Status s) : status_(std::move(s)) {}    // NOLINT: implicit on purpose
  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  T& value() { return value_; }
  const T& value() const { return value_; }

 private:
  Status status_;
  T value_{};
};

}  // namespace kvbm

#define KVBM_RETURN_IF_ERROR(expr)          \
  do {                                      \
    ::kvbm::Status _kvbm_st = (expr);       \
    if (!_kvbm_st.ok()) return _kvbm_st;    \
  } while (0)
