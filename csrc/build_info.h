#pragma once
namespace kvbm {
bool cuda_compiled();
// True when the CUDA runtime finds at least one usable GPU (false on a CUDA build with no GPU).
bool cuda_available();
// Number of visible GPUs (0 without CUDA or without a GPU).
int cuda_device_count();
}  // namespace kvbm
