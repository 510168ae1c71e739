#include "csrc/status.h"

namespace kvbm {

const char* code_name(Code c) {
  switch (c) {
    case Code::kOk: return "OK";
    case Code::kInvalidArgument: return "INVALID_ARGUMENT";
    case Code::kOutOfRange: return "OUT_OF_RANGE";
    case Code::kCapacityExceeded: return "CAPACITY_EXCEEDED";
    case Code::kIllegalTransition: return "ILLEGAL_TRANSITION";
    case Code::kNotFound: return "NOT_FOUND";
    case Code::kAlreadyExists: return "ALREADY_EXISTS";
    case Code::kIo: return "IO";
    case Code::kChecksum: return "CHECKSUM";
    case Code::kCudaUnavailable: return "CUDA_UNAVAILABLE";
    case Code::kCuda: return "CUDA";
    case Code::kTimeout: return "TIMEOUT";
    case Code::kPeer: return "PEER";
    case Code::kConfig: return "CONFIG";
    case Code::kUnsupported: return "UNSUPPORTED";
    case Code::kInternal: return "INTERNAL";
  }
  return "UNKNOWN";
}

}  // namespace kvbm
