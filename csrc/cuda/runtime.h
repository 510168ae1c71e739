// Host-side helpers around the CUDA runtime, shared by every .cpp that calls it (the KV copy
// paths in csrc/kv_transfer.cpp, the transfer engine's CUDA IPC path in transfer/cuda_ipc.cpp).
// Include only under KVBM_WITH_CUDA.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "csrc/status.h"

namespace kvbm::cuda {

// Ok for cudaSuccess; otherwise clears this thread's last error (so that a later launch check does
// not report it again) and returns a kCuda Status naming `what`.
inline Status cuda_status(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return Status::Ok();
  cudaGetLastError();
  return CudaError(what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

// Makes `device` current for a scope and restores the previous device after it (callers' threads
// keep the device they had; kvbm's own threads may switch freely).
class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  Status enter(int device) {
    KVBM_RETURN_IF_ERROR(cuda_status(cudaGetDevice(&prev_), "cudaGetDevice"));
    if (prev_ != device) {
      KVBM_RETURN_IF_ERROR(cuda_status(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")"));
      switched_ = true;
    }
    return Status::Ok();
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0;
  bool switched_ = false;
};

}  // namespace kvbm::cuda
