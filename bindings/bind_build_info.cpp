#include "bindings/common.h"
#include "csrc/build_info.h"

KVBM_BINDINGS(build_info, 0) {
  m.def("cuda_compiled", &kvbm::cuda_compiled, "True if this build compiled the CUDA kernels.");
  m.def("cuda_available", &kvbm::cuda_available, "True if CUDA is compiled in and a GPU is usable now.");
  m.def("cuda_device_count", &kvbm::cuda_device_count, "Number of usable GPUs (0 without CUDA).");
#ifdef KVBM_WITH_UCX
  m.attr("ucx_compiled") = true;
#else
  m.attr("ucx_compiled") = false;
#endif
  m.def("_raise_status", [](int code, const std::string& msg) {
    kvbm::bind::check(kvbm::Status(static_cast<kvbm::Code>(code), msg));
  }, "Test hook: raise the exception a native status code maps to.");
}
